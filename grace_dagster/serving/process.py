"""Run the embedded server as a child process: start, wait until healthy, stop. No Dagster here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


class ServerStartError(RuntimeError):
    pass


# What a model server needs from the caller's environment; everything else (API keys above all) stays behind.
_SERVER_VARIABLES = {"PATH", "HOME", "USER", "LANG", "TMPDIR", "LD_LIBRARY_PATH", "GRACE_REGISTRY", "GRACE_CACHE_DIR"}
_SERVER_VARIABLES |= {"GRACE_DATA_DIR", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "OMP_NUM_THREADS"}
# Engine settings, by prefix: llama.cpp's, vLLM's and those of the libraries under vLLM.
_SERVER_PREFIXES = ("LC_", "GGML_", "LLAMA_", "VLLM_", "TORCH", "OMP_", "KMP_", "MKL_", "CUDA_", "NCCL_")
_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")


def server_environment(python_path: bool = True) -> dict[str, str]:
    """The caller's environment as a model server gets it: the allowed names, never one that names a secret.
    `python_path` keeps PYTHONPATH and VIRTUAL_ENV, which the embedded server (the project's own python) needs
    and vLLM (an environment of its own) must not see."""
    allowed = _SERVER_VARIABLES | ({"PYTHONPATH", "VIRTUAL_ENV"} if python_path else set())
    return {
        k: v
        for k, v in os.environ.items()
        if (k in allowed or k.startswith(_SERVER_PREFIXES)) and not any(word in k for word in _SECRET_WORDS)
    }


class EmbeddedServer:
    """One `grace serve` child process on 127.0.0.1."""

    def __init__(
        self,
        slug: str,
        port: int = 0,
        startup_timeout: float = 180.0,
        log_dir: Path | None = None,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
    ):
        """`args`: more `grace serve` options (e.g. `--structured-output json_object`)."""
        self.slug = slug
        self.env = env
        self.args = args or []
        self.requested_port = port
        self.startup_timeout = startup_timeout
        self.log_dir = Path(log_dir or tempfile.gettempdir())
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self._ready_dir: tempfile.TemporaryDirectory | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise ServerStartError(f"server for {self.slug} is not running")
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"grace-serve-{self.slug}-{os.getpid()}.log"

    def start(self) -> EmbeddedServer:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._ready_dir = tempfile.TemporaryDirectory(prefix="grace-serve-")
        ready = Path(self._ready_dir.name) / "ready.json"
        command = [
            sys.executable,
            "-m",
            "grace_dagster.cli",
            "serve",
            self.slug,
            "--port",
            str(self.requested_port),
            "--ready-file",
            str(ready),
            "--parent-pid",
            str(os.getpid()),
            *self.args,
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**server_environment(), **(self.env or {})},
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(
                    f"embedded server for {self.slug} exited with code {self.process.returncode} while starting; "
                    f"its log: {self.log_path}\n{self.log_tail()}"
                )
            if ready.exists():
                self.port = json.loads(ready.read_text())["port"]
                if self.healthy():
                    return self
            time.sleep(0.1)
        self.stop()
        raise ServerStartError(
            f"embedded server for {self.slug} was not healthy within {self.startup_timeout:.0f}s; "
            f"its log: {self.log_path}"
        )

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.base_url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """Kill without a chance to clean up (tests use this to simulate a crash)."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self, timeout: float = 10.0) -> None:
        if self._ready_dir is not None:
            self._ready_dir.cleanup()
            self._ready_dir = None
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
