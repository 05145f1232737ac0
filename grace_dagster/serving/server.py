"""Start the embedded server for one registry model: `grace serve SLUG --port 8011`."""

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import llama_cpp
import uvicorn

from grace_dagster.registry import load_registry
from grace_dagster.registry.loader import EmbeddedServing
from grace_dagster.serving.app import create_app
from grace_dagster.serving.engine import Engine
from grace_dagster.serving.weights import gguf_path


def _exit_with_parent(parent_pid: int) -> None:
    """A server started for a run must not outlive it, even when the run is killed with SIGKILL."""

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watchdog").start()


def _api_key(name: str) -> str:
    if not os.environ.get(name):
        raise SystemExit(f"--api-key-env {name}: set the key in the environment variable {name}")
    return os.environ[name]


def serve(
    slug: str,
    host: str = "127.0.0.1",
    port: int = 0,
    ready_file: Path | None = None,
    parent_pid: int | None = None,
    structured_output: str = "json_schema",
    api_key_env: str | None = None,
    parallel: int | None = None,
) -> None:
    """Load the model, bind the port, then announce readiness.

    With port 0 the OS picks a free port; the port actually bound is written to `ready_file` (atomically), so a
    parent process learns it without racing for a port it probed earlier.
    """
    if parent_pid is not None:
        _exit_with_parent(parent_pid)
    api_key = _api_key(api_key_env) if api_key_env else None  # a missing key is said before the weights load
    model = load_registry().get(slug)
    if not isinstance(model.serving, EmbeddedServing):
        raise SystemExit(f"model {slug!r} is served by {model.serving.backend}, not by the embedded server")
    path = gguf_path(model)
    if parallel is not None and parallel < 1:
        raise SystemExit(f"--parallel {parallel}: give at least 1")
    engine = Engine(
        path,
        n_ctx=model.serving.context_length,
        chat_template=model.serving.chat_template,
        # As many sequences at once as a run keeps in flight to the model.
        n_slots=parallel or model.serving.max_concurrency,
    )
    app = create_app(
        engine,
        model.served_name,
        version=f"grace-embedded (llama-cpp-python {llama_cpp.__version__})",
        structured_output=structured_output,
        api_key=api_key,
    )

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30)
    server = uvicorn.Server(config)
    if ready_file is not None:
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"host": host, "port": bound, "pid": os.getpid(), "model": model.served_name}))
        os.replace(tmp, ready_file)
    print(f"serving {model.served_name} on http://{host}:{bound}/v1", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
