"""A run killed under `make ui` (`dagster dev` with the project's dagster.yaml) does not hold its model's place in
the queue: it is marked failed, the run waiting for the same model starts, and the killed run's model server exits."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from dagster import DagsterRunStatus

from tests import pipeline
from tests.dagster_dev import DagsterDev, new_home

MODEL = "smollm2-135m"


def _servers_of_runs() -> dict[int, int]:
    """Embedded model servers by the pid of the run process that started them (their --parent-pid)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "grace_dagster.cli" in args and "serve" in args and "--parent-pid" in args:
            found[int(args[args.index("--parent-pid") + 1])] = int(proc.name)
    return found


def _wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(1)
    raise TimeoutError(what)


@pytest.mark.slow
def test_a_killed_run_is_marked_failed_and_the_next_run_for_its_model_starts(tmp_path):
    home = new_home(tmp_path / "home")
    env = {"GRACE_DATA_DIR": str(tmp_path / "data"), "GRACE_TRIAL_LIMIT": "40", "GRACE_MAX_TOKENS": "48"}
    with DagsterDev(home, env, tmp_path / "dagster-dev.log") as dev:
        instance = dev.instance()
        pipeline.prepare(instance, pipeline.resources(tmp_path), [MODEL])
        before = set(_servers_of_runs())
        first = dev.launch_partition([["exp1", "responses"]], MODEL, "study2")
        second = dev.launch_partition([["exp1", "responses"]], MODEL, "study1")  # waits: one run per model

        run_pid = _wait(lambda: next(iter(set(_servers_of_runs()) - before), None), 300, "the first run's server")
        server_pid = _servers_of_runs()[run_pid]
        assert instance.get_run_by_id(second).status == DagsterRunStatus.QUEUED, "the model's place is taken"
        os.kill(run_pid, signal.SIGKILL)  # the run's process alone dies, as with an out-of-memory kill

        _wait(lambda: instance.get_run_by_id(first).status == DagsterRunStatus.FAILURE, 180, "the dead run failed")
        _wait(
            lambda: (
                not Path(f"/proc/{server_pid}/cmdline").exists() or not Path(f"/proc/{server_pid}/cmdline").read_bytes()
            ),
            30,
            "the dead run's server exited",
        )
        _wait(lambda: instance.get_run_by_id(second).status != DagsterRunStatus.QUEUED, 180, "the next run started")
        dev.graphql("mutation($id: String!) { terminateRun(runId: $id) { __typename } }", {"id": second})
