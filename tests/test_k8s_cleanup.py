"""`grace k8s cleanup-plan`: volumes with their age and verified archives, and the deletions in the audit's order.

The namespace is the fake Kubernetes API of tests/k8s_fake.py (real `kubernetes` client; it lists the committed
k8s/ volumes and model Deployments, created 2026-06-01, and Jobs the test adds). Archives and their receipts are
real: written and verified by `grace archive` on a small data directory.
"""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grace_dagster.archive import read_receipts
from grace_dagster.cli import main
from grace_dagster.k8s import cluster as cluster_module
from tests.k8s_fake import FakeCluster

TODAY = "2026-12-01"  # 182 whole days after the fake's objects were created (2026-06-01T09:00Z)


@pytest.fixture
def operator_cluster(monkeypatch):
    monkeypatch.setattr(cluster_module, "RETRY_BASE_DELAY", 0.01)
    with FakeCluster(identity=None) as fake:
        fake.add_job("grace-run-3f2a9c", succeeded=True)
        fake.add_job("grace-run-77be01", succeeded=False)
        yield fake
    assert not fake.unexpected


@pytest.fixture
def archives(tmp_path) -> Path:
    data = tmp_path / "output"
    (data / "trials").mkdir(parents=True)
    pq.write_table(pa.table({"trial_id": [1, 2, 3]}), data / "trials" / "study1.parquet")
    out = tmp_path / "archives"
    out.mkdir()
    archive = out / "grace-output-20261130.tar.gz"
    assert main(["archive", "--data-dir", str(data), "--volume", "grace-output", "--out", str(archive)]) == 0
    assert main(["archive", "--verify", str(archive)]) == 0
    return out


def _plan(fake: FakeCluster, archives: Path, capsys, *extra: str) -> tuple[int, str, str]:
    code = main(["k8s", "cleanup-plan", "--api-host", fake.url, "--archives", str(archives), "--today", TODAY, *extra])
    printed = capsys.readouterr()
    return code, printed.out, printed.err


def test_plan_lists_volumes_and_orders_the_deletions_as_the_audit_does(operator_cluster, archives, capsys):
    code, out, _ = _plan(operator_cluster, archives, capsys, "--ended", "2026-11-20")

    assert code == 0
    assert "delete everything by 2026-12-20 (19 days left)" in out
    lines = out.splitlines()
    output = next(line for line in lines if line.strip().startswith("grace-output "))
    assert "182 days" in output and "verified archive" in output and "grace-output-20261130.tar.gz" in output
    assert "(1 files" in output
    inputs = next(line for line in lines if line.strip().startswith("grace-input "))
    assert "NOT ARCHIVED" in inputs
    weights = next(line for line in lines if line.strip().startswith("weights-gemma-2-9b "))
    assert "no archive needed: google/gemma-2-9b-it@main can be downloaded again" in weights

    steps = [out.index(f"\n{n}. ") for n in range(1, 6)]
    assert steps == sorted(steps), "archive, verify, Deployments, Jobs, volumes"
    assert "--data-dir /data/input --volume grace-input --out /archive/grace-input-20261201T000000Z.tar.gz" in out
    assert "grace archive --verify ./grace-input-20261201T000000Z.tar.gz" in out
    assert "kubectl -n grace delete deployment,service vllm-deepseek-r1-distill-qwen-32b" in out
    assert "kubectl -n grace delete job grace-run-3f2a9c grace-run-77be01" in out
    assert "still running: grace-run-77be01" in out
    volumes = out[steps[4] :]
    (delete,) = [line for line in volumes.splitlines() if "delete pvc" in line]
    assert "grace-output" in delete and "weights-llama-3-1-70b" in delete and "grace-input" not in delete
    assert "HOLD grace-input: no verified archive yet (steps 1 and 2)" in volumes


def test_a_changed_archive_or_one_made_before_the_end_does_not_count(operator_cluster, archives, capsys):
    (receipt,) = read_receipts(archives)
    assert receipt.intact and receipt.volume == "grace-output"

    day_after = (date.fromisoformat(receipt.created[:10]) + timedelta(days=1)).isoformat()
    _, out, _ = _plan(operator_cluster, archives, capsys, "--ended", day_after)
    assert "HOLD grace-output: its archive was made on" in out and "before the experiments ended" in out

    with receipt.archive.open("ab") as f:
        f.write(b"appended later")
    _, out, _ = _plan(operator_cluster, archives, capsys)
    assert "HOLD grace-output: no verified archive yet" in out
    assert f"grace archive --verify {receipt.archive}" in out
    assert "The experiments are not marked as ended: pass --ended YYYY-MM-DD" in out


def test_overdue_namespace_is_said_so(operator_cluster, archives, capsys):
    _, out, _ = _plan(operator_cluster, archives, capsys, "--ended", "2026-10-01")
    assert "delete everything by 2026-10-31 (OVERDUE by 31 days)" in out


def test_grace_run_may_not_list_volumes_and_is_told_which_permission(archives, capsys, monkeypatch):
    """The plan reads with the operator's rights; run as the pipeline's account, the Role refuses the list."""
    monkeypatch.setattr(cluster_module, "RETRY_BASE_DELAY", 0.01)
    with FakeCluster() as fake:
        code, _, err = _plan(fake, archives, capsys)
    assert code == 2
    assert "refused to list persistentvolumeclaims in namespace grace (HTTP 403 Forbidden" in err
    assert "Missing permission: `list` on `persistentvolumeclaims`" in err


def test_receipt_records_the_verified_archive(archives):
    (receipt_file,) = archives.glob("*.verified.json")
    receipt = json.loads(receipt_file.read_text())
    archive = archives / receipt["archive"]
    assert receipt["volume"] == "grace-output" and receipt["files"] == 1
    assert receipt["bytes"] == archive.stat().st_size and len(receipt["sha256"]) == 64
