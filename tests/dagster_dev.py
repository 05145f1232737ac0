"""`dagster dev` (webserver + daemon) as users run it, on a temporary instance, driven through its GraphQL API."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from dagster import DagsterInstance

REPO = Path(__file__).resolve().parents[1]
TERMINAL_BACKFILL = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}
TERMINAL_RUN = {"SUCCESS", "FAILURE", "CANCELED"}

LAUNCH_BACKFILL = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on UnauthorizedError { message }
  }
}"""
BACKFILL_STATUS = """
query($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { id status runs(limit: 100) { runId status tags { key value } } }
    ... on PythonError { message }
  }
}"""
LAUNCH_RUN = """
mutation($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""
RUN_STATUS = """
query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status } } }"""
ADD_PARTITION = """
mutation($selector: RepositorySelector!, $name: String!, $key: String!) {
  addDynamicPartition(repositorySelector: $selector, partitionsDefName: $name, partitionKey: $key) {
    __typename
    ... on AddDynamicPartitionSuccess { partitionKey }
    ... on PythonError { message }
    ... on DuplicateDynamicPartitionError { partitionName }
  }
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_home(path: Path) -> Path:
    """A Dagster home holding the project's own instance config (run queue, concurrency limits)."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dagster.yaml", path / "dagster.yaml")
    return path


class DagsterDev:
    """Starts `dagster dev` in its own process group; `stop()` ends the webserver, daemon, code server and runs."""

    def __init__(self, home: Path, env: dict[str, str], log: Path):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "DAGSTER_HOME": str(home), **env}
        self.log = log
        self.process: subprocess.Popen | None = None
        self.repository: dict[str, str] = {}  # the code location's selector, known once it has loaded

    def __enter__(self) -> DagsterDev:
        command = [sys.executable, "-m", "dagster", "dev", "-w", "workspace.yaml", "-h", "127.0.0.1"]
        command += ["-p", str(self.port)]
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(
                command, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"dagster dev exited; see {self.log}"
            try:
                data = self.graphql(
                    "{ workspaceOrError { ... on Workspace { locationEntries { name "
                    "locationOrLoadError { __typename } } } } }"
                )
                entries = data["workspaceOrError"]["locationEntries"]
                loaded = entries and (entries[0]["locationOrLoadError"] or {}).get("__typename") == "RepositoryLocation"
                if loaded:
                    self.repository = {"repositoryLocationName": entries[0]["name"], "repositoryName": "__repository__"}
                    return self
            except (httpx.HTTPError, KeyError, TypeError):
                pass
            time.sleep(1)
        raise TimeoutError(f"dagster dev did not load the code location in 180 s; see {self.log}")

    def __exit__(self, *exc) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def instance(self) -> DagsterInstance:
        return DagsterInstance.from_config(str(self.home))

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        response = httpx.post(f"{self.url}/graphql", json={"query": query, "variables": variables or {}}, timeout=60)
        response.raise_for_status()
        body = response.json()
        assert not body.get("errors"), body["errors"]
        return body["data"]

    def add_model(self, slug: str) -> None:
        result = self.graphql(ADD_PARTITION, {"selector": self.repository, "name": "model", "key": slug})
        assert result["addDynamicPartition"]["__typename"] in (
            "AddDynamicPartitionSuccess",
            "DuplicateDynamicPartitionError",
        ), result

    def backfill(self, partitions: list[str], assets: list[list[str]], timeout: float = 600) -> dict:
        """Launch an asset backfill as the UI's dialog does, and wait until the daemon has finished it."""
        params = {"partitionNames": partitions, "assetSelection": [{"path": a} for a in assets]}
        launched = self.graphql(LAUNCH_BACKFILL, {"params": params})["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            backfill = self.graphql(BACKFILL_STATUS, {"id": launched["backfillId"]})["partitionBackfillOrError"]
            runs_done = all(r["status"] in TERMINAL_RUN for r in backfill["runs"])
            if backfill["status"] in TERMINAL_BACKFILL and runs_done:
                return backfill
            time.sleep(2)
        raise TimeoutError(f"backfill {launched['backfillId']} did not finish in {timeout} s; see {self.log}")

    def launch_partition(self, assets: list[list[str]], model: str, study: str, tags: dict | None = None) -> str:
        """Launch one run of partitioned assets for `model|study`, as the UI's Materialize dialog does (the run waits in
        the instance's queue); returns its id without waiting."""
        partition = {"dagster/partition": f"{model}|{study}", "dagster/partition/model": model}
        partition |= {"dagster/partition/study": study, **(tags or {})}
        params = {
            "selector": {
                **self.repository,
                "pipelineName": "__ASSET_JOB",
                "assetSelection": [{"path": a} for a in assets],
            },
            "mode": "default",
            "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in partition.items()]},
        }
        launched = self.graphql(LAUNCH_RUN, {"params": params})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        return launched["run"]["runId"]

    def materialize(self, assets: list[list[str]], timeout: float = 300) -> str:
        """Launch one run of unpartitioned assets, as the UI's Materialize button does; returns its final status."""
        params = {
            "selector": {
                **self.repository,
                "pipelineName": "__ASSET_JOB",
                "assetSelection": [{"path": a} for a in assets],
            },
            "mode": "default",
            "executionMetadata": {"tags": []},
        }
        launched = self.graphql(LAUNCH_RUN, {"params": params})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.graphql(RUN_STATUS, {"id": run_id})["runOrError"]["status"]
            if status in TERMINAL_RUN:
                return run_id
            time.sleep(1)
        raise TimeoutError(f"run {run_id} did not finish in {timeout} s; see {self.log}")
