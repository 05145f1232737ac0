"""Shared fixtures: real embedded servers (one per model for the whole session) and a guard that no server process
outlives the test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from grace_dagster.serving.process import EmbeddedServer

LOCAL_MODELS = ["smollm2-135m", "gemma3-270m"]
SERVED_NAMES = {"smollm2-135m": "SmolLM2-135M-Instruct", "gemma3-270m": "gemma-3-270m"}


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    """Started on first use, stopped at the end of the session."""
    started: dict[str, EmbeddedServer] = {}
    log_dir = tmp_path_factory.mktemp("server-logs")

    def get(slug: str) -> EmbeddedServer:
        if slug not in started:
            started[slug] = EmbeddedServer(slug, log_dir=log_dir).start()
        return started[slug]

    yield get
    for server in started.values():
        server.stop()


def _server_processes() -> list[tuple[int, str]]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if "grace_dagster.cli serve" in cmdline and ppid == os.getpid():
            found.append((int(proc.name), cmdline))
    return found


def pytest_sessionfinish(session, exitstatus):
    leftovers = _server_processes()
    for pid, _ in leftovers:
        os.kill(pid, 9)
    if leftovers:
        print(f"\nFAIL: {len(leftovers)} embedded server process(es) outlived the tests: {leftovers}")
        session.exitstatus = 1
