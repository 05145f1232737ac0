"""The study_trials asset: validates, writes atomically, and never replaces a good output with a bad one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
from dagster import DagsterInstance, materialize

from grace_dagster.assets import study_trials
from grace_dagster.resources import Storage
from grace_dagster.studies import STUDIES

REPO = Path(__file__).resolve().parents[1]


def _materialize(storage: Storage, study: str):
    return materialize(
        [study_trials],
        partition_key=study,
        resources={"storage": storage},
        instance=DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


def test_materializes_both_studies_with_row_counts_and_preview(tmp_path):
    storage = Storage(data_dir=str(tmp_path))
    for name, study in STUDIES.items():
        result = _materialize(storage, name)
        assert result.success
        meta = result.asset_materializations_for_node("study_trials")[0].metadata
        assert meta["rows"].value == study.full_size
        assert "trial_id" in meta["preview"].value
        written = pd.read_parquet(storage.trials_path(study))
        assert len(written) == study.full_size


def test_bad_input_fails_before_writing_and_keeps_the_good_output(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(STUDIES["study2"].sample_path, inputs / "study2.csv")
    storage = Storage(data_dir=str(tmp_path / "data"), input_dir=str(inputs))
    assert _materialize(storage, "study2").success
    output = storage.trials_path(STUDIES["study2"])
    good = output.read_bytes()

    lines = (inputs / "study2.csv").read_text().splitlines()
    lines[5] = (
        lines[5]
        .replace(",social,", ",kindness,")
        .replace(",informative,", ",kindness,")
        .replace(",both,", ",kindness,")
    )
    (inputs / "study2.csv").write_text("\n".join(lines) + "\n")
    result = _materialize(storage, "study2")
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = failure.step_failure_data.error.cause.message
    assert "study2.csv" in message and "row 5" in message and "'Goal'" in message, message
    assert output.read_bytes() == good
    assert not [p for p in output.parent.iterdir() if p.name.endswith(".tmp")], "no temporary file left behind"


def test_definitions_validate_from_the_workspace(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO,
        env={**os.environ, "DAGSTER_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Validation successful" in result.stdout + result.stderr
