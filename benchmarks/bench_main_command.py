"""Wall time of the main command (`grace run`, the quick profile by default) from an empty instance and data
directory, as `make run` runs it once installed: both local models, both studies, both experiments, structured
extraction, checks and analysis. The issue's target is about 15 minutes on a 2-core machine.

    .venv/bin/python -m benchmarks.bench_main_command --runs 3
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "main_command.json"


def one_run(extra: list[str]) -> tuple[float, str]:
    with tempfile.TemporaryDirectory(prefix="grace-bench-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
        env = {**os.environ, "DAGSTER_HOME": str(home), "GRACE_DATA_DIR": str(Path(tmp) / "data")}
        start = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "grace_dagster.cli", "run", *extra],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        elapsed = time.monotonic() - start
        summary = done.stdout[done.stdout.find("Summary") :]
        if done.returncode != 0:
            raise SystemExit(f"grace run exited {done.returncode}:\n{done.stderr[-3000:]}")
        return elapsed, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("args", nargs="*", help="extra arguments for `grace run` (default: the quick profile)")
    args = parser.parse_args()
    times, summary = [], ""
    for i in range(args.runs):
        elapsed, summary = one_run(args.args)
        times.append(elapsed)
        print(f"run {i + 1}/{args.runs}: {elapsed / 60:.1f} min", flush=True)
    result = {
        "machine": machine(),
        "command": "grace run " + " ".join(args.args),
        "runs_s": [round(t, 1) for t in times],
        "median_s": round(statistics.median(times), 1),
        "last_summary": summary,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "last_summary"}, indent=2))


if __name__ == "__main__":
    main()
