"""A local vLLM server for a registry model: its environment, its weights, its process. No Dagster here.

vLLM runs from an environment of its own (`.venv-vllm`, built by `make vllm` from `requirements-vllm.txt`): it pins
its own torch, which must not meet the project's environment. Nothing here imports vLLM; the server is started as
`python -m vllm.entrypoints.openai.api_server` with that environment's python.

Weights: a cluster entry (huggingface) is read from the local Hugging Face cache, never downloaded at run time; a
local-only entry (pypi) is the GGUF of its package converted once to bf16 safetensors, cached under
`$GRACE_CACHE_DIR/vllm-weights/<package>-<version>/` (default `~/.cache/grace`), so a new package version converts
again.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from grace_dagster.registry import Model
from grace_dagster.registry.loader import HuggingFaceWeights, PypiWeights, VllmServing
from grace_dagster.serving.process import server_environment
from grace_dagster.serving.weights import CACHE_DIR

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VLLM_VENV = PROJECT_ROOT / ".venv-vllm"
CONVERTER = Path(__file__).with_name("gguf_to_safetensors.py")
# Set in the server's environment and inherited by every process vLLM starts (its engine core, multiprocessing's
# resource tracker), so a leftover can be traced to the process that started it (the tests' guard reads it).
OWNER_ENV = "GRACE_VLLM_OWNER"
API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"

# Run by the vLLM environment's python in front of vLLM's API server (the same process), so that the server dies with
# the process that started it even when that one is killed with SIGKILL. A getppid() watch rather than
# PR_SET_PDEATHSIG: the death signal fires when the *thread* that forked exits, and a resource may be set up from a
# worker thread. SIGTERM lets vLLM stop its engine-core process too; the group kill is the fallback.
_BOOTSTRAP = """\
import os, runpy, signal, sys, threading, time
parent = int(sys.argv[1])
def watch():
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30.0)
    os.killpg(0, signal.SIGKILL)
threading.Thread(target=watch, daemon=True, name="grace-parent-watch").start()
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


class VllmError(RuntimeError):
    """The local vLLM server cannot be started; the message says what is missing and how to get it."""


def vllm_python(python: str | os.PathLike | None = None) -> Path:
    """The vLLM environment's interpreter: given, or $GRACE_VLLM_PYTHON, or the project's `.venv-vllm`."""
    path = Path(python or os.environ.get("GRACE_VLLM_PYTHON") or DEFAULT_VLLM_VENV / "bin" / "python")
    if not path.exists():
        raise VllmError(
            f"no vLLM environment at {path}: run `make vllm` in {PROJECT_ROOT} (it builds .venv-vllm from "
            "requirements-vllm.txt and converts the local weights, a few minutes once), or set GRACE_VLLM_PYTHON "
            "to the python of an environment where vLLM is installed"
        )
    return path


def converted_weights_dir(model: Model) -> Path:
    """Where a local-only entry's GGUF is cached as bf16 safetensors; keyed by package, version and file."""
    weights = model.weights
    if not isinstance(weights, PypiWeights):
        raise VllmError(f"model {model.slug!r} has no packaged GGUF to convert (weights.source {weights.source!r})")
    return CACHE_DIR / "vllm-weights" / f"{weights.package}-{weights.version}" / f"{Path(weights.file).stem}-bf16"


def prepare_weights(model: Model, python: str | os.PathLike | None = None, log=print) -> Path:
    """Install the entry's weights package into the vLLM environment (no dependencies: only its GGUF is wanted) and
    convert the GGUF once. Set-up work (`make vllm`), never done while a run waits."""
    out = converted_weights_dir(model)
    if (out / "config.json").exists():
        return out
    weights = model.weights
    assert isinstance(weights, PypiWeights)
    py = vllm_python(python)
    installed = subprocess.run(
        [str(py), "-c", f"import importlib.metadata as m; print(m.version({weights.package!r}))"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    if installed != weights.version:
        log(f"installing {weights.package}=={weights.version} (its GGUF only) into {py.parent.parent}")
        subprocess.run(
            [str(py), "-m", "pip", "install", "--quiet", "--no-deps", f"{weights.package}=={weights.version}"],
            check=True,
        )
    log(f"converting {weights.file} to bf16 safetensors in {out} (about 30 s, once)")
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [str(py), str(CONVERTER), "--package", weights.package, "--version", weights.version, "--file", weights.file]
        + ["--out", str(out)],
        check=True,
        env=vllm_environment(),
    )
    return out


def _hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub"


def model_source(model: Model) -> list[str]:
    """vLLM's `--model` (and revision) for an entry, checked to be on this machine: nothing is fetched at run time."""
    weights = model.weights
    if isinstance(weights, PypiWeights):
        path = converted_weights_dir(model)
        if not (path / "config.json").exists():
            raise VllmError(
                f"model {model.slug!r}: no converted weights at {path}; run `make vllm` (it converts "
                f"{weights.file} from {weights.package}=={weights.version} once)"
            )
        return ["--model", str(path)]
    if isinstance(weights, HuggingFaceWeights):
        cached = _hf_cache_dir() / f"models--{weights.repo.replace('/', '--')}"
        if not cached.exists():
            raise VllmError(
                f"model {model.slug!r} is served by vllm on the cluster, and its weights {weights.repo}@"
                f"{weights.revision} are not in this machine's Hugging Face cache ({_hf_cache_dir()}); nothing is "
                "downloaded at run time. Run with the k8s endpoint mode, or, to serve it with a local vLLM (a GPU "
                f"workstation), download them once with `hf download {weights.repo} --revision {weights.revision}`"
            )
        return ["--model", weights.repo, "--revision", weights.revision]
    raise VllmError(f"model {model.slug!r}: weights from {weights.source!r} cannot be served by vLLM")


def vllm_environment(**extra: str) -> dict[str, str]:
    env = server_environment(python_path=False)
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    env["VLLM_NO_USAGE_STATS"] = "1"
    # vLLM on a CPU reserves this many GiB for its KV cache (ignored on a GPU); 1 GiB holds the local model's
    # context many times over and keeps the server near 3.6 GB resident. Set it in the environment to change it.
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return {**env, **extra}


def _free_port() -> int:
    # vLLM binds its port itself and cannot report one the OS chose; ask the OS for a free one just before.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """One local vLLM API server (and the engine process it starts) on 127.0.0.1 for a registry model."""

    def __init__(
        self,
        model: Model,
        python: str | os.PathLike | None = None,
        startup_timeout: float = 600.0,
        log_dir: Path | None = None,
        extra_args: list[str] | None = None,
    ):
        if not isinstance(model.serving, VllmServing):
            raise VllmError(f"model {model.slug!r} is served by {model.serving.backend}, not by vLLM")
        self.model = model
        self.python = python
        self.startup_timeout = startup_timeout
        self.log_dir = Path(log_dir or tempfile.gettempdir())
        self.extra_args = list(extra_args or [])
        self.process: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def slug(self) -> str:
        return self.model.slug

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise VllmError(f"vLLM server for {self.slug} is not running")
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"grace-vllm-{self.slug}-{os.getpid()}.log"

    def command(self, port: int) -> list[str]:
        serving = self.model.serving
        assert isinstance(serving, VllmServing)
        python = str(vllm_python(self.python))  # the environment first: without it, nothing else can help
        args = [
            *model_source(self.model),
            "--served-model-name", self.model.served_name,
            "--max-model-len", str(serving.context_length),
            "--host", "127.0.0.1",
            "--port", str(port),
        ]  # fmt: skip
        if serving.chat_template:
            args += ["--chat-template", serving.chat_template]
        return [python, "-c", _BOOTSTRAP, str(os.getpid()), API_SERVER_MODULE, *args, *serving.args, *self.extra_args]

    def start(self) -> VllmServer:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        command = self.command(port)
        with self.log_path.open("ab") as log:
            # Its own process group: vLLM starts an engine-core process, and stop() must be able to reach it.
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=vllm_environment(**{OWNER_ENV: str(os.getpid())}),
                start_new_session=True,
            )
        self.port = port
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                raise VllmError(
                    f"vLLM server for {self.slug} exited with code {code} while starting; its log: {self.log_path}\n"
                    f"{self._log_tail()}"
                )
            if self.healthy():
                return self
            time.sleep(0.5)
        self.stop()
        raise VllmError(
            f"vLLM server for {self.slug} was not healthy within {self.startup_timeout:.0f}s (startup_timeout); "
            f"its log: {self.log_path}\n{self._log_tail()}"
        )

    def healthy(self) -> bool:
        if self.port is None or self.process is None or self.process.poll() is not None:
            return False
        try:
            return httpx.get(f"{self.base_url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the API server (vLLM then stops its engine process), then SIGKILL to whatever is left in its
        process group."""
        process = self.process
        self.port = None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        process.wait(timeout=timeout)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
