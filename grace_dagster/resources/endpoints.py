"""`LLMEndpoints`: hands an asset a client for a ready endpoint of a model.

- local (default): a server per model as a child process on 127.0.0.1, started on first use, health-checked, and
  stopped when the resource is torn down (end of the run or step): the embedded server for embedded models, vLLM
  (from the `.venv-vllm` environment, `grace_dagster.serving.vllm`) for vllm models, with the local-only entries'
  converted weights or a cluster entry's weights from this machine's Hugging Face cache (a GPU workstation).
- external models (registry `serving.backend: external`): their fixed base URL and an API key from the environment,
  in either mode.
- k8s: a vLLM model's Deployment on the NRP is brought up through the Kubernetes API (`grace_dagster.k8s.cluster`)
  after the admission check (`grace_dagster.k8s.admission`: NRP policy, namespace GPU quota, per-user limit of
  concurrent GPU-backed runs), and its Service URL is handed out once `/v1/models` lists the model. Embedded models
  and local-only vLLM entries still run as a child process wherever the step runs (they need no Deployment).

A client keeps the model's `serving.max_concurrency` requests in flight (registry; 64 for vLLM, 4 for the embedded
server, which decodes that many sequences together), unless `max_concurrency` here overrides it for every model.

In k8s mode nothing is scaled down at teardown: under the multiprocess and k8s executors resources are set up and
torn down once per step, so a scale-down there would reload the weights for every step. Idle models are scaled to 0
by the `scale_idle_models` sensor (grace_dagster/sensors.py).
"""

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dagster import (
    ConfigurableResource,
    DagsterInstance,
    DagsterLogManager,
    DagsterRunStatus,
    InitResourceContext,
    RunsFilter,
)
from pydantic import Field, PrivateAttr

from grace_dagster.k8s.admission import (
    DEFAULT_USER_GPU_RUN_LIMIT,
    TAG_USER,
    ActiveRun,
    Governance,
    is_gpu_backed,
    run_model,
    user_limit,
)
from grace_dagster.k8s.cluster import IdleReport, ModelCluster, api_client, service_url
from grace_dagster.k8s.conventions import NAMESPACE
from grace_dagster.llm import LLMClient
from grace_dagster.registry import Model, Registry, load_registry
from grace_dagster.registry.loader import EmbeddedServing, ExternalServing, VllmServing
from grace_dagster.serving.process import EmbeddedServer
from grace_dagster.serving.vllm import VllmError, VllmServer

# A run holds its GPU-backed model from launch until it ends; these are the statuses in between.
RUNNING_STATUSES = [DagsterRunStatus.STARTING, DagsterRunStatus.STARTED]
# A model is still needed while a run that will use it waits in the queue or is being cancelled (its steps are
# still executing until the cancellation lands).
ACTIVE_STATUSES = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    *RUNNING_STATUSES,
    DagsterRunStatus.CANCELING,
]


class EndpointError(RuntimeError):
    pass


@dataclass(frozen=True)
class Endpoint:
    model: Model
    base_url: str
    api_key: str | None = field(default=None, repr=False)  # secrets never reach logs or exceptions
    # For servers started here: whether their process still runs (a dead one is restarted, not waited for).
    alive: Callable[[], bool] | None = field(default=None, repr=False, compare=False)


class LLMEndpoints(ConfigurableResource):
    """Where each model is served. Secrets are read from the environment and never logged."""

    mode: Literal["local", "k8s"] = Field(
        default="local",
        description="local: embedded llama.cpp servers on this machine; k8s: vLLM Deployments on the cluster",
    )
    registry_path: str | None = Field(default=None, description="model registry (default: the packaged one)")
    max_concurrency: int | None = Field(
        default=None,
        description="requests in flight per endpoint, every model (default: the registry's serving.max_concurrency)",
    )
    startup_timeout: float = Field(default=180.0, description="seconds to wait for an embedded server to be healthy")
    vllm_startup_timeout: float = Field(default=600.0, description="seconds to wait for a local vLLM to be healthy")
    vllm_python: str | None = Field(
        default=None,
        description="local vLLM: its environment's python (default: $GRACE_VLLM_PYTHON, else the project's .venv-vllm)",
    )
    log_dir: str | None = Field(default=None, description="where embedded servers write their logs")
    base_urls: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "slug -> base URL of a server you run yourself (e.g. `grace serve`), used instead of starting one; in k8s "
            "mode, for a vLLM model, where to reach its Service from here (e.g. a `kubectl port-forward`), the "
            "Deployment is still brought up"
        ),
    )
    # k8s mode
    namespace: str = Field(default=NAMESPACE, description="k8s: namespace of the model Deployments")
    kubeconfig: str | None = Field(
        default=None, description="k8s: kubeconfig file (default: in-cluster service account in a pod, else ~/.kube)"
    )
    kube_context: str | None = Field(default=None, description="k8s: kubeconfig context (default: the current one)")
    api_host: str | None = Field(
        default=None,
        description="k8s: Kubernetes API URL used without credentials, e.g. `kubectl proxy` (http://127.0.0.1:8001)",
    )
    ready_timeout: float = Field(
        default=3600.0,
        description=(
            "k8s: seconds from scale-up until the model is served (the first start downloads the weights, and the "
            "startup probe alone allows 30 minutes for loading them)"
        ),
    )
    poll_interval: float = Field(default=5.0, description="k8s: seconds between readiness polls")
    user: str | None = Field(
        default=None,
        description=f"k8s: who runs this, for the per-user GPU limit (default: run tag {TAG_USER}, else $GRACE_USER)",
    )
    per_user_gpu_run_limit: int = Field(
        default=DEFAULT_USER_GPU_RUN_LIMIT, ge=0, description="k8s: concurrent GPU-backed runs per user"
    )
    user_exceptions: dict[str, int] = Field(
        default_factory=dict, description="k8s: user -> their own limit of concurrent GPU-backed runs"
    )

    _servers: dict[str, EmbeddedServer | VllmServer] = PrivateAttr(default_factory=dict)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _ready: dict[str, Endpoint] = PrivateAttr(default_factory=dict)
    _model_locks: dict[str, threading.Lock] = PrivateAttr(default_factory=dict)
    _cluster: ModelCluster | None = PrivateAttr(default=None)
    _instance: DagsterInstance | None = PrivateAttr(default=None)
    _run_id: str | None = PrivateAttr(default=None)
    _run_tags: dict[str, str] = PrivateAttr(default_factory=dict)
    _log: DagsterLogManager | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        # Admission counts the user's other runs in the instance, and must not count this run itself.
        self._instance = context.instance
        run = context.run
        self._run_id = run.run_id if run is not None else None
        self._run_tags = dict(run.tags) if run is not None else {}
        self._log = context.log

    def registry(self) -> Registry:
        return load_registry(self.registry_path)

    def endpoint(self, slug: str) -> Endpoint:
        registry = self.registry()
        model = registry.get(slug)
        serving = model.serving
        if self.mode == "k8s" and model.on_cluster:
            return self._cluster_endpoint(model, registry)
        if slug in self.base_urls:
            return Endpoint(model, self.base_urls[slug])
        if isinstance(serving, ExternalServing):
            key = os.environ.get(serving.api_key_env)
            if not key:
                raise EndpointError(
                    f"model {slug!r} is served by an external API; set the environment variable "
                    f"{serving.api_key_env} to its API key"
                )
            return Endpoint(model, serving.base_url, key)
        assert isinstance(serving, EmbeddedServing | VllmServing)
        with self._lock:
            server = self._servers.get(slug)
            if server is None or not server.healthy():
                if server is not None:
                    server.stop()
                server = self._start_local(model)
                self._servers[slug] = server
        process = server.process
        return Endpoint(model, server.base_url, alive=lambda: process is not None and process.poll() is None)

    def _start_local(self, model: Model) -> EmbeddedServer | VllmServer:
        log_dir = Path(self.log_dir) if self.log_dir else None
        if isinstance(model.serving, EmbeddedServing):
            return EmbeddedServer(model.slug, startup_timeout=self.startup_timeout, log_dir=log_dir).start()
        try:
            server = VllmServer(
                model, python=self.vllm_python, startup_timeout=self.vllm_startup_timeout, log_dir=log_dir
            )
            return server.start()
        except VllmError as e:
            raise EndpointError(str(e)) from None

    def client(self, slug: str, **kwargs) -> LLMClient:
        """A client bound to the model's served name; use it as an async context manager."""
        return self.client_for(self.endpoint(slug), **kwargs)

    def client_for(self, endpoint: Endpoint, **kwargs) -> LLMClient:
        kwargs.setdefault("max_concurrency", self.max_concurrency or endpoint.model.serving.max_concurrency)
        return LLMClient(
            endpoint.base_url, endpoint.model.served_name, api_key=endpoint.api_key, alive=endpoint.alive, **kwargs
        )

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        # Embedded servers only: a model Deployment is never scaled down here (see the module docstring).
        self.stop_all()
        with self._lock:
            if self._cluster is not None:
                self._cluster.api.close()
                self._cluster = None

    def stop_all(self) -> None:
        with self._lock:
            for server in self._servers.values():
                server.stop()
            self._servers.clear()

    # --- k8s mode ------------------------------------------------------------------------------------------------

    def cluster(self) -> ModelCluster:
        with self._lock:
            if self._cluster is None:
                self._cluster = ModelCluster(
                    api_client(self.api_host, self.kubeconfig, self.kube_context), self.namespace, log=self._info
                )
            return self._cluster

    def _info(self, message: str) -> None:
        if self._log is not None:
            self._log.info(message)

    def run_user(self) -> str | None:
        return self.user or self._run_tags.get(TAG_USER) or os.environ.get("GRACE_USER") or None

    def governance(self, registry: Registry) -> Governance:
        user = self.run_user()
        return Governance(
            user=user,
            user_limit=user_limit(user, self.per_user_gpu_run_limit, self.user_exceptions),
            user_runs=tuple(self._other_gpu_runs(user, registry)) if user else (),
            namespace=self.namespace,
        )

    def _other_gpu_runs(self, user: str, registry: Registry) -> list[ActiveRun]:
        """The user's other started runs that hold a GPU-backed model (none when used outside a Dagster run)."""
        if self._instance is None:
            return []
        runs = self._instance.get_runs(filters=RunsFilter(statuses=RUNNING_STATUSES, tags={TAG_USER: user}))
        active = []
        for run in runs:
            slug = run_model(run.tags)
            model = registry.by_slug.get(slug) if slug else None
            if run.run_id != self._run_id and model is not None and is_gpu_backed(model):
                active.append(ActiveRun(run.run_id, model.slug, run.status.value))
        return active

    def _cluster_endpoint(self, model: Model, registry: Registry) -> Endpoint:
        with self._lock:
            lock = self._model_locks.setdefault(model.slug, threading.Lock())
        # One ensure-ready per model at a time; other models proceed in parallel.
        with lock:
            ready = self._ready.get(model.slug)
            if ready is not None:
                return ready
            base_url = self.base_urls.get(model.slug) or service_url(model.slug, self.namespace)
            self.cluster().ensure_ready(
                model,
                registry,
                self.governance(registry),
                base_url,
                timeout=self.ready_timeout,
                poll_interval=self.poll_interval,
            )
            endpoint = Endpoint(model, base_url)
            self._ready[model.slug] = endpoint
            return endpoint

    def scale_idle_models(self, instance: DagsterInstance, judge: str | None = None) -> IdleReport:
        """Scale to 0 every model Deployment that no queued or running run of `instance` needs (the sensor's work).

        Runs are tagged with their partition's model only; the structured-extraction judge serves every run's
        extraction, so it counts as needed while any run is active.
        """

        def needed() -> dict[str, str]:
            wanted: dict[str, str] = {}
            for run in instance.get_runs(filters=RunsFilter(statuses=ACTIVE_STATUSES)):
                for slug in (run_model(run.tags), judge):
                    if slug:
                        wanted.setdefault(slug, f"{run.run_id} ({run.status.value})")
            return wanted

        return self.cluster().scale_idle(self.registry(), needed)
