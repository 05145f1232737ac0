"""`grace archive`: one tar.gz of every output under the data directory, with a manifest that proves it intact.

The cluster purges data unused for 6 months and is not archival storage, so before the volumes are deleted the
outputs leave as one file whose manifest (date, models, studies, row counts, sha256 and size of every file) lets
anyone check it later without the original volume: `grace archive --verify PATH`.

Each file is opened once: its row count, its hash and the bytes in the tar all come from that open file and from its
first N bytes (N its size when opened), so a pipeline that replaces a file (atomic_write) or appends to a checkpoint
meanwhile cannot make the manifest disagree with the archive. The manifest is the last member, written after
everything it describes; it names the volume the data came from when one is given (`--volume grace-output`). The
archive itself is written to a temporary sibling and renamed into place, so a killed run never leaves a truncated
archive under the final name.

A verification that passes leaves a receipt beside the archive (`<archive>.verified.json`: its size, sha256, volume
and when it was verified). `grace k8s cleanup-plan` reads those receipts to tell which volumes may be deleted.

Plain Python (no Dagster import): it reads files, not the instance.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from grace_dagster.files import atomic_write

MANIFEST = "manifest.json"
FORMAT = "grace-archive/1"
RECEIPT_SUFFIX = ".verified.json"
RECEIPT_FORMAT = "grace-archive-receipt/1"
# Top-level directories whose files are per-partition outputs laid out as .../<model>/<study>.<ext>
# (see grace_dagster/resources/storage.py and the assets): how the manifest learns the models and studies.
PARTITIONED_DIRS = ("exp1", "exp2", "checkpoints")
_CHUNK = 1 << 20


class ArchiveError(RuntimeError):
    """The archive cannot be written or read (as opposed to read and found to differ)."""


@dataclass
class VerifyReport:
    """What `verify` found: the files checked and every difference, each naming its file."""

    path: Path
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


class _HashingReader:
    """A read-only file wrapper that hashes and counts what passes through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha256.update(data)
        self.size += len(data)
        return data


def _is_partial_write(path: Path) -> bool:
    # atomic_write's temporaries (`.<name>.<random>.tmp`) are files being written, not outputs.
    return path.name.startswith(".") and path.name.endswith(".tmp")


def output_files(data_dir: Path) -> list[Path]:
    """Every output file under `data_dir`, as sorted paths relative to it."""
    found = []
    for root, dirs, files in os.walk(data_dir):
        dirs.sort()
        for name in files:
            path = Path(root) / name
            if path.is_file() and not _is_partial_write(path):
                found.append(path.relative_to(data_dir))
    return sorted(found, key=lambda p: p.as_posix())


def count_rows(rel: Path, f: BinaryIO, size: int) -> int | None:
    """Data rows of a table (Parquet, CSV) or records of a checkpoint (JSONL) in the first `size` bytes of `f`;
    None for other files."""
    suffix = rel.suffix.lower()
    if suffix == ".parquet":
        # Parquet files are only ever replaced whole (atomic_write), never appended to.
        return pq.ParquetFile(f).metadata.num_rows
    if suffix not in (".csv", ".jsonl"):
        return None
    # Only the bytes that go into the archive: a checkpoint may be appended to while it is archived.
    text = io.TextIOWrapper(io.BytesIO(f.read(size)), encoding="utf-8", newline="")
    if suffix == ".csv":
        # Records, not lines: free-text answers contain quoted newlines.
        return max(sum(1 for _ in csv.reader(text)) - 1, 0)
    return sum(1 for line in text if line.strip())


def _partition_of(rel: Path) -> tuple[str | None, str | None]:
    """(model, study) of an output file, from the storage layout; None where the path names neither."""
    parts = rel.parts
    if parts[0] in PARTITIONED_DIRS and len(parts) >= 4:
        return parts[-2], rel.stem
    if parts[0] == "trials" and len(parts) == 2:
        return None, rel.stem
    return None, None


def default_archive_name(now: datetime) -> str:
    return f"grace-archive-{now.strftime('%Y%m%dT%H%M%SZ')}.tar.gz"


def _tar_info(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = int(mtime)
    info.mode = 0o644
    # Who owned the files on the cluster means nothing where the archive is restored.
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def create(
    data_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    now: datetime | None = None,
    volume: str | None = None,
) -> tuple[Path, dict]:
    """Write the archive of `data_dir` to `out` (default: ./grace-archive-<UTC time>.tar.gz).

    `volume` names the PersistentVolumeClaim mounted at `data_dir` (recorded in the manifest for the cleanup plan).
    Returns the archive's path and its manifest.
    """
    data_dir = Path(data_dir).resolve()
    now = now or datetime.now(UTC)
    if not data_dir.is_dir():
        raise ArchiveError(f"data directory {data_dir} does not exist: pass the one the pipeline wrote (--data-dir)")
    out_path = Path(out) if out is not None else Path(default_archive_name(now))
    out_path = out_path.resolve()
    if out_path.is_relative_to(data_dir):
        raise ArchiveError(
            f"{out_path} is inside the data directory {data_dir}, so the archive would archive itself next time: "
            "write it elsewhere (--out)"
        )
    files = output_files(data_dir)
    if not files:
        raise ArchiveError(f"{data_dir} holds no output files: nothing to archive (is it the right --data-dir?)")
    root = PurePosixPath(out_path.name.removesuffix(".tar.gz").removesuffix(".tgz"))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    manifest: dict = {}

    def write(tmp: Path) -> None:
        # gzip's own default level: level 9 costs far more time for little on Parquet.
        with tarfile.open(tmp, mode="w:gz", format=tarfile.PAX_FORMAT, compresslevel=6) as tar:
            manifest.update(_write_members(tar, data_dir, files, root, now))
            if volume:
                manifest["volume"] = volume
            body = json.dumps(manifest, indent=2, sort_keys=True).encode()
            tar.addfile(_tar_info(str(root / MANIFEST), len(body), now.timestamp()), io.BytesIO(body))

    atomic_write(out_path, write)
    return out_path, manifest


def _write_members(tar: tarfile.TarFile, data_dir: Path, files: list[Path], root: PurePosixPath, now: datetime) -> dict:
    entries: dict[str, dict] = {}
    models: set[str] = set()
    studies: set[str] = set()
    for rel in files:
        with open(data_dir / rel, "rb") as f:
            st = os.fstat(f.fileno())
            rows, rows_error = None, None
            try:
                rows = count_rows(rel, f, st.st_size)
            except (pa.ArrowException, csv.Error, UnicodeDecodeError, ValueError) as e:
                # The bytes are what must survive: a table that cannot be parsed is archived anyway, and said so.
                rows_error = f"{type(e).__name__}: {e}"
            f.seek(0)
            reader = _HashingReader(f)
            tar.addfile(_tar_info(str(root / "data" / rel.as_posix()), st.st_size, st.st_mtime), reader)
        entry: dict = {"bytes": reader.size, "sha256": reader.sha256.hexdigest()}
        if rows is not None:
            entry["rows"] = rows
        if rows_error is not None:
            entry["rows_error"] = rows_error
        entries[rel.as_posix()] = entry
        model, study = _partition_of(rel)
        if model:
            models.add(model)
        if study:
            studies.add(study)
    return {
        "format": FORMAT,
        "created": now.isoformat(timespec="seconds"),
        "data_dir": str(data_dir),
        "models": sorted(models),
        "studies": sorted(studies),
        "tables": {name: e["rows"] for name, e in entries.items() if "rows" in e},
        "files": entries,
        "total_bytes": sum(e["bytes"] for e in entries.values()),
    }


def _members(tar: tarfile.TarFile) -> Iterator[tuple[tarfile.TarInfo, BinaryIO | None]]:
    for member in tar:
        yield member, tar.extractfile(member) if member.isfile() else None


def verify(path: str | os.PathLike) -> VerifyReport:
    """Check every member of the archive at `path` against its manifest: present, same size, same sha256."""
    path = Path(path)
    report = VerifyReport(path)
    seen: dict[str, tuple[int, str]] = {}
    manifest: dict | None = None
    root: str | None = None
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            for member, f in _members(tar):
                top, _, rest = member.name.partition("/")
                if root is None:
                    root = top
                if top != root or f is None:
                    report.problems.append(f"{member.name}: unexpected member (not a file under {root}/)")
                    continue
                if rest == MANIFEST:
                    manifest = _read_manifest(f, member.name)
                    continue
                if not rest.startswith("data/"):
                    report.problems.append(f"{member.name}: unexpected member (neither {MANIFEST} nor under data/)")
                    continue
                digest = hashlib.sha256()
                size = 0
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                seen[rest.removeprefix("data/")] = (size, digest.hexdigest())
    except FileNotFoundError:
        raise ArchiveError(f"{path} does not exist") from None
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ArchiveError(f"{path} is not a readable tar.gz ({e}): the file is damaged or not a grace archive") from e
    if manifest is None:
        raise ArchiveError(f"{path} has no {MANIFEST}: not an archive written by `grace archive`")
    listed: dict = manifest.get("files", {})
    for name in sorted(set(listed) | set(seen)):
        if name not in seen:
            report.problems.append(f"{name}: listed in the manifest but missing from the archive")
        elif name not in listed:
            report.problems.append(f"{name}: in the archive but not listed in the manifest")
        else:
            size, sha = seen[name]
            want = listed[name]
            if size != want.get("bytes"):
                report.problems.append(f"{name}: {size} bytes, the manifest says {want.get('bytes')}")
            elif sha != want.get("sha256"):
                report.problems.append(f"{name}: sha256 {sha} differs from the manifest's {want.get('sha256')}")
    report.checked = len(seen)
    report.manifest = manifest
    return report


def receipt_path(archive_path: str | os.PathLike) -> Path:
    path = Path(archive_path)
    return path.with_name(path.name + RECEIPT_SUFFIX)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_receipt(report: VerifyReport, now: datetime | None = None) -> Path:
    """Record a passed verification beside the archive, for `grace k8s cleanup-plan`."""
    if not report.ok:
        raise ArchiveError(f"{report.path} failed verification: no receipt is written for it")
    receipt = {
        "format": RECEIPT_FORMAT,
        "archive": report.path.name,
        "bytes": report.path.stat().st_size,
        "sha256": _file_sha256(report.path),
        "verified": (now or datetime.now(UTC)).isoformat(timespec="seconds"),
        "created": report.manifest.get("created"),
        "volume": report.manifest.get("volume"),
        "data_dir": report.manifest.get("data_dir"),
        "files": report.checked,
        "total_bytes": report.manifest.get("total_bytes"),
    }
    path = receipt_path(report.path)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(receipt, indent=2, sort_keys=True) + "\n"))
    return path


@dataclass(frozen=True)
class Receipt:
    """A passed verification as recorded, and whether the archive beside it is still the file that was verified."""

    path: Path
    archive: Path
    volume: str | None
    data_dir: str | None
    verified: str
    created: str | None
    files: int
    intact: bool  # the archive is still there with the verified size


def read_receipts(directory: str | os.PathLike) -> list[Receipt]:
    """Every receipt in `directory`, newest verification last."""
    receipts = []
    for path in sorted(Path(directory).glob(f"*{RECEIPT_SUFFIX}")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # not ours, or damaged: it proves nothing
        if not isinstance(data, dict) or data.get("format") != RECEIPT_FORMAT:
            continue
        archive_path = path.with_name(str(data.get("archive")))
        intact = archive_path.is_file() and archive_path.stat().st_size == data.get("bytes")
        receipts.append(
            Receipt(
                path=path,
                archive=archive_path,
                volume=data.get("volume"),
                data_dir=data.get("data_dir"),
                verified=str(data.get("verified")),
                created=data.get("created"),
                files=int(data.get("files") or 0),
                intact=intact,
            )
        )
    return sorted(receipts, key=lambda r: r.verified)


def _read_manifest(f: BinaryIO, name: str) -> dict:
    try:
        manifest = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArchiveError(f"{name} is not valid JSON ({e}): the archive is damaged") from e
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        raise ArchiveError(f"{name} is not a {FORMAT} manifest: not an archive written by this version of `grace`")
    return manifest
