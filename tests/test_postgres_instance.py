"""The cluster's instance storage works against a real PostgreSQL server: a run is recorded and read back.

The fixture starts Debian's PostgreSQL (installed by `make system`) on a free loopback port, with its own data
directory, and stops it at the end. PostgreSQL refuses to run as root, so as root the server runs as the `postgres`
system user. The storage config is the one the Helm chart renders from deploy/helm/values.yaml (same shape: three
storages with `postgres_db`, the password from DAGSTER_PG_PASSWORD, scheme `postgresql+psycopg2`); only the host,
port and credentials point at the test server.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest
import yaml
from dagster import AssetKey, DagsterInstance, asset, materialize
from dagster._core.storage.dagster_run import DagsterRunStatus, RunsFilter

from tests.test_deploy import helm_values, render_instance

# Dagster never launches a Kubernetes Job in this test; the launcher would need a cluster to be constructed.
LOCAL_LAUNCHER = {"module": "dagster._core.launcher", "class": "DefaultRunLauncher"}


@dataclass(frozen=True)
class Server:
    port: int
    user: str
    password: str
    database: str


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[4]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres() -> Iterator[Server]:
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries under /usr/lib/postgresql: install them with `make system`")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    # Under /tmp, not pytest's tmp_path: that lives in a root-only directory the postgres user cannot enter.
    root = Path(tempfile.mkdtemp(prefix="grace-pg-"))
    server = Server(port=_free_port(), user="dagster", password=secrets.token_hex(8), database="grace")
    data = root / "data"
    password_file = root / "password"
    password_file.write_text(server.password)
    if as_postgres:
        shutil.chown(root, "postgres")
        shutil.chown(password_file, "postgres")

    def run(*argv: str) -> None:
        done = subprocess.run([*as_postgres, *argv], capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")

    run(
        str(bin_dir / "initdb"), "-D", str(data), "-U", server.user, f"--pwfile={password_file}",
        "--auth=scram-sha-256", "--encoding=UTF8", "--no-sync",
    )  # fmt: skip
    options = f"-c listen_addresses=127.0.0.1 -p {server.port} -k {root} -c fsync=off"
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w", "start")
    try:
        conn = _connect(server, "postgres")
        try:
            conn.autocommit = True  # CREATE DATABASE refuses to run inside a transaction
            conn.cursor().execute(f"CREATE DATABASE {server.database}")
        finally:
            conn.close()
        yield server
    finally:
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _connect(server: Server, database: str):
    return psycopg2.connect(
        host="127.0.0.1", port=server.port, user=server.user, password=server.password, dbname=database
    )


def _cluster_instance_config(server: Server) -> dict:
    """The Helm-rendered dagster.yaml with the database pointed at the test server."""
    values = helm_values(
        {
            "postgresql": {
                "postgresqlHost": "127.0.0.1",
                "postgresqlUsername": server.user,
                "postgresqlDatabase": server.database,
                "service": {"port": server.port},
            }
        }
    )
    doc = render_instance(values)
    return {
        **{key: doc[key] for key in ("run_storage", "event_log_storage", "schedule_storage", "concurrency")},
        "run_launcher": LOCAL_LAUNCHER,
        "telemetry": doc["telemetry"],
    }


@asset
def recorded() -> int:
    return 42


def test_a_run_is_recorded_in_postgres_and_read_back(postgres, tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", postgres.password)
    config = _cluster_instance_config(postgres)
    assert config["run_storage"]["config"]["postgres_db"]["scheme"] == "postgresql+psycopg2"
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    tags = {"grace/model": "gemma-2-2b", "grace/user": "alice"}

    with DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert instance.run_storage._engine.url.drivername == "postgresql+psycopg2"
        result = materialize([recorded], instance=instance, tags=tags)
        assert result.success

    # A fresh instance (new connections, no cache) reads the run, its tags and its materialization back.
    with DagsterInstance.from_config(str(home)) as instance:
        run = instance.get_run_by_id(result.run_id)
        assert run is not None and run.status == DagsterRunStatus.SUCCESS
        assert {k: run.tags[k] for k in tags} == tags
        assert [r.dagster_run.run_id for r in instance.get_run_records(RunsFilter(tags=tags))] == [result.run_id]
        materialization = instance.get_latest_materialization_event(AssetKey("recorded"))
        assert materialization is not None and materialization.run_id == result.run_id

    # And the rows are in PostgreSQL itself, not somewhere else.
    conn = _connect(postgres, postgres.database)
    try:
        cur = conn.cursor()
        cur.execute("SELECT status FROM runs WHERE run_id = %s", (result.run_id,))
        assert cur.fetchall() == [("SUCCESS",)]
        cur.execute("SELECT count(*) FROM event_logs WHERE run_id = %s", (result.run_id,))
        assert cur.fetchone()[0] > 0
    finally:
        conn.close()


def test_without_the_psycopg2_scheme_sqlalchemy_looks_for_psycopg_3(postgres, tmp_path, monkeypatch):
    """Why the values set postgresqlScheme (DESIGN section 10): SQLAlchemy 2.1 maps a bare `postgresql://` to
    psycopg 3, which the images do not install."""
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", postgres.password)
    config = _cluster_instance_config(postgres)
    del config["run_storage"]["config"]["postgres_db"]["scheme"]
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))

    with pytest.raises(ModuleNotFoundError, match="psycopg"):
        with DagsterInstance.from_config(str(home)) as instance:
            instance.get_runs(limit=1)
