"""The main command (`grace run`) as `make run` calls it, in a subprocess on a temporary instance and data directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from grace_dagster.cli import main
from tests.dagster_dev import REPO, new_home


def grace_run(tmp_path: Path, *args: str, **environment: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "DAGSTER_HOME": str(new_home(tmp_path / "home")),
        "GRACE_DATA_DIR": str(tmp_path / "data"),
        **environment,
    }
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


BAD_REGISTRY = "models:\n  - slug: x\n    kind: base\n    kind: instruct\n"
BAD_REGISTRY_MESSAGE = "invalid model registry:\n  line 4, field kind: given twice in one mapping (first on line 3)"


def test_grace_models_reports_a_bad_registry_without_a_traceback(tmp_path, capsys):
    registry = tmp_path / "bad.yaml"
    registry.write_text(BAD_REGISTRY)
    assert main(["models", "--registry", str(registry)]) == 2
    assert capsys.readouterr().err.startswith(f"grace models: {registry}: {BAD_REGISTRY_MESSAGE}")


def test_grace_run_reports_a_bad_registry_without_a_traceback(tmp_path, capsys, monkeypatch):
    registry = tmp_path / "bad.yaml"
    registry.write_text(BAD_REGISTRY)
    monkeypatch.setenv("GRACE_REGISTRY", str(registry))
    monkeypatch.setenv("DAGSTER_HOME", str(new_home(tmp_path / "home")))
    assert main(["run", "--trials", "2"]) == 2
    assert capsys.readouterr().err.startswith(f"grace run: {registry}: {BAD_REGISTRY_MESSAGE}")


def test_grace_run_names_the_studies_when_given_an_unknown_one(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["run", "--studies", "study3", "study2"])
    assert stopped.value.code == 2
    assert "grace run: error: argument --studies: no study 'study3'; the studies are study1, study2" in (
        capsys.readouterr().err
    )


def test_grace_run_on_a_bad_study_file_shows_its_problems_and_no_dagster_log(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "study2.csv").write_text("Scenario,Goal,State\nA scenario.,kindness,2\n")
    done = grace_run(tmp_path, "--models", "smollm2-135m", "--studies", "study2", GRACE_INPUT_DIR=str(inputs))
    assert done.returncode == 2
    assert done.stderr.endswith(
        f"grace run: {inputs / 'study2.csv'}: 1 problem(s) in the study input; fix the file and rerun (nothing was "
        "written and no model was asked):\n"
        "  row 1, line 2, column 'Goal': expected one of informative, social, both; got 'kindness'\n"
    )
    assert "Traceback" not in done.stderr and "STEP_FAILURE" not in done.stderr, done.stderr
    assert not (tmp_path / "data").exists(), "nothing was written"
