"""Helpers for tests that run the real pipeline: resources on a temporary data directory, partitions, runs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from dagster import DagsterInstance, MultiPartitionKey, materialize

from grace_dagster.assets import ALL_ASSETS, ALL_CHECKS, study_trials
from grace_dagster.resources import ExperimentSettings, LLMEndpoints, Storage


def resources(tmp_path: Path, trial_limit: int = 4, max_tokens: int = 24, **llm) -> dict:
    return {
        "storage": Storage(data_dir=str(tmp_path / "data")),
        "llm": LLMEndpoints(log_dir=str(tmp_path / "logs"), **llm),
        "settings": ExperimentSettings(trial_limit=trial_limit, max_tokens=max_tokens),
    }


def key(model: str, study: str) -> MultiPartitionKey:
    return MultiPartitionKey({"model": model, "study": study})


def prepare(instance: DagsterInstance, res: dict, models: list[str], studies=("study1", "study2")) -> None:
    """Register the models' partitions and validate the study inputs."""
    instance.add_dynamic_partitions("model", models)
    for study in studies:
        assert materialize([study_trials], partition_key=study, resources=res, instance=instance).success


def run(instance: DagsterInstance, res: dict, asset_key, model: str, study: str, raise_on_error: bool = False):
    """Materialize one asset's partition with its checks, as the UI does for a single asset."""
    return materialize(
        [*ALL_ASSETS, *ALL_CHECKS],
        selection=[asset_key],
        partition_key=key(model, study),
        resources=res,
        instance=instance,
        raise_on_error=raise_on_error,
    )


def metadata(result, asset_key) -> dict:
    (materialization,) = [m for m in result.get_asset_materialization_events() if m.asset_key == asset_key]
    return {k: v.value for k, v in materialization.materialization.metadata.items()}


REPO = Path(__file__).resolve().parents[1]


def checkpoint_records(path: Path) -> list[dict]:
    """The complete lines of a checkpoint file (a run killed mid-write may leave a torn last line)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def kill_part_way(home: Path, data: Path, select: str, partition: str, config: dict, ready) -> None:
    """Materialize `select` for `partition` in a real `dagster asset materialize` process (as a run launched from a
    terminal) and SIGKILL its whole process group once `ready()` is true: the run dies mid-partition."""
    env = {**os.environ, "DAGSTER_HOME": str(home), "GRACE_DATA_DIR": str(data)}
    command = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "grace_dagster.definitions"]
    command += ["--select", select, "--partition", partition, "--config-json", json.dumps(config)]
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 600
    while not ready() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def server_counter(base_url: str, name: str, **labels: str) -> float:
    """One counter of a model server's `/metrics` (0 until it is first counted)."""
    label_text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    series = f"{name}{{{label_text}}}" if labels else name
    found = re.search(rf"^{re.escape(series)} (\S+)$", httpx.get(f"{base_url}/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0
