"""Write deploy/requirements.lock, the exact versions (with hashes) the image installs, from pyproject.toml.

Run it with `make lock` (or `.venv/bin/python deploy/lock.py`) after changing the project's dependencies, and commit
the result: tests/test_deploy.py fails while the lock does not match pyproject.toml. The resolution is uv's
(`uv pip compile`, a dev dependency), for the image's interpreter and platform (CPython 3.11, x86-64 manylinux with
glibc 2.28 or newer; the Debian 12 base has 2.36), not for the machine it runs on.

The lock's first line records a digest of what it was resolved from (requires-python and the dependency list of
[project]), so the test can tell that pyproject.toml changed since without a network or a resolver.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "deploy" / "requirements.lock"
DIGEST_PREFIX = "# resolved from pyproject.toml [project] requires-python + dependencies, sha256 "
PYTHON_VERSION = "3.11"
PLATFORM = "x86_64-manylinux_2_28"


def dependencies_digest(pyproject: Path = PYPROJECT) -> str:
    """sha256 of the inputs of the resolution: requires-python and the dependencies, whitespace-normalised."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    inputs = {
        "requires-python": project.get("requires-python", ""),
        "dependencies": sorted("".join(d.split()) for d in project.get("dependencies", [])),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def recorded_digest(lock: Path = LOCK) -> str | None:
    first = lock.read_text(encoding="utf-8").splitlines()[0] if lock.exists() else ""
    return first.removeprefix(DIGEST_PREFIX) if first.startswith(DIGEST_PREFIX) else None


def _uv() -> str:
    beside = Path(sys.executable).with_name("uv")
    found = str(beside) if beside.exists() else shutil.which("uv")
    if not found:
        sys.exit("uv is not installed: `make install` brings it (a dev dependency), or `pip install uv`")
    return found


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "requirements.lock"
        subprocess.run(
            [
                _uv(),
                "pip",
                "compile",
                str(PYPROJECT),
                "--python-version",
                PYTHON_VERSION,
                "--python-platform",
                PLATFORM,
                "--generate-hashes",
                "--custom-compile-command",
                "make lock",
                "--quiet",
                "-o",
                str(out),
            ],
            check=True,
            cwd=ROOT,
        )
        LOCK.write_text(f"{DIGEST_PREFIX}{dependencies_digest()}\n" + out.read_text(encoding="utf-8"), encoding="utf-8")
    pins = sum(1 for line in LOCK.read_text(encoding="utf-8").splitlines() if "==" in line and not line.startswith("#"))
    print(f"wrote {LOCK.relative_to(ROOT)}: {pins} packages pinned with hashes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
