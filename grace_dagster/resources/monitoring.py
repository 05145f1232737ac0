"""`GpuMonitor`: where the cluster's GPU utilisation is read (the scale_down_underused_gpus sensor's resource)."""

import os

from dagster import ConfigurableResource
from pydantic import Field

from grace_dagster.k8s.conventions import NAMESPACE
from grace_dagster.k8s.utilisation import DEFAULT_THRESHOLD_PERCENT, DEFAULT_WINDOW, PrometheusQuery


class GpuMonitor(ConfigurableResource):
    """The Prometheus that scrapes the NVIDIA DCGM exporter, and the NRP's utilisation rule."""

    prometheus_url: str | None = Field(
        default_factory=lambda: os.environ.get("GRACE_PROMETHEUS_URL") or None,
        description="Prometheus HTTP API root (env GRACE_PROMETHEUS_URL); unset: the sensor only says so",
    )
    threshold_percent: float = Field(
        default=DEFAULT_THRESHOLD_PERCENT, description="the NRP flags GPU pods below this utilisation"
    )
    window: str = Field(default=DEFAULT_WINDOW, description="averaging window, a Prometheus duration (10m, 1h)")
    namespace_label: str = Field(default="namespace", description="label of the exporter's series naming the namespace")
    pod_label: str = Field(default="pod", description="label naming the pod (exported_pod on some setups)")

    def query(self, namespace: str = NAMESPACE) -> PrometheusQuery | None:
        if not self.prometheus_url:
            return None
        return PrometheusQuery(
            url=self.prometheus_url,
            namespace=namespace,
            window=self.window,
            namespace_label=self.namespace_label,
            pod_label=self.pod_label,
        )
