"""Wall time of the main command (`grace run`, the quick profile by default) from an empty instance and data
directory, as `make run` runs it once installed: both local models, both studies, both experiments, structured
extraction, checks and analysis.

    .venv/bin/python -m benchmarks.bench_main_command --runs 3
    .venv/bin/python -m benchmarks.bench_main_command --runs 3 --before REV   # and the commit REV, runs alternating

With --before, each round runs the earlier commit then this tree, so drift in the machine's speed falls on both.
"""

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, commit_tree, load_note, machine

RESULTS = REPO / "benchmarks" / "results" / "main_command.json"


def one_run(tree: Path, extra: list[str]) -> tuple[float, str]:
    with tempfile.TemporaryDirectory(prefix="grace-bench-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        shutil.copy(tree / "dagster.yaml", home / "dagster.yaml")
        env = {**os.environ, "DAGSTER_HOME": str(home), "GRACE_DATA_DIR": str(Path(tmp) / "data")}
        start = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "grace_dagster.cli", "run", *extra],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
        )
        elapsed = time.monotonic() - start
        summary = done.stdout[done.stdout.find("Summary") :]
        if done.returncode != 0:
            raise SystemExit(f"grace run in {tree} exited {done.returncode}:\n{done.stderr[-3000:]}")
        return elapsed, summary


def timings(times: list[float]) -> dict:
    return {"runs_s": [round(t, 1) for t in times], "median_s": round(statistics.median(times), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--before", metavar="REV", help="also time the main command of this earlier commit")
    parser.add_argument("args", nargs="*", help="extra arguments for `grace run` (default: the quick profile)")
    args = parser.parse_args()
    load = os.getloadavg()
    trees = {"after": REPO}
    before_times, times, summary = [], [], ""
    with contextlib.ExitStack() as stack:
        if args.before:
            trees = {"before": stack.enter_context(commit_tree(args.before)), **trees}
        for i in range(args.runs):
            for name, tree in trees.items():
                elapsed, text = one_run(tree, args.args)
                (before_times if name == "before" else times).append(elapsed)
                summary = text if name == "after" else summary
                print(f"run {i + 1}/{args.runs} ({name}): {elapsed / 60:.1f} min", flush=True)
    result = {
        "machine": machine(),
        "command": "python -m benchmarks.bench_main_command " + " ".join(sys.argv[1:]),
        "grace_run": "grace run " + " ".join(args.args),
        **timings(times),
    }
    if args.before:
        result["before"] = {"commit": args.before, **timings(before_times)}
        result["after_over_before"] = round(result["median_s"] / result["before"]["median_s"], 3)
    result["load"] = load_note(load)
    result["last_summary"] = summary
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "last_summary"}, indent=2))


if __name__ == "__main__":
    main()
