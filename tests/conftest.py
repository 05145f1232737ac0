"""Shared fixtures: real embedded servers (one per model for the whole session), the real vLLM server (once for the
session, from .venv-vllm, which `make test` builds), and a guard that no server process outlives the test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from grace_dagster.registry import DEFAULT_REGISTRY_PATH, load_registry
from grace_dagster.serving.process import EmbeddedServer
from grace_dagster.serving.vllm import OWNER_ENV, VllmServer
from tests.chat_templates import GEMMA_TURNS

LOCAL_MODELS = ["smollm2-135m", "gemma3-270m"]
SERVED_NAMES = {"smollm2-135m": "SmolLM2-135M-Instruct", "gemma3-270m": "gemma-3-270m"}
# The production server in the tests: SmolLM2 through vLLM (bf16 safetensors converted from the embedded model's GGUF).
VLLM_MODEL = "smollm2-135m-vllm"
SHARED_SERVER_DEATHS: list[str] = []


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    """Started on first use, stopped at the end of the session."""
    started: dict[str, EmbeddedServer] = {}
    log_dir = tmp_path_factory.mktemp("server-logs")

    def get(slug: str) -> EmbeddedServer:
        server = started.get(slug)
        if server is not None and server.process.poll() is not None:
            # A crash of the shared server must fail the session with its cause, not every later test with
            # "ConnectError": recorded here, reported at the end, and a fresh server serves the remaining tests.
            SHARED_SERVER_DEATHS.append(
                f"{slug} exited with code {server.process.returncode}; the end of its log ({server.log_path}):\n"
                + server.log_tail(40)
            )
            server = None
        if server is None:
            started[slug] = EmbeddedServer(slug, log_dir=log_dir).start()
        return started[slug]

    yield get
    for server in started.values():
        server.stop()


def with_chat_template(slug: str, template: str, directory: Path) -> EmbeddedServer:
    """An embedded server (not started) for `slug` with `template` named as its chat template in the registry."""
    raw = yaml.safe_load(DEFAULT_REGISTRY_PATH.read_text())
    entry = next(m for m in raw["models"] if m["slug"] == slug)
    entry["serving"]["chat_template"] = template
    path = directory / "models.yaml"
    path.write_text(yaml.safe_dump(raw))
    return EmbeddedServer(slug, env={"GRACE_REGISTRY": str(path)}, log_dir=directory)


@pytest.fixture(scope="session")
def gemma_with_chat_template(tmp_path_factory):
    """Gemma 3 270M with a chat template named in the registry (its GGUF has none)."""
    with with_chat_template("gemma3-270m", GEMMA_TURNS, tmp_path_factory.mktemp("gemma-chat")) as server:
        yield server


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    """Real vLLM serving the registry's local vLLM entry, started on first use and stopped at the end of the session.
    Never skipped: without .venv-vllm or the converted weights it fails and says to run `make vllm`."""
    server = VllmServer(load_registry().get(VLLM_MODEL), log_dir=tmp_path_factory.mktemp("vllm-logs")).start()
    yield server
    server.stop()


def vllm_processes(owner: int) -> list[tuple[int, str]]:
    """Live processes of the vLLM servers that process `owner` started: the API server and the engine processes it
    starts, found by the marker in their environment wherever they were re-parented."""
    return [
        (pid, cmdline) for pid, cmdline, environ, _ in _live_processes() if f"{OWNER_ENV}={owner}".encode() in environ
    ]


def _live_processes():
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (proc / "stat").read_text()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state != "Z":  # a zombie is dead already, waiting to be reaped by whoever adopted it
            yield int(proc.name), cmdline[:200], environ, int(ppid)


def _server_processes() -> list[tuple[int, str]]:
    """Live server processes this session started: embedded servers (children of this process) and every process
    of its vLLM servers."""
    embedded = [
        (pid, cmd)
        for pid, cmd, _, ppid in _live_processes()
        if "grace_dagster.cli serve" in cmd and ppid == os.getpid()
    ]
    return embedded + vllm_processes(os.getpid())


def pytest_sessionfinish(session, exitstatus):
    leftovers = _server_processes()
    for pid, _ in leftovers:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:  # a vLLM engine process that ended with its API server just now
            pass
    if leftovers:
        print(f"\nFAIL: {len(leftovers)} model server process(es) (embedded or vLLM) outlived the tests: {leftovers}")
        session.exitstatus = 1
    for death in SHARED_SERVER_DEATHS:
        print(f"\nFAIL: a session-wide embedded server died during the tests: {death}")
        session.exitstatus = 1
