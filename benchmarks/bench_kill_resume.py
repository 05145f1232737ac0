"""Kill and resume at a larger size: Experiment 1 and Experiment 2 on 100 study 2 trials of one model, each run
killed twice at random points (SIGKILL to the whole `dagster asset materialize` process group) and then resumed to
the end.

Counted: trials, answers (Experiment 1 samples, Experiment 2 questions) and rows in the table, and rows that appear
twice; records and duplicate keys in the checkpoint; and the requests the server answered against the requests the
partition needs. A request in flight at a kill is lost with the run and
asked again on resume, so at most the client's concurrency per kill can be repeated; nothing finished is.

    .venv/bin/python -m benchmarks.bench_kill_resume --trials 100
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import pandas as pd
from dagster import DagsterInstance

from benchmarks.common import machine
from grace_dagster.assets import exp1_responses, exp2_probabilities
from grace_dagster.serving.process import EmbeddedServer
from tests import pipeline
from tests.dagster_dev import new_home

RESULTS = Path(__file__).with_name("results") / "kill_resume.json"
MODEL, STUDY = "smollm2-135m", "study2"
ROUTES = {"exp1": "/v1/chat/completions", "exp2": "/v1/completions"}
ASSETS = {"exp1": exp1_responses, "exp2": exp2_probabilities}


def one_experiment(name: str, asset, trials: int, rng: random.Random, work: Path, server: EmbeddedServer) -> dict:
    home, data = new_home(work / name / "home"), work / name / "data"
    instance = DagsterInstance.local_temp(tempdir=str(home))
    res = pipeline.resources(work / name, trial_limit=trials, max_tokens=32, base_urls={MODEL: server.base_url})
    pipeline.prepare(instance, res, [MODEL], studies=(STUDY,))
    checkpoint = data / "checkpoints" / name / MODEL / f"{STUDY}.jsonl"
    config = {
        "resources": {
            "settings": {"config": {"trial_limit": trials, "max_tokens": 32}},
            "llm": {"config": {"base_urls": {MODEL: server.base_url}}},
        }
    }
    route = ROUTES[name]

    def answered() -> int:
        """Requests the server has answered on the experiment's route (successfully)."""
        return int(pipeline.server_counter(server.base_url, "grace_server_requests_total", code="200", route=route))

    start = answered()
    kills = []
    for _ in range(2):
        before = len(pipeline.checkpoint_records(checkpoint))
        target = before + rng.randint(5, max(6, trials // 3))
        pipeline.kill_part_way(
            home,
            data,
            asset.key.to_user_string(),
            f"{MODEL}|{STUDY}",
            config,
            lambda target=target: len(pipeline.checkpoint_records(checkpoint)) >= target,  # noqa: E731
        )
        kills.append(len(pipeline.checkpoint_records(checkpoint)))
    result = pipeline.run(instance, res, asset.key, MODEL, STUDY)
    meta = pipeline.metadata(result, asset.key)
    records = pipeline.checkpoint_records(checkpoint)
    keys = [r["key"] for r in records]
    needed = meta.get("distinct_questions", trials)
    answered_here = answered() - start
    table = pd.read_parquet(
        data / name / ("responses" if name == "exp1" else "probabilities") / MODEL / f"{STUDY}.parquet"
    )
    # A row is one answer (Experiment 1: trial × sample) or one written form of one option (Experiment 2).
    row_key = ["trial_id", "sample"] if name == "exp1" else ["trial_id", "question", "variant"]
    answers = table.drop_duplicates(["trial_id", "question"]) if name == "exp2" else table
    return {
        "succeeded": result.success,
        "checkpoint_records_at_each_kill": kills,
        "resume_cache_hits": meta["cache_hits"],
        "resume_requests_made": meta["requests_made"],
        "trials": int(table["trial_id"].nunique()),
        "answers": len(answers),
        "rows": len(table),
        "duplicate_rows": int(table.duplicated(row_key).sum()),
        "checkpoint_records": len(records),
        "checkpoint_duplicate_keys": len(keys) - len(set(keys)),
        "requests_needed": needed,
        "requests_answered_by_the_server": answered_here,
        "requests_repeated": answered_here - needed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--experiments", nargs="+", choices=list(ASSETS), default=list(ASSETS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="grace-kill-") as tmp, EmbeddedServer(MODEL, log_dir=Path(tmp)) as server:
        # Each experiment draws its kill points from its own generator, so one can be run again alone.
        figures = {
            name: one_experiment(name, ASSETS[name], args.trials, random.Random(args.seed + i), Path(tmp), server)
            for i, name in enumerate(ASSETS)
            if name in args.experiments
        }
    result = {
        "machine": machine(),
        "command": f"python -m benchmarks.bench_kill_resume --trials {args.trials} --seed {args.seed}",
        "model": MODEL,
        "study": STUDY,
        "trials": args.trials,
    }
    earlier = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if all(earlier.get(k) == result[k] for k in ("command", "model", "study", "trials")):
        result |= {name: earlier[name] for name in ASSETS if name in earlier}  # the experiments not run this time
    result |= figures
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
