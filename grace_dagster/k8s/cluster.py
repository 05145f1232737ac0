"""The model servers on the cluster, through the Kubernetes API: ensure a model is ready, give idle GPUs back.

Only the calls the run pods' RBAC allows (k8s/03-rbac.yaml: `get` and `patch` on the rendered model Deployments and
their `scale` subresource) are used: the Deployments are read one by one by name, never listed, and are never
created here (`kubectl apply -R -f k8s/` does that once). Scaling goes through `deployments/scale` with a merge
patch, as `kubectl scale` does, so nothing but the replica count is ever changed.

The API answers 429 (priority and fairness) or 5xx now and then, most often while many pods start: those calls are
retried with backoff (honouring Retry-After). A 403 is never retried: it means the Role lacks a permission, and the
error names the verb, the resource and the object it was refused for.

Ensure-ready is idempotent: under the multiprocess and k8s executors every step sets its resources up again, so
each step may call it; a model already up is only checked. Nothing here scales down on teardown; the idle scaler
(driven by a sensor) is the only way down.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import httpx
import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from grace_dagster.k8s.admission import Governance, admit, replicas
from grace_dagster.k8s.conventions import LABEL_INSTANCE, NAMESPACE, VLLM_PORT, deployment_name, service_name
from grace_dagster.k8s.render import served_models
from grace_dagster.registry.loader import Model, Registry, VllmServing

Log = Callable[[str], None]
T = TypeVar("T")

# Per API call; the overall waits have their own deadline.
REQUEST_TIMEOUT = 30.0
MERGE_PATCH = "application/merge-patch+json"
# Transient answers of the API server, retried: throttling (429) and server-side failures (5xx).
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
RETRY_ATTEMPTS = 6
RETRY_BASE_DELAY = 0.5
RETRY_MAX_DELAY = 10.0


class ClusterError(RuntimeError):
    """The cluster cannot give us what we asked for; the message says what to check or run."""


def _quiet(_: str) -> None:
    pass


def _retry_after(e: ApiException) -> float | None:
    try:
        return float((e.headers or {}).get("Retry-After"))
    except (TypeError, ValueError):
        return None


def with_retries(call: Callable[[], T], what: str, log: Log = _quiet) -> T:
    """`call()`, retried with exponential backoff while the API answers 429 or 5xx; other errors pass through."""
    delay = RETRY_BASE_DELAY
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        try:
            return call()
        except ApiException as e:
            if e.status not in RETRYABLE_STATUSES or attempt == RETRY_ATTEMPTS:
                raise
            wait = min(_retry_after(e) or delay, RETRY_MAX_DELAY)
            log(f"the Kubernetes API answered HTTP {e.status} {e.reason} to {what}; retry {attempt} in {wait:g} s")
            time.sleep(wait)
            delay *= 2
    raise AssertionError("unreachable")


def api_message(e: ApiException) -> str:
    """The API server's own message from an error's Status body (never anything the client sent)."""
    try:
        return str(json.loads(e.body).get("message") or "")
    except (TypeError, ValueError, AttributeError):
        return ""


def forbidden(namespace: str, verb: str, resource: str, name: str | None, e: ApiException) -> ClusterError:
    """A 403 as an error that names the missing permission and where it is granted."""
    target = f"{resource} {name}" if name else resource
    said = api_message(e)
    return ClusterError(
        f"the Kubernetes API refused to {verb} {target} in namespace {namespace} (HTTP {e.status} {e.reason}"
        + (f": {said}" if said else "")
        + f"). Missing permission: `{verb}` on `{resource}`"
        + (f" for {name}" if name else "")
        + ". What to do: run with the grace-run service account and apply the Role rendered into k8s/03-rbac.yaml "
        "(`grace k8s render && kubectl apply -f k8s/03-rbac.yaml`), which grants get and patch on the model "
        "Deployments and deployments/scale; a model added since needs that Role re-applied"
    )


def service_url(slug: str, namespace: str = NAMESPACE) -> str:
    """The in-cluster root URL of a model's Service (the OpenAI API lives under /v1)."""
    return f"http://{service_name(slug)}.{namespace}.svc:{VLLM_PORT}"


def api_client(
    api_host: str | None = None, kubeconfig: str | None = None, context: str | None = None
) -> k8s_client.ApiClient:
    """A client for the Kubernetes API, without touching the kubernetes package's global default configuration.

    `api_host` talks to that URL without credentials (`kubectl proxy`, or a test's fake server); inside a pod the
    pod's service account is used; elsewhere the kubeconfig (optionally a named context).
    """
    configuration = k8s_client.Configuration()
    if api_host:
        configuration.host = api_host.rstrip("/")
        return k8s_client.ApiClient(configuration)
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not kubeconfig and not context:
        try:
            k8s_config.load_incluster_config(client_configuration=configuration)
        except k8s_config.ConfigException as e:
            raise ClusterError(
                f"running in a pod but its service account cannot be used ({e}); run the pod with the grace-run "
                "service account (k8s/02-service-accounts.yaml)"
            ) from None
        return k8s_client.ApiClient(configuration)
    try:
        return k8s_config.new_client_from_config(config_file=kubeconfig, context=context)
    except (k8s_config.ConfigException, OSError) as e:
        where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        raise ClusterError(
            f"cannot load the kubeconfig {where}{f' (context {context})' if context else ''}: {str(e).rstrip('.')}. "
            "Point the llm "
            "resource's kubeconfig/kube_context at a working one (`kubectl get deployments` must work), or set "
            "api_host to a `kubectl proxy` URL"
        ) from None


@dataclass
class IdleReport:
    """What one pass of the idle scaler did."""

    scaled_down: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # Deployment -> why it stays up
    missing: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = []
        if self.scaled_down:
            parts.append(f"scaled to 0: {', '.join(self.scaled_down)}")
        if self.kept:
            parts.append("kept up: " + "; ".join(f"{name} ({why})" for name, why in sorted(self.kept.items())))
        if self.missing:
            parts.append(f"not in the cluster (apply k8s/models/): {', '.join(self.missing)}")
        return ". ".join(parts) if parts else "no model Deployment is up"


class ModelCluster:
    """The model Deployments of one namespace."""

    def __init__(self, api: k8s_client.ApiClient, namespace: str = NAMESPACE, log: Log = _quiet):
        self.api = api
        self.apps = k8s_client.AppsV1Api(api)
        self.namespace = namespace
        self.log = log

    # --- API calls ---------------------------------------------------------------------------------------------

    def _describe(self, name: str) -> str:
        return f"`kubectl -n {self.namespace} describe deployment {name}`"

    def _api_error(self, e: ApiException, name: str, verb: str, resource: str) -> ClusterError:
        if e.status in (401, 403):
            return forbidden(self.namespace, verb, resource, name, e)
        said = api_message(e)
        return ClusterError(
            f"the Kubernetes API failed to {verb} {resource} {name} in namespace {self.namespace}: HTTP {e.status} "
            f"{e.reason}" + (f": {said}" if said else "") + f" (after {RETRY_ATTEMPTS} attempts when transient)"
        )

    def _unreachable(self, e: Exception, name: str, verb: str) -> ClusterError:
        return ClusterError(
            f"cannot reach the Kubernetes API at {self.api.configuration.host} to {verb} deployment {name}: "
            f"{type(e).__name__}: {e}. Check the kubeconfig/api_host of the llm resource and the network"
        )

    def get_deployment(self, name: str) -> dict | None:
        """The live Deployment as the API returns it (camelCase, like the manifests), or None when absent."""
        try:
            response = with_retries(
                lambda: self.apps.read_namespaced_deployment(
                    name, self.namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
                ),
                f"get deployment {name}",
                self.log,
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise self._api_error(e, name, "get", "deployments") from None
        except urllib3.exceptions.HTTPError as e:
            raise self._unreachable(e, name, "read") from None
        return json.loads(response.data)

    def require_deployment(self, name: str) -> dict:
        obj = self.get_deployment(name)
        if obj is None:
            raise ClusterError(
                f"deployment {name} does not exist in namespace {self.namespace}: the pipeline scales the model "
                f"Deployments but never creates them. Apply the rendered manifests once: `kubectl apply -R -f k8s/` "
                f"(or `kubectl -n {self.namespace} apply -f k8s/models/<slug>.yaml`)"
            )
        return obj

    def scale(self, name: str, count: int) -> None:
        try:
            with_retries(
                lambda: self.apps.patch_namespaced_deployment_scale(
                    name,
                    self.namespace,
                    {"spec": {"replicas": count}},
                    _content_type=MERGE_PATCH,
                    # As kubectl does: a field the server does not know is an error, never silently dropped.
                    field_validation="Strict",
                    _request_timeout=REQUEST_TIMEOUT,
                ),
                f"scale deployment {name} to {count}",
                self.log,
            )
        except ApiException as e:
            raise self._api_error(e, name, "patch", "deployments/scale") from None
        except urllib3.exceptions.HTTPError as e:
            raise self._unreachable(e, name, f"scale to {count}") from None

    def model_deployments(self, registry: Registry) -> dict[str, dict | None]:
        """Every model Deployment the registry renders, by name (None when not in the cluster)."""
        return {deployment_name(m.slug): self.get_deployment(deployment_name(m.slug)) for m in served_models(registry)}

    # --- ensure ready ------------------------------------------------------------------------------------------

    def ensure_ready(
        self,
        model: Model,
        registry: Registry,
        governance: Governance,
        base_url: str,
        timeout: float,
        poll_interval: float = 5.0,
    ) -> None:
        """Bring the model's Deployment to at least one ready replica and wait until it serves the model.

        Admission runs first, on every call (the per-user limit concerns runs, not only scale-ups); the quota part
        only weighs in when the Deployment is at 0. Raises `AdmissionRefused` or `ClusterError`.
        """
        if not isinstance(model.serving, VllmServing):
            raise ClusterError(f"model {model.slug!r} is not served by vLLM on the cluster; it has no Deployment")
        name = deployment_name(model.slug)
        deadline = time.monotonic() + timeout
        live = self.require_deployment(name)
        admit(model, registry, live, self.model_deployments(registry), governance)
        if replicas(live) < 1:
            self.log(f"scaling {name} in namespace {self.namespace} from 0 to 1 for {model.slug}")
            self.scale(name, 1)
        self.wait_ready(model, deadline, timeout, poll_interval)
        self.wait_served(model, base_url, deadline, timeout, poll_interval)

    def wait_ready(self, model: Model, deadline: float, timeout: float, poll_interval: float) -> None:
        name = deployment_name(model.slug)
        while True:
            obj = self.require_deployment(name)
            status = obj.get("status") or {}
            if int(status.get("readyReplicas") or 0) >= 1:
                self.log(f"{name}: {status.get('readyReplicas')} ready replica(s)")
                return
            if replicas(obj) < 1:
                # Scaled back to 0 while we waited (the idle scaler raced a run that had not started yet): this run
                # needs it, so ask again rather than wait for nothing.
                self.log(f"{name} was scaled to 0 while waiting for it; scaling it to 1 again")
                self.scale(name, 1)
            if time.monotonic() >= deadline:
                raise ClusterError(self._not_ready_message(model, obj, timeout))
            time.sleep(poll_interval)

    def _not_ready_message(self, model: Model, obj: Mapping, timeout: float) -> str:
        name = deployment_name(model.slug)
        status = obj.get("status") or {}
        conditions = [
            f"{c.get('type')}={c.get('status')}"
            + (f" {c.get('reason')}" if c.get("reason") else "")
            + (f": {c.get('message')}" if c.get("message") else "")
            for c in status.get("conditions") or []
        ]
        state = (
            f"{replicas(obj)} desired, {int(status.get('replicas') or 0)} created, "
            f"{int(status.get('readyReplicas') or 0)} ready"
        )
        products = ", ".join(model.serving.gpu_products) if isinstance(model.serving, VllmServing) else "?"
        return (
            f"deployment {name} in namespace {self.namespace} has no ready replica after {timeout:g} s "
            f"(ready_timeout): {state}" + (f"; conditions: {'; '.join(conditions)}" if conditions else "") + ". "
            f"What to do: {self._describe(name)} and "
            f"`kubectl -n {self.namespace} get pods -l {LABEL_INSTANCE}={name}` to see why its pod is not ready; "
            f"check that a node with {model.resources.gpus} free GPU(s) of {products} exists "
            f"(`kubectl get nodes -l nvidia.com/gpu.product=<product>`) and that the namespace GPU quota has room; "
            "the first start downloads the weights, so raise the llm resource's ready_timeout if the init "
            "container is still fetching them"
        )

    def wait_served(self, model: Model, base_url: str, deadline: float, timeout: float, poll_interval: float) -> None:
        """Poll `GET {base_url}/v1/models` until the served name is listed (the server has loaded the model)."""
        url = f"{base_url.rstrip('/').removesuffix('/v1')}/v1/models"
        last = "no answer yet"
        while True:
            try:
                response = httpx.get(url, timeout=min(10.0, max(timeout, 0.1)))
                if response.status_code == 200:
                    served = [m.get("id") for m in (response.json().get("data") or [])]
                    if model.served_name in served:
                        self.log(f"{url} serves {model.served_name}")
                        return
                    last = f"it lists {served}"
                else:
                    last = f"HTTP {response.status_code}"
            except (httpx.HTTPError, ValueError) as e:
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() >= deadline:
                name = deployment_name(model.slug)
                raise ClusterError(
                    f"deployment {name} in namespace {self.namespace} is ready, but {url} did not list "
                    f"{model.served_name!r} within {timeout:g} s (ready_timeout); last: {last}. What to do: "
                    f"`kubectl -n {self.namespace} logs deployment/{name}`; from outside the cluster the Service "
                    f"name does not resolve: `kubectl -n {self.namespace} port-forward svc/{service_name(model.slug)} "
                    f"{VLLM_PORT}` and set the llm resource's base_urls {{{model.slug}: http://127.0.0.1:{VLLM_PORT}}}"
                )
            time.sleep(poll_interval)

    # --- idle models -------------------------------------------------------------------------------------------

    def scale_idle(self, registry: Registry, needed: Callable[[], Mapping[str, str]]) -> IdleReport:
        """Scale to 0 every model Deployment that is up and that no queued or running run needs.

        `needed` returns slug -> the run that needs it; it is asked again right before each scale-down, so a run
        queued while this pass runs keeps its model.
        """
        report = IdleReport()
        wanted = needed()
        for model in served_models(registry):
            name = deployment_name(model.slug)
            obj = self.get_deployment(name)
            if obj is None:
                report.missing.append(name)
                continue
            if replicas(obj) < 1:
                continue
            if model.slug in wanted:
                report.kept[name] = f"needed by run {wanted[model.slug]}"
                continue
            wanted = needed()
            if model.slug in wanted:
                report.kept[name] = f"needed by run {wanted[model.slug]}"
                continue
            self.log(f"scaling {name} in namespace {self.namespace} to 0: no queued or running run needs it")
            self.scale(name, 0)
            report.scaled_down.append(name)
        return report
