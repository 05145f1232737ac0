"""The judge's greedy JSON through the embedded server, against the server of an earlier commit, in one run.

    .venv/bin/python -m benchmarks.bench_json_sampling --before 29a5399 [--replies 32] [--rounds 3]

For each local judge model (registry role `judge`, embedded serving), the first `--replies` hand-labelled replies of
tests/fixtures/judge_labels.csv become the judge's own requests (`extraction.judge_messages`, the JSON schema the
server enforces with a grammar, greedy, the judge's token limit), sent four at a time to the embedded server of this
tree and of REV, each freshly started for each round, the two alternating. Reported per server: the median over the
rounds of the wall time and of the generated tokens per second (the prompts' evaluation is in the wall time, so the
ratio of wall times is what a run of the judge gains). Greedy decoding under the same grammar must give the same JSON
on both servers; the number of replies whose JSON differs is reported (0 expected).
Results: benchmarks/results/json_sampling.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys

from benchmarks.bench_embedded_server import embedded, post_all
from benchmarks.common import REPO, commit_tree, load_note, machine
from grace_dagster.llm import extraction
from grace_dagster.registry import load_registry
from tests.judge_labels import load_labels

RESULTS = REPO / "benchmarks" / "results" / "json_sampling.json"
CONCURRENCY = 4


def judge_bodies(served: str, replies: int) -> list[dict]:
    bodies = []
    for label in load_labels()[:replies]:
        answer = label.turn.answer
        bodies.append(
            {
                "model": served,
                "messages": extraction.judge_messages(answer, label.turn.task, label.question, label.reply),
                "response_format": extraction.response_format(extraction.judge_schema(answer), answer.__name__),
                "max_tokens": extraction.JUDGE_MAX_TOKENS,
                "temperature": 0.0,
                "seed": label.seed,
            }
        )
    return bodies


async def ask_all(url: str, bodies: list[dict]) -> tuple[float, int, list[str]]:
    seconds, replies = await post_all(url, bodies, CONCURRENCY, "/v1/chat/completions")
    tokens = sum(reply["usage"]["completion_tokens"] for reply in replies)
    return seconds, tokens, [reply["choices"][0]["message"]["content"] for reply in replies]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, metavar="REV", help="the commit whose server to compare with")
    parser.add_argument("--replies", type=int, default=32, help="labelled replies the judge reads per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    judges = [m for m in load_registry().models if "judge" in m.roles and m.serving.backend == "embedded"]
    load = os.getloadavg()
    result = {
        "machine": machine(),
        "command": "python -m benchmarks.bench_json_sampling " + " ".join(sys.argv[1:]),
        "replies": args.replies,
        "concurrency": CONCURRENCY,
        "models": {},
    }
    with commit_tree(args.before) as before:
        trees = {"embedded": REPO, f"embedded@{args.before}": before}
        for model in judges:
            bodies = judge_bodies(model.served_name, args.replies)
            runs: dict[str, list[tuple[float, int]]] = {name: [] for name in trees}
            contents: dict[str, list[str]] = {}
            for round_ in range(args.rounds):
                for name, tree in trees.items():
                    with embedded(model.slug, tree, parallel=True) as url:
                        seconds, tokens, contents[name] = asyncio.run(ask_all(url, bodies))
                    runs[name].append((seconds, tokens))
                    print(f"{model.slug} round {round_ + 1} {name}: {seconds:.1f} s, {tokens / seconds:.1f} tokens/s")
            out = {
                name: {
                    "seconds": [round(s, 2) for s, _ in times],
                    "completion_tokens": times[0][1],
                    "median_seconds": round(statistics.median(s for s, _ in times), 2),
                    "median_tokens_per_s": round(statistics.median(n / s for s, n in times), 1),
                }
                for name, times in runs.items()
            }
            new, old = out["embedded"], out[f"embedded@{args.before}"]
            out["wall_time_ratio"] = round(new["median_seconds"] / old["median_seconds"], 3)
            out["tokens_per_s_ratio"] = round(new["median_tokens_per_s"] / old["median_tokens_per_s"], 2)
            first, second = contents.values()
            out["replies_with_different_json"] = sum(a != b for a, b in zip(first, second))
            result["models"][model.slug] = out
    result["load"] = load_note(load)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({slug: {k: v for k, v in m.items() if "ratio" in k} for slug, m in result["models"].items()}))


if __name__ == "__main__":
    main()
