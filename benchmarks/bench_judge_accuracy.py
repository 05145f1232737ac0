"""The judge's accuracy on hand-labelled replies: real replies of the local models that the parser cannot read
(rambling, partial, refusals), each with the reading a person gave it (tests/fixtures/judge_labels.csv).

Reported: how many rows the judge decided (gave an answer) and how often that answer is the person's; how often it
abstained ("not answered") where the person found no answer, and where the person did find one.

    .venv/bin/python -m benchmarks.bench_judge_accuracy                 # the default judge (settings.judge_model)
    .venv/bin/python -m benchmarks.bench_judge_accuracy --judge smollm2-135m
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path

from grace_dagster.llm import LLMClient, extraction
from grace_dagster.registry import load_registry
from grace_dagster.resources import ExperimentSettings
from grace_dagster.serving.process import EmbeddedServer
from tests.judge_labels import NOT_ANSWERED, load_labels

RESULTS = Path(__file__).with_name("results") / "judge_accuracy.json"


async def read_all(base_url: str, served_name: str, labels: list) -> list[extraction.Extraction]:
    async with LLMClient(base_url, served_name, max_concurrency=2) as client:
        return await asyncio.gather(
            *(
                extraction.judge(client, row.turn.answer, row.turn.task, row.question, row.reply, 3, seed=row.seed)
                for row in labels
            )
        )


def score(labels: list, readings: list[extraction.Extraction]) -> dict:
    decided = [(row, found) for row, found in zip(labels, readings) if found.method == "judge"]
    abstained = [
        (row, found) for row, found in zip(labels, readings) if extraction.NOT_ANSWERED in (found.reason or "")
    ]
    right = [row for row, found in decided if row.label != NOT_ANSWERED and row.fields(found.values) == row.label]
    unanswerable = [row for row in labels if row.label == NOT_ANSWERED]
    return {
        "rows": len(labels),
        "labelled_answered": len(labels) - len(unanswerable),
        "labelled_not_answered": len(unanswerable),
        "judge_decided": len(decided),
        "judge_decided_correctly": len(right),
        "accuracy_on_decided_rows": round(len(right) / len(decided), 3) if decided else None,
        "decided_where_the_person_found_no_answer": sum(row.label == NOT_ANSWERED for row, _ in decided),
        "judge_abstained": len(abstained),
        "abstained_where_the_person_found_no_answer": sum(row.label == NOT_ANSWERED for row, _ in abstained),
        "judge_failed_otherwise": len(labels) - len(decided) - len(abstained),
        "agreement_overall": round(
            (len(right) + sum(row.label == NOT_ANSWERED for row, _ in abstained)) / len(labels), 3
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judge", default=ExperimentSettings().judge_model, help="registry slug of the judge")
    args = parser.parse_args()
    labels = load_labels()
    model = load_registry().get(args.judge)
    start = time.perf_counter()
    with EmbeddedServer(model.slug) as server:
        readings = asyncio.run(read_all(server.base_url, model.served_name, labels))
    result = {
        "judge": model.slug,
        "machine": f"{platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
        "seconds": round(time.perf_counter() - start, 1),
        **score(labels, readings),
        "rows_detail": [
            {"id": row.id, "label": row.label, "judge": found.values if found.method == "judge" else found.reason}
            for row, found in zip(labels, readings)
        ],
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows_detail"}, indent=2))


if __name__ == "__main__":
    main()
