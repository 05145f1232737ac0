"""An API key set in the environment appears nowhere the platform writes: event logs, metadata, compute logs, server
logs, outputs, checkpoints, the archive, the rendered manifests, nor the environment of the model servers a run
starts.

The run uses an external judge (registry backend `external`, the key from an environment variable) whose URL is a
real embedded server that, like a hosted API, answers only requests carrying the key (`grace serve --api-key-env`) and,
like DeepSeek's API, accepts `response_format` `json_object` only and refuses `json_schema`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml
from dagster import DagsterInstance, materialize

from grace_dagster.assets import ALL_ASSETS, ALL_CHECKS, exp1_responses, exp1_structured
from grace_dagster.registry.loader import DEFAULT_REGISTRY_PATH
from grace_dagster.resources import ExperimentSettings, LLMEndpoints
from grace_dagster.serving.process import EmbeddedServer
from grace_dagster.serving.vllm import vllm_environment
from tests import pipeline
from tests.dagster_dev import REPO

MODEL = "smollm2-135m"
SECRET = "sk-grace-test-7f3a9c2e5b1d4068"


def _external_judge_registry(path: Path, base_url: str) -> None:
    raw = yaml.safe_load(Path(DEFAULT_REGISTRY_PATH).read_text())
    raw["models"].append(
        {
            "slug": "hosted-judge",
            "served_name": "SmolLM2-135M-Instruct",
            "kind": "instruct",
            "roles": ["judge"],
            "weights": {"source": "api", "provider": "test"},
            "serving": {"backend": "external", "base_url": base_url, "api_key_env": "GRACE_TEST_JUDGE_KEY"},
            "resources": {"gpus": 0, "cpu": 0, "memory_gib": 0, "storage_gib": 0},
        }
    )
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def _files_holding(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.mark.slow
def test_an_api_key_appears_nowhere_the_platform_writes(tmp_path, monkeypatch, request):
    monkeypatch.setenv("GRACE_TEST_JUDGE_KEY", SECRET)
    # The hosted judge behaves as DeepSeek's API: it answers only requests that carry the key (so the run's judge
    # requests did), and it refuses json_schema (the judge's request shape for the external backend is json_object,
    # the schema in the instructions).
    hosted = EmbeddedServer(
        MODEL,
        log_dir=tmp_path / "hosted-logs",
        env={"HOSTED_API_KEY": SECRET},
        args=["--structured-output", "json_object", "--api-key-env", "HOSTED_API_KEY"],
    )
    hosted.start()
    request.addfinalizer(hosted.stop)
    chat = {
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 4,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
    }
    assert httpx.post(f"{hosted.base_url}/v1/chat/completions", json=chat).status_code == 401, "no key, no answer"
    refused = httpx.post(
        f"{hosted.base_url}/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {SECRET}"}
    )
    assert refused.status_code == 400 and "json_schema is not supported" in refused.json()["error"]["message"]
    registry = tmp_path / "models.yaml"
    _external_judge_registry(registry, hosted.base_url)
    home = tmp_path / "home"
    home.mkdir()
    instance = DagsterInstance.local_temp(tempdir=str(home))  # event logs and compute logs under home
    res = pipeline.resources(tmp_path, trial_limit=2, max_tokens=8)
    res["llm"] = LLMEndpoints(log_dir=str(tmp_path / "logs"), registry_path=str(registry))
    res["settings"] = ExperimentSettings(trial_limit=2, max_tokens=8, judge_model="hosted-judge", judge_audit_size=0)
    pipeline.prepare(instance, res, [MODEL], studies=("study2",))
    assert pipeline.run(instance, res, exp1_responses.key, MODEL, "study2").success
    path = tmp_path / "data" / "exp1" / "responses" / MODEL / "study2.parquet"
    pd.read_parquet(path).assign(response_utterance="Hard to say.", finish_reason_utterance="stop").to_parquet(path)
    result = materialize(
        [*ALL_ASSETS, *ALL_CHECKS],
        selection=[exp1_structured.key],
        partition_key=pipeline.key(MODEL, "study2"),
        resources=res,
        instance=instance,
        raise_on_error=False,
    )
    meta = pipeline.metadata(result, exp1_structured.key)
    structured = pd.read_parquet(tmp_path / "data" / "exp1" / "structured" / MODEL / "study2.parquet")
    # The judge read both trials (asked again, with the problem, when its output was malformed): every request it was
    # sent carried the key.
    assert meta["judge_model"] == "hosted-judge" and (structured.judge_attempts >= 1).sum() == 2
    assert meta["judge_requests_made"] == structured.judge_attempts.sum()

    env = {**os.environ, "GRACE_REGISTRY": str(registry)}
    archive = tmp_path / "outputs.tar.gz"
    for command in (
        ["archive", "--data-dir", str(tmp_path / "data"), "--out", str(archive)],
        ["k8s", "render", "--out", str(tmp_path / "k8s"), "--registry", str(registry)],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "grace_dagster.cli", *command],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert SECRET not in done.stdout + done.stderr
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    written = [home, tmp_path / "data", tmp_path / "logs", tmp_path / "unpacked", tmp_path / "k8s"]
    assert all(any(root.rglob("*")) for root in written), "every place was written to"
    for root in written:
        assert _files_holding(root, SECRET.encode()) == [], root
    logs = "".join(str(event) for event in instance.all_logs(result.run_id))
    assert SECRET not in logs and SECRET not in repr(res["llm"].endpoint("hosted-judge"))

    # A model server a run starts gets only what it needs from the environment, not the caller's keys.
    monkeypatch.setenv("DEEPSEEK_API_KEY", SECRET)
    with EmbeddedServer(MODEL, log_dir=tmp_path / "server-logs") as server:
        environ = Path(f"/proc/{server.process.pid}/environ").read_bytes()
        assert SECRET.encode() not in environ and b"GRACE_TEST_JUDGE_KEY" not in environ


def test_a_local_vllm_server_gets_no_key_and_no_project_python_path(monkeypatch):
    """The environment a local vLLM server is started with (`vllm_environment` is what its Popen receives): keys and
    tokens stay behind, vLLM's own settings pass, and the project's PYTHONPATH does not reach vLLM's environment."""
    for name in ("DEEPSEEK_API_KEY", "HF_TOKEN", "VLLM_API_KEY", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, SECRET)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    monkeypatch.setenv("PYTHONPATH", "/project/src")
    env = vllm_environment(GRACE_VLLM_OWNER="1")
    assert SECRET not in env.values()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["HF_HUB_OFFLINE"] == "1" and env["GRACE_VLLM_OWNER"] == "1"
    assert "PYTHONPATH" not in env and env["PATH"] == os.environ["PATH"]
