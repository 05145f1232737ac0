"""Exact option scoring: one request per question sharing the context (the asset's method) vs the naive method,
one request per option with its full context.

Run: .venv/bin/python -m benchmarks.bench_option_scoring [--trials 5]
For both local models and both studies, reports per trial the requests made, the tokens the server evaluated
(from its /metrics) and the wall time, as medians over the trials, and the speed-up. Study 2 has one question of
8 options per trial; study 1 has 4 questions of 11 options and one of 2.
"""

import argparse
import asyncio
import json
import time
from pathlib import Path

import pandas as pd

from benchmarks.common import machine, tokens_evaluated
from grace_dagster.llm import LLMClient
from grace_dagster.llm.prompting import OptionScorer
from grace_dagster.registry import load_registry
from grace_dagster.serving.process import EmbeddedServer
from grace_dagster.studies import STUDIES

MODELS = ["smollm2-135m", "gemma3-270m"]


async def naive(client: LLMClient, scorer: OptionScorer, messages, options) -> None:
    context, continuations = await scorer.context_and_options(messages, options)
    special = scorer.kind == "base"
    for continuation in continuations:
        await client.complete(context + continuation, max_tokens=1, prompt_logprobs=0, add_special_tokens=special)


async def measure(slug: str, study_name: str, trials: int) -> list[dict]:
    model = load_registry().get(slug)
    study = STUDIES[study_name]
    rows = []
    with EmbeddedServer(slug) as server:
        async with LLMClient(server.base_url, model.served_name) as client:
            scorer = OptionScorer(client, model.kind)
            if model.kind == "instruct":
                await scorer.chat_replies()  # learned once per model, as in the asset
            for method in ("shared prefix", "one request per option"):
                for trial in study.load().head(trials).itertuples(index=False):
                    before, start, requests = (
                        tokens_evaluated(server.base_url),
                        time.perf_counter(),
                        client.stats.requests,
                    )
                    for question in study.exp2_questions(trial):
                        if method == "shared prefix":
                            await scorer.score(question.messages, question.options)
                        else:
                            await naive(client, scorer, question.messages, question.options)
                    rows.append(
                        dict(
                            model=slug,
                            study=study_name,
                            method=method,
                            requests=client.stats.requests - requests,
                            tokens_evaluated=tokens_evaluated(server.base_url) - before,
                            seconds=time.perf_counter() - start,
                        )
                    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=5, help="trials per study, method and model (medians)")
    parser.add_argument("--studies", nargs="*", default=list(STUDIES))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/option_scoring.json"))
    args = parser.parse_args()
    rows = [row for slug in MODELS for name in args.studies for row in asyncio.run(measure(slug, name, args.trials))]
    table = pd.DataFrame(rows).groupby(["model", "study", "method"]).median().reset_index()
    print(f"machine: {machine()}\nper trial, median of {args.trials} trials:\n")
    print(table.to_string(index=False))
    speedups = {}
    for (slug, study), per in table.groupby(["model", "study"]):
        per = per.set_index("method")
        ratio = per.loc["one request per option", "seconds"] / per.loc["shared prefix", "seconds"]
        speedups[f"{slug} {study}"] = round(float(ratio), 2)
        print(f"{slug} {study}: shared prefix is {ratio:.1f}x faster")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"machine": machine(), "trials": args.trials, "speedup": speedups, "rows": rows}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
