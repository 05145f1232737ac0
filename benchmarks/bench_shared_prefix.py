"""Scoring the 8 utterance options of one study-2 trial: one request sharing the context vs one request per option.

Run: .venv/bin/python benchmarks/bench_shared_prefix.py [--runs 5]
Reports, per model, tokens the server evaluated, requests and wall time per trial (median of the runs), and the
speed-up of the shared-prefix path. The issue asks for at least 3x.
"""

import argparse
import asyncio
import json
import time
from pathlib import Path

import pandas as pd

from benchmarks.common import machine, tokens_evaluated
from grace_dagster.llm import LLMClient
from grace_dagster.serving.process import EmbeddedServer
from grace_dagster.studies import STUDIES

MODELS = {"smollm2-135m": ("SmolLM2-135M-Instruct", True), "gemma3-270m": ("gemma-3-270m", False)}
UTTERANCES = [f"It {neg} {word}." for neg in ("was", "wasn't") for word in ("terrible", "bad", "good", "amazing")]


def trial_question(row) -> str:
    return (
        f"{row.Scenario}\nHere's how {row.speaker} actually felt about it, on a scale of 0 to 3 hearts: "
        f"{row.State} hearts. If {row.speaker} wanted to {row.Goal}, what would {row.speaker} be most likely to say?"
    )


async def one_trial(client: LLMClient, context: str, options: list[str], shared: bool, special: bool) -> int:
    prompts = [context + option for option in options]
    params = dict(max_tokens=1, temperature=0.0, prompt_logprobs=0, add_special_tokens=special)
    if shared:
        await client.complete(prompts, **params)
        return 1
    for prompt in prompts:
        await client.complete(prompt, **params)
    return len(prompts)


async def measure(slug: str, runs: int) -> list[dict]:
    served, chat = MODELS[slug]
    trials = STUDIES["study2"].load().head(runs)
    rows = []
    with EmbeddedServer(slug) as server:
        async with LLMClient(server.base_url, served) as client:
            for shared in (True, False):
                for trial in trials.itertuples():
                    question = trial_question(trial)
                    if chat:
                        context = await client.render_chat([{"role": "user", "content": question}])
                        suffix = (
                            await client.render_chat(
                                [{"role": "user", "content": question}, {"role": "assistant", "content": "X"}], False
                            )
                        )[len(context) + 1 :]
                        options = [u + suffix for u in UTTERANCES]
                    else:
                        context, options = question + "\nAnswer:", [f" {u}\n" for u in UTTERANCES]
                    before = tokens_evaluated(server.base_url)
                    start = time.perf_counter()
                    requests = await one_trial(client, context, options, shared, special=not chat)
                    seconds = time.perf_counter() - start
                    rows.append(
                        dict(
                            model=slug,
                            method="shared prefix" if shared else "one request per option",
                            requests=requests,
                            tokens_evaluated=tokens_evaluated(server.base_url) - before,
                            seconds=seconds,
                        )
                    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="trials per method and model (median reported)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/shared_prefix.json"))
    args = parser.parse_args()
    rows = [row for slug in MODELS for row in asyncio.run(measure(slug, args.runs))]
    table = pd.DataFrame(rows).groupby(["model", "method"]).median().reset_index()
    print(f"machine: {machine()}\nper trial, median of {args.runs} study-2 trials:\n")
    print(table.to_string(index=False))
    summary = {}
    for slug in MODELS:
        per = table[table.model == slug].set_index("method")
        ratio = per.loc["one request per option", "seconds"] / per.loc["shared prefix", "seconds"]
        summary[slug] = round(float(ratio), 2)
        print(f"{slug}: shared prefix is {ratio:.1f}x faster")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"machine": machine(), "runs": args.runs, "speedup": summary, "rows": rows}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
