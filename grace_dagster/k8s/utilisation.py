"""GPU utilisation of the model servers, read from the cluster's Prometheus, and what to do about a low one.

The NRP counts a pod whose GPUs are below 40% utilisation as a violation, and enough violations block new jobs in
the namespace. The NVIDIA DCGM exporter on every GPU node publishes `DCGM_FI_DEV_GPU_UTIL` (percent, per GPU,
labelled with the namespace and pod that hold the GPU); the cluster's Prometheus scrapes it. This module asks
Prometheus' HTTP API for each model pod's average over a window, maps pods to the model Deployments (pod names are
`<deployment>-<replicaset hash>-<pod hash>`), and decides, per Deployment:

- below the threshold and no run sending it work: scale it to zero (a run that needs it later scales it up again);
- below the threshold while runs send it work: report it to those runs, whose client concurrency is too low to
  keep the GPU busy (vLLM batches only what is in flight);
- at or above the threshold: nothing.

Plain Python (no Dagster): the sensor in grace_dagster/sensors.py supplies the runs and does the scaling and
reporting.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import httpx

METRIC = "DCGM_FI_DEV_GPU_UTIL"
DEFAULT_THRESHOLD_PERCENT = 40.0
# Long enough that one slow batch or a pause between a run's steps does not count, short next to the NRP's checks.
DEFAULT_WINDOW = "10m"
_WINDOW = re.compile(r"^[0-9]+(ms|s|m|h)$")
# What the ReplicaSet controller appends to a Deployment's name: the pod-template hash and a random suffix.
_POD_SUFFIX = r"-[bcdfghjklmnpqrstvwxz2456789]{1,10}-[bcdfghjklmnpqrstvwxz2456789]{5}"


class PrometheusError(RuntimeError):
    """Prometheus could not be asked; the message names the URL and what to check."""


@dataclass(frozen=True)
class PrometheusQuery:
    """Where and how to ask: the HTTP API root and the label names the exporter's series carry."""

    url: str
    namespace: str
    window: str = DEFAULT_WINDOW
    # Some Prometheus setups rename the exporter's own labels to exported_namespace / exported_pod.
    namespace_label: str = "namespace"
    pod_label: str = "pod"
    timeout: float = 10.0

    def promql(self) -> str:
        if not _WINDOW.match(self.window):
            raise PrometheusError(f"window {self.window!r} is not a Prometheus duration such as 10m, 90s or 1h")
        selector = f'{self.namespace_label}="{self.namespace}",{self.pod_label}=~"vllm-.+"'
        return f"avg by ({self.pod_label}) (avg_over_time({METRIC}{{{selector}}}[{self.window}]))"


def pod_utilisation(query: PrometheusQuery) -> dict[str, float]:
    """Pod name -> its GPUs' average utilisation (percent) over the window, for the namespace's model pods."""
    endpoint = f"{query.url.rstrip('/')}/api/v1/query"
    try:
        response = httpx.get(endpoint, params={"query": query.promql()}, timeout=query.timeout)
    except httpx.HTTPError as e:
        raise PrometheusError(
            f"cannot reach Prometheus at {query.url} ({type(e).__name__}: {e}); check the gpu_monitor resource's "
            "prometheus_url (env GRACE_PROMETHEUS_URL) and that the code server may reach it"
        ) from None
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code != 200 or body.get("status") != "success":
        raise PrometheusError(
            f"Prometheus at {query.url} refused the query {query.promql()!r}: HTTP {response.status_code} "
            f"{body.get('errorType', '')} {body.get('error', response.text[:200])}".rstrip()
        )
    values = {}
    for series in body["data"]["result"]:
        pod = series["metric"].get(query.pod_label)
        if pod:
            values[pod] = float(series["value"][1])
    return values


def by_deployment(pods: Mapping[str, float], deployments: Iterable[str]) -> dict[str, dict[str, float]]:
    """Deployment -> {pod: utilisation} for the pods that belong to it (a pod of an unknown name is ignored)."""
    patterns = {name: re.compile(re.escape(name) + _POD_SUFFIX + "$") for name in deployments}
    grouped: dict[str, dict[str, float]] = {}
    for pod, value in pods.items():
        owner = next((name for name, pattern in patterns.items() if pattern.match(pod)), None)
        if owner is not None:
            grouped.setdefault(owner, {})[pod] = value
    return grouped


@dataclass
class UtilisationPlan:
    """What one look at the GPUs decided, per model Deployment."""

    threshold: float
    window: str
    # Deployment -> its pods' mean utilisation
    scale_down: dict[str, float] = field(default_factory=dict)
    report: dict[str, tuple[float, list[str]]] = field(default_factory=dict)  # -> (utilisation, run ids)
    busy: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        parts = []
        if self.scale_down:
            idle = ", ".join(f"{name} ({value:.0f}%)" for name, value in sorted(self.scale_down.items()))
            parts.append(f"idle below {self.threshold:g}% over {self.window}, no run sending work, scaled to 0: {idle}")
        if self.report:
            low = "; ".join(
                f"{name} ({value:.0f}%) to run(s) {', '.join(runs)}"
                for name, (value, runs) in sorted(self.report.items())
            )
            parts.append(f"below {self.threshold:g}% while runs send work, reported: {low}")
        if self.busy:
            busy = ", ".join(f"{name} ({value:.0f}%)" for name, value in sorted(self.busy.items()))
            parts.append(f"at or above {self.threshold:g}%: {busy}")
        return ". ".join(parts) if parts else "no model pod reports GPU utilisation"


def plan(
    utilisation: Mapping[str, Mapping[str, float]],
    working: Mapping[str, list[str]],
    threshold: float = DEFAULT_THRESHOLD_PERCENT,
    window: str = DEFAULT_WINDOW,
) -> UtilisationPlan:
    """Decide per Deployment from its pods' utilisation and the runs sending it work (Deployment -> run ids)."""
    decided = UtilisationPlan(threshold, window)
    for name, pods in utilisation.items():
        mean = sum(pods.values()) / len(pods)
        if mean >= threshold:
            decided.busy[name] = mean
        elif working.get(name):
            decided.report[name] = (mean, list(working[name]))
        else:
            decided.scale_down[name] = mean
    return decided
