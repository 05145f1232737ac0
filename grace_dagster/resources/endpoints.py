"""`LLMEndpoints`: hands an asset a client for a ready endpoint of a model.

- local (default): the embedded server, one child process per model on 127.0.0.1, started on first use, health-
  checked, and stopped when the resource is torn down (end of the run or step).
- external models (registry `serving.backend: external`): their fixed base URL and an API key from the environment.
- k8s: the model's vLLM Deployment on the NRP (the Kubernetes endpoint issue).
"""

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dagster import ConfigurableResource, InitResourceContext
from pydantic import Field, PrivateAttr

from grace_dagster.llm import LLMClient
from grace_dagster.registry import Model, Registry, load_registry
from grace_dagster.registry.loader import EmbeddedServing, ExternalServing
from grace_dagster.serving.process import EmbeddedServer


class EndpointError(RuntimeError):
    pass


@dataclass(frozen=True)
class Endpoint:
    model: Model
    base_url: str
    api_key: str | None = field(default=None, repr=False)  # secrets never reach logs or exceptions


class LLMEndpoints(ConfigurableResource):
    """Where each model is served. Secrets are read from the environment and never logged."""

    mode: Literal["local"] = Field(default="local", description="local: embedded llama.cpp servers on this machine")
    registry_path: str | None = Field(default=None, description="model registry (default: the packaged one)")
    max_concurrency: int = Field(default=4, description="concurrent requests per endpoint")
    startup_timeout: float = Field(default=180.0, description="seconds to wait for a server to become healthy")
    log_dir: str | None = Field(default=None, description="where embedded servers write their logs")
    base_urls: dict[str, str] = Field(
        default_factory=dict,
        description="slug -> base URL of a server you run yourself (e.g. `grace serve`); used instead of starting one",
    )

    _servers: dict[str, EmbeddedServer] = PrivateAttr(default_factory=dict)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def registry(self) -> Registry:
        return load_registry(self.registry_path)

    def endpoint(self, slug: str) -> Endpoint:
        model = self.registry().get(slug)
        serving = model.serving
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
        if not isinstance(serving, EmbeddedServing):
            raise EndpointError(
                f"model {slug!r} is served by {serving.backend} on the cluster; it cannot run in local mode. "
                "Use a local model (see `grace models`) or run with the k8s endpoint mode."
            )
        with self._lock:
            server = self._servers.get(slug)
            if server is None or not server.healthy():
                if server is not None:
                    server.stop()
                log_dir = Path(self.log_dir) if self.log_dir else None
                server = EmbeddedServer(slug, startup_timeout=self.startup_timeout, log_dir=log_dir).start()
                self._servers[slug] = server
        return Endpoint(model, server.base_url)

    def client(self, slug: str, **kwargs) -> LLMClient:
        """A client bound to the model's served name; use it as an async context manager."""
        return self.client_for(self.endpoint(slug), **kwargs)

    def client_for(self, endpoint: Endpoint, **kwargs) -> LLMClient:
        kwargs.setdefault("max_concurrency", self.max_concurrency)
        return LLMClient(endpoint.base_url, endpoint.model.served_name, api_key=endpoint.api_key, **kwargs)

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        self.stop_all()

    def stop_all(self) -> None:
        with self._lock:
            for server in self._servers.values():
                server.stop()
            self._servers.clear()
