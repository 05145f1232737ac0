"""The resources every entry point (UI, CLI, tests) starts from, configured from the environment."""

import os

from grace_dagster.resources.endpoints import LLMEndpoints
from grace_dagster.resources.monitoring import GpuMonitor
from grace_dagster.resources.settings import ExperimentSettings
from grace_dagster.resources.storage import Storage


def default_resources() -> dict[str, object]:
    return {
        "storage": Storage(
            data_dir=os.environ.get("GRACE_DATA_DIR", "data"),
            input_dir=os.environ.get("GRACE_INPUT_DIR") or None,
        ),
        # local: embedded servers on this machine; k8s: the models' vLLM Deployments (set on the cluster).
        "llm": LLMEndpoints(mode=os.environ.get("GRACE_ENDPOINTS", "local")),
        "settings": ExperimentSettings(),
        # The cluster's Prometheus (GRACE_PROMETHEUS_URL), for the GPU-utilisation sensor.
        "gpu_monitor": GpuMonitor(),
    }
