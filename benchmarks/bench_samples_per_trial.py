"""Wall time of the quick profile with several Experiment 1 samples per trial against one, in one invocation.

Each configuration is `grace run` (both local models, both studies, both experiments, structured extraction,
checks and analysis) from an empty instance and data directory, as `make run` runs it once installed, with
GRACE_SAMPLES_PER_TRIAL set. Reported: the whole command's wall time, each asset's own duration summed over its
partitions (from the instance: the time between a step's start and its end), the ratios between configurations,
and the load average while each ran (other work on the machine slows both). The last configuration's outputs
(analysis CSVs and plots) are copied next to the results, and its instance and data are kept with `--keep`.

    .venv/bin/python -m benchmarks.bench_samples_per_trial --samples 1 5
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from dagster import DagsterEventType, DagsterInstance

from benchmarks.common import machine

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def step_durations(home: Path) -> dict[str, float]:
    """Seconds each step took (its start to its success or failure), summed over the runs; checks are steps too."""
    instance = DagsterInstance.from_config(str(home))
    ends = {DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE}
    totals: dict[str, float] = defaultdict(float)
    for run in instance.get_runs():
        started = {}
        for entry in instance.all_logs(run.run_id, of_type={DagsterEventType.STEP_START, *ends}):
            if entry.dagster_event_type == DagsterEventType.STEP_START:
                started[entry.step_key] = entry.timestamp
            elif entry.step_key in started:
                totals[entry.step_key] += entry.timestamp - started.pop(entry.step_key)
    instance.dispose()
    return {step: round(seconds, 1) for step, seconds in sorted(totals.items())}


def one_run(samples: int, workdir: Path, extra: list[str]) -> dict:
    home, data = workdir / "home", workdir / "data"
    home.mkdir(parents=True)
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "GRACE_DATA_DIR": str(data),
        "GRACE_SAMPLES_PER_TRIAL": str(samples),
    }
    subprocess.run(
        [sys.executable, "-m", "dagster", "instance", "concurrency", "set", "llm-endpoints", "1"],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    load_before = os.getloadavg()[0]
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "grace_dagster.cli", "run", *extra], cwd=REPO, env=env, capture_output=True, text=True
    )
    elapsed = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"grace run (samples {samples}) exited {done.returncode}:\n{done.stderr[-3000:]}")
    return {
        "samples_per_trial": samples,
        "wall_s": round(elapsed, 1),
        "load_average_1min_at_start": round(load_before, 2),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "steps_s": step_durations(home),
        "summary": done.stdout[done.stdout.find("Summary") :],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 5], help="configurations, run in this order")
    parser.add_argument("--keep", type=Path, help="keep the last configuration's instance and data here")
    parser.add_argument("args", nargs="*", help="extra arguments for `grace run` (default: the quick profile)")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="grace-bench-samples-") as tmp:
        for samples in args.samples:
            workdir = Path(tmp) / f"samples-{samples}"
            run = one_run(samples, workdir, args.args)
            runs.append(run)
            print(f"samples_per_trial {samples}: {run['wall_s'] / 60:.1f} min", flush=True)
        last = Path(tmp) / f"samples-{args.samples[-1]}"
        outputs = RESULTS / f"quick_profile_samples{args.samples[-1]}"
        shutil.rmtree(outputs, ignore_errors=True)
        outputs.mkdir(parents=True)
        for path in sorted((last / "data" / "csv").glob("analysis_*.csv")) + sorted(
            (last / "data" / "analysis").glob("*.png")
        ):
            shutil.copy(path, outputs / path.name)
        if args.keep:
            shutil.rmtree(args.keep, ignore_errors=True)
            shutil.copytree(last, args.keep)
    base = runs[0]
    steps = sorted({s for r in runs for s in r["steps_s"]})
    result = {
        "machine": machine(),
        "command": "grace run " + " ".join(args.args),
        "runs": [{k: v for k, v in r.items() if k != "summary"} for r in runs],
        "wall_ratio_to_first": {r["samples_per_trial"]: round(r["wall_s"] / base["wall_s"], 2) for r in runs},
        "step_ratio_to_first": {
            step: {
                r["samples_per_trial"]: round(r["steps_s"][step] / base["steps_s"][step], 2)
                for r in runs
                if step in r["steps_s"] and base["steps_s"].get(step)
            }
            for step in steps
        },
        "last_summary": runs[-1]["summary"],
    }
    out = RESULTS / "samples_per_trial.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("last_summary", "runs")}, indent=2))


if __name__ == "__main__":
    main()
