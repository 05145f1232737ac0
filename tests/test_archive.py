"""`grace archive`: the archive round-trips, and verification names the file that differs, is missing or is extra.

Small fake outputs in the storage layout (trials, exp1/exp2 tables, CSVs for R, checkpoints, a plot) stand in for a
real run; a changed byte is made by rewriting the tar with one byte of one member flipped.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grace_dagster import archive
from grace_dagster.archive import ArchiveError, create, verify
from grace_dagster.cli import main

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
CHANGED = "exp1/responses/smollm2-135m/study1.parquet"


def _parquet(path: Path, rows: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"trial_id": list(range(rows)), "text": [f"answer {i}" for i in range(rows)]}), path)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    _parquet(data / "trials" / "study1.parquet", 5)
    _parquet(data / "trials" / "study2.parquet", 8)
    _parquet(data / CHANGED, 5)
    _parquet(data / "exp1" / "structured" / "smollm2-135m" / "study1.parquet", 5)
    _parquet(data / "exp2" / "probabilities" / "gemma3-270m" / "study2.parquet", 8)
    csv = data / "csv" / "smollm2-135m_study1_raw_responses.csv"
    csv.parent.mkdir(parents=True)
    # A free-text answer with a newline inside quotes is one row, not two.
    csv.write_text('trial_id,text\n0,"It was\nterrible"\n1,plain\n')
    checkpoint = data / "checkpoints" / "exp1" / "smollm2-135m" / "study1.jsonl"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_text('{"key": "a"}\n{"key": "b"}\n{"key": "c"}\n')
    plot = data / "analysis" / "study2" / "negation.png"
    plot.parent.mkdir(parents=True)
    plot.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    # A write in progress (atomic_write's temporary) is not an output.
    (data / "trials" / ".study1.parquet.x1y2.tmp").write_bytes(b"half a table")
    return data


def _rewrite(
    src: Path,
    dst: Path,
    edit: Callable[[tarfile.TarInfo, bytes], bytes | None],
    extra: dict[str, bytes] | None = None,
) -> None:
    """Copy the tar at `src` to `dst`, passing each member's bytes through `edit` (None drops it), then add `extra`."""
    with tarfile.open(src, "r:gz") as tin, tarfile.open(dst, "w:gz", format=tarfile.PAX_FORMAT) as tout:
        for member in tin:
            body = edit(member, tin.extractfile(member).read())
            if body is not None:
                member.size = len(body)
                tout.addfile(member, io.BytesIO(body))
        for name, body in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tout.addfile(info, io.BytesIO(body))


def test_fresh_archive_verifies_and_its_manifest_describes_every_output(data_dir, tmp_path):
    path, manifest = create(data_dir, tmp_path / "out" / "grace.tar.gz", now=NOW)

    report = verify(path)
    assert report.ok, report.problems
    assert report.checked == 8
    assert manifest["created"] == "2025-06-01T12:00:00+00:00"
    assert manifest["models"] == ["gemma3-270m", "smollm2-135m"]
    assert manifest["studies"] == ["study1", "study2"]
    assert manifest["tables"] == {
        "csv/smollm2-135m_study1_raw_responses.csv": 2,
        CHANGED: 5,
        "exp1/structured/smollm2-135m/study1.parquet": 5,
        "exp2/probabilities/gemma3-270m/study2.parquet": 8,
        "checkpoints/exp1/smollm2-135m/study1.jsonl": 3,
        "trials/study1.parquet": 5,
        "trials/study2.parquet": 8,
    }
    on_disk = {
        p.relative_to(data_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in data_dir.rglob("*")
        if p.is_file() and not p.name.endswith(".tmp")
    }
    assert {name: e["sha256"] for name, e in manifest["files"].items()} == on_disk
    assert manifest["total_bytes"] == sum(e["bytes"] for e in manifest["files"].values())
    # Extracting never lands on the live data directory: everything sits under one directory named for the archive.
    with tarfile.open(path, "r:gz") as tar:
        names = tar.getnames()
        stored = json.loads(tar.extractfile("grace/manifest.json").read())
    assert all(n.startswith("grace/") for n in names)
    assert names[-1] == "grace/manifest.json"
    assert stored == manifest
    assert sorted(p.name for p in path.parent.iterdir()) == ["grace.tar.gz"]


def test_verify_names_the_file_after_one_byte_of_it_changed(data_dir, tmp_path, capsys):
    path, _ = create(data_dir, tmp_path / "grace.tar.gz", now=NOW)
    damaged = tmp_path / "damaged.tar.gz"

    def flip_one_byte(info, body):
        if info.name == f"grace/data/{CHANGED}":
            return body[:100] + bytes([body[100] ^ 0x01]) + body[101:]
        return body

    _rewrite(path, damaged, flip_one_byte)

    report = verify(damaged)
    assert len(report.problems) == 1
    assert report.problems[0].startswith(f"{CHANGED}: sha256 ")
    assert "differs from the manifest" in report.problems[0]

    assert main(["archive", "--verify", str(damaged)]) == 1
    out, err = capsys.readouterr()
    assert CHANGED in out
    assert "FAILED, 1 problem(s) in 8 file(s) checked" in err
    assert main(["archive", "--verify", str(path)]) == 0


def test_verify_names_missing_extra_and_resized_members(data_dir, tmp_path):
    path, _ = create(data_dir, tmp_path / "grace.tar.gz", now=NOW)
    damaged = tmp_path / "damaged.tar.gz"
    plot = "analysis/study2/negation.png"

    def drop_one_truncate_another(info, body):
        if info.name == "grace/data/trials/study2.parquet":
            return None
        return body[:-1] if info.name == f"grace/data/{plot}" else body

    _rewrite(path, damaged, drop_one_truncate_another, extra={"grace/data/csv/smuggled.csv": b"a,b\n1,2\n"})

    assert verify(damaged).problems == [
        f"{plot}: 263 bytes, the manifest says 264",
        "csv/smuggled.csv: in the archive but not listed in the manifest",
        "trials/study2.parquet: listed in the manifest but missing from the archive",
    ]


def test_a_damaged_archive_is_refused_with_a_message(data_dir, tmp_path, capsys):
    path, _ = create(data_dir, tmp_path / "grace.tar.gz", now=NOW)
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    with pytest.raises(ArchiveError, match="not a readable tar.gz"):
        verify(truncated)
    assert main(["archive", "--verify", str(truncated)]) == 2
    assert "damaged" in capsys.readouterr().err


def test_a_failed_write_leaves_neither_a_partial_archive_nor_a_temporary(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    path, _ = create(data_dir, out / "grace.tar.gz", now=NOW)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(archive, "_write_members", fail)
    with pytest.raises(OSError, match="disk full"):
        create(data_dir, path, now=NOW)
    assert path.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["grace.tar.gz"]


def test_archive_refuses_to_write_inside_the_data_directory_or_from_an_empty_one(data_dir, tmp_path):
    with pytest.raises(ArchiveError, match="inside the data directory"):
        create(data_dir, data_dir / "grace.tar.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArchiveError, match="no output files"):
        create(tmp_path / "empty", tmp_path / "grace.tar.gz")
    with pytest.raises(ArchiveError, match="does not exist"):
        create(tmp_path / "missing", tmp_path / "grace.tar.gz")


def test_cli_archive_writes_the_default_name_and_verifies(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["archive", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    (written,) = tmp_path.glob("grace-archive-*.tar.gz")
    assert f"wrote {written}: 8 files" in out
    assert "7 tables with 36 rows; models: gemma3-270m, smollm2-135m; studies: study1, study2" in out
    assert main(["archive", "--verify", str(written)]) == 0
    assert "ok, 8 files match the manifest" in capsys.readouterr().out


def test_rows_are_counted_in_the_archived_bytes_only(tmp_path):
    """A checkpoint appended to while it is archived: its row count matches the bytes that went into the tar."""
    checkpoint = tmp_path / "study1.jsonl"
    checkpoint.write_text('{"key": "a"}\n{"key": "b"}\n{"key": "c"}\n')
    with open(checkpoint, "rb") as f:
        assert archive.count_rows(Path("study1.jsonl"), f, len(b'{"key": "a"}\n{"key": "b"}\n')) == 2


def test_an_unreadable_table_is_archived_byte_for_byte_and_flagged(data_dir, tmp_path):
    broken = data_dir / "exp2" / "probabilities" / "gemma3-270m" / "study1.parquet"
    broken.write_bytes(b"not parquet at all")

    path, manifest = create(data_dir, tmp_path / "grace.tar.gz", now=NOW)

    entry = manifest["files"]["exp2/probabilities/gemma3-270m/study1.parquet"]
    assert "rows" not in entry and entry["rows_error"].startswith("ArrowInvalid")
    assert entry["sha256"] == hashlib.sha256(b"not parquet at all").hexdigest()
    assert verify(path).ok
