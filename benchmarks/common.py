"""Helpers shared by the benchmarks: machine description, server metrics, medians."""

import contextlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def server_counter(base_url: str, name: str) -> float | None:
    """One counter of the embedded server's /metrics; None from a server that does not count it (an earlier commit)."""
    found = re.search(rf"^{name} (\S+)$", httpx.get(f"{base_url}/metrics").text, re.M)
    return float(found.group(1)) if found else None


def tokens_evaluated(base_url: str) -> float:
    return server_counter(base_url, "grace_server_tokens_evaluated_total")


def load_note(start: tuple[float, float, float]) -> str:
    """The machine's load around a run (other processes share its cores): 1-minute load average before and after."""
    end = os.getloadavg()
    return f"1-min load average {start[0]:.1f} before, {end[0]:.1f} after, on {os.cpu_count()} cores"


@contextlib.contextmanager
def commit_tree(rev: str) -> Iterator[Path]:
    """A work tree of an earlier commit, to run the code before a change next to the code after it. Modules run with
    `python -m` from it import its own `grace_dagster` (the working directory comes first on sys.path)."""
    path = Path(tempfile.mkdtemp(prefix="grace-before-"))
    subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], cwd=REPO, check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, check=False)
        shutil.rmtree(path, ignore_errors=True)
