"""The main command (`grace run`) as `make run` calls it, in a subprocess on a temporary instance and data directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dagster_dev import REPO, new_home


def grace_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DAGSTER_HOME": str(new_home(tmp_path / "home")), "GRACE_DATA_DIR": str(tmp_path / "data")}
    command = [sys.executable, "-m", "grace_dagster.cli", "run", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_main_command_prints_outputs_and_checks_and_runs_the_analysis(tmp_path):
    done = grace_run(
        tmp_path, "--models", "smollm2-135m", "--studies", "study2", "--experiments", "exp2", "--trials", "2"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = done.stdout[done.stdout.index("Summary") :]
    assert "smollm2-135m × study2: ok" in summary
    assert "exp2/probabilities: data" not in summary  # paths are where GRACE_DATA_DIR points
    assert f"exp2/probabilities: {tmp_path / 'data' / 'csv' / 'smollm2-135m_study2_probabilities.csv'}" in summary
    assert "analysis/study2:" in summary
    (row,) = [line for line in summary.splitlines() if line.strip().startswith("| smollm2-135m") and "exp2" in line]
    assert [cell.strip() for cell in row.split("|")][1:5] == ["smollm2-135m", "exp2", "2", "ok"]
    assert (tmp_path / "data" / "csv" / "analysis_study2.csv").exists()


def test_main_command_refuses_an_unknown_model_before_running_anything(tmp_path):
    done = grace_run(tmp_path, "--models", "no-such-model", "--trials", "2")
    assert done.returncode == 2
    assert "no-such-model" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "data" / "exp1").exists()
