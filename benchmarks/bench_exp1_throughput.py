"""Experiment 1 throughput: rows per second through the asset vs a bare async loop, same prompts, same server.

Run: .venv/bin/python benchmarks/bench_exp1_throughput.py [--trials 16] [--repeats 3]
One embedded server serves both; each repeat runs the bare loop and the asset on a fresh checkpoint. Reports the
median rows/s of each and their ratio (the issue's target: at least 0.9), for the asset's own body (duration_s in
its metadata) and for the whole Dagster run (materialize() call, including run start-up).
"""

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from dagster import DagsterInstance, MultiPartitionKey, materialize

from benchmarks.common import machine
from grace_dagster.assets import exp1_responses, study_trials
from grace_dagster.assets.common import trial_seed
from grace_dagster.llm import LLMClient, prompting
from grace_dagster.resources import ExperimentSettings, LLMEndpoints, Storage
from grace_dagster.serving.process import EmbeddedServer
from grace_dagster.studies import STUDIES

SLUG, SERVED, STUDY = "smollm2-135m", "SmolLM2-135M-Instruct", "study2"


async def bare_loop(base_url: str, settings: ExperimentSettings) -> float:
    trials = settings.subset(STUDIES[STUDY].load())
    start = time.perf_counter()
    async with LLMClient(base_url, SERVED, max_concurrency=4) as client:
        await asyncio.gather(
            *(
                prompting.generate_answer(
                    client,
                    "instruct",
                    [{"role": "user", "content": STUDIES[STUDY].exp1_prompts(t)[0]}],  # study 2 has one turn
                    max_tokens=settings.max_tokens,
                    temperature=settings.temperature,
                    seed=trial_seed(settings.seed, t.trial_id),  # the asset's first turn uses this seed
                )
                for t in trials.itertuples(index=False)
            )
        )
    return len(trials) / (time.perf_counter() - start)


def through_asset(base_url: str, settings: ExperimentSettings) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as data_dir:
        res = {
            "storage": Storage(data_dir=data_dir),
            "llm": LLMEndpoints(base_urls={SLUG: base_url}),
            "settings": settings,
        }
        instance = DagsterInstance.ephemeral()
        instance.add_dynamic_partitions("model", [SLUG])
        materialize([study_trials], partition_key=STUDY, resources=res, instance=instance)
        start = time.perf_counter()
        result = materialize(
            [exp1_responses],
            partition_key=MultiPartitionKey({"model": SLUG, "study": STUDY}),
            resources=res,
            instance=instance,
        )
        run_seconds = time.perf_counter() - start
        meta = result.asset_materializations_for_node("exp1__responses")[0].metadata
        assert meta["requests_made"].value == settings.trial_limit
        return settings.trial_limit / meta["duration_s"].value, settings.trial_limit / run_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/exp1_throughput.json"))
    args = parser.parse_args()
    settings = ExperimentSettings(trial_limit=args.trials, max_tokens=args.max_tokens)
    bare, body, run = [], [], []
    with EmbeddedServer(SLUG) as server:
        asyncio.run(bare_loop(server.base_url, ExperimentSettings(trial_limit=2, max_tokens=4)))  # warm-up
        for _ in range(args.repeats):
            bare.append(asyncio.run(bare_loop(server.base_url, settings)))
            asset_body, asset_run = through_asset(server.base_url, settings)
            body.append(asset_body)
            run.append(asset_run)
    summary = {
        "machine": machine(),
        "model": SLUG,
        "study": STUDY,
        "trials": args.trials,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "bare_rows_per_s": statistics.median(bare),
        "asset_body_rows_per_s": statistics.median(body),
        "asset_run_rows_per_s": statistics.median(run),
    }
    summary["ratio_asset_body"] = round(summary["asset_body_rows_per_s"] / summary["bare_rows_per_s"], 3)
    summary["ratio_whole_run"] = round(summary["asset_run_rows_per_s"] / summary["bare_rows_per_s"], 3)
    print(json.dumps(summary, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**summary, "runs": {"bare": bare, "asset_body": body, "asset_run": run}}, indent=2))


if __name__ == "__main__":
    main()
