"""The GPU-utilisation sensor against a REAL Prometheus server (Debian's `prometheus`, started here on 127.0.0.1).

Prometheus scrapes, every second, a small exporter in this file that serves `DCGM_FI_DEV_GPU_UTIL` in the NVIDIA
DCGM exporter's format (one series per GPU, labelled with the pod and namespace holding it). The sensor asks
Prometheus' HTTP API, as it does on the cluster. The Kubernetes API is the fake of tests/k8s_fake.py (real
`kubernetes` client, the Role of k8s/03-rbac.yaml enforced); runs are real runs in a temporary Dagster instance.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from dagster import (
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    SkipReason,
    build_sensor_context,
)

from grace_dagster.k8s import cluster as cluster_module
from grace_dagster.k8s.conventions import NAMESPACE, deployment_name
from grace_dagster.resources.endpoints import LLMEndpoints
from grace_dagster.resources.monitoring import GpuMonitor
from grace_dagster.resources.settings import ExperimentSettings
from grace_dagster.sensors import TAG_GPU_UTILISATION, watch_gpu_utilisation
from tests.k8s_fake import REGISTRY, FakeCluster
from tests.test_k8s_endpoints import _add_run

WINDOW = "5s"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
# Pod names as the ReplicaSet controller makes them: <deployment>-<template hash>-<suffix>.
IDLE = "vllm-gemma-2-2b-7c9d8b5f4-x2k4p"  # 10%, no run: scaled to zero
UNDERFED = "vllm-gemma-2-9b-5f6d7c8b9-q7wzt"  # 10% while a run sends work: reported to that run
BUSY = "vllm-gpt-oss-20b-6b7c8d9f5-m4n5p"  # 80%, no run: left alone
BUSY_PAIR = "vllm-gpt-oss-120b-8d9f5b6c7-h2j4k"  # two GPUs at 85% and 75% while a run works: left alone
SERIES = [
    (IDLE, NAMESPACE, "0", 10),
    (UNDERFED, NAMESPACE, "1", 10),
    (BUSY, NAMESPACE, "2", 80),
    (BUSY_PAIR, NAMESPACE, "3", 85),
    (BUSY_PAIR, NAMESPACE, "4", 75),
    # Another namespace's pod with one of our Deployment names: not ours, never read.
    ("vllm-gemma-2-27b-5b6c7d8f9-r2s4t", "someone-else", "5", 5),
]


def _dcgm_text() -> bytes:
    lines = [
        "# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).",
        "# TYPE DCGM_FI_DEV_GPU_UTIL gauge",
    ]
    for pod, namespace, gpu, value in SERIES:
        labels = (
            f'gpu="{gpu}",UUID="GPU-00000000-0000-0000-0000-00000000000{gpu}",pci_bus_id="00000000:3{gpu}:00.0",'
            f'device="nvidia{gpu}",modelName="NVIDIA A100-SXM4-80GB",Hostname="gpu-node-{gpu}",'
            f'DCGM_FI_DRIVER_VERSION="550.54.15",container="vllm",namespace="{namespace}",pod="{pod}"'
        )
        lines.append(f"DCGM_FI_DEV_GPU_UTIL{{{labels}}} {value}")
    return ("\n".join(lines) + "\n").encode()


class _Exporter(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        body = _dcgm_text()
        self.send_response(200 if self.path == "/metrics" else 404)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_samples(url: str, deadline: float) -> None:
    """Until every series has at least 3 samples inside the window the sensor averages over."""
    query = f"min(count_over_time(DCGM_FI_DEV_GPU_UTIL[{WINDOW}]))"
    while True:
        try:
            result = httpx.get(f"{url}/api/v1/query", params={"query": query}, timeout=2).json()["data"]["result"]
            if result and float(result[0]["value"][1]) >= 3:
                count = httpx.get(f"{url}/api/v1/query", params={"query": "count(DCGM_FI_DEV_GPU_UTIL)"}, timeout=2)
                if float(count.json()["data"]["result"][0]["value"][1]) == len(SERIES):
                    return
        except (httpx.HTTPError, KeyError, IndexError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"Prometheus at {url} has not scraped the exporter 3 times")
        time.sleep(0.25)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory) -> Iterator[str]:
    exporter = ThreadingHTTPServer(("127.0.0.1", 0), _Exporter)
    threading.Thread(target=exporter.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    home = tmp_path_factory.mktemp("prometheus")
    config = home / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: dcgm-exporter\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{exporter.server_address[1]}']\n"
    )
    port = _free_port()
    log = (home / "prometheus.log").open("w")
    server = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={home / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_samples(url, time.monotonic() + 60)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        exporter.shutdown()
        exporter.server_close()


@pytest.fixture
def cluster(monkeypatch):
    monkeypatch.setattr(cluster_module, "RETRY_BASE_DELAY", 0.01)
    with FakeCluster() as fake:
        for pod in (IDLE, UNDERFED, BUSY, BUSY_PAIR):
            fake.set_replicas(pod.rsplit("-", 2)[0], 1)
        yield fake
    assert not fake.unexpected


def _evaluate(instance: DagsterInstance, fake: FakeCluster, prometheus_url: str | None):
    vllm = [m.slug for m in REGISTRY.models if m.serving.backend == "vllm"]
    resources = {
        "llm": LLMEndpoints(mode="k8s", api_host=fake.url, base_urls={s: fake.url for s in vllm}),
        "settings": ExperimentSettings(judge_model="deepseek-chat-api"),
        "gpu_monitor": GpuMonitor(prometheus_url=prometheus_url, window=WINDOW),
    }
    with build_sensor_context(instance=instance, resources=resources) as context:
        return watch_gpu_utilisation(context)


def _engine_events(instance: DagsterInstance, run_id: str) -> list:
    return instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT)


def test_idle_gpus_are_scaled_to_zero_underfed_ones_reported_busy_ones_left_alone(prometheus, cluster):
    with DagsterInstance.ephemeral() as instance:
        _add_run(instance, "r-9b", DagsterRunStatus.STARTED, **{"grace/model": "gemma-2-9b", "grace/user": "a"})
        _add_run(instance, "r-120b", DagsterRunStatus.STARTED, **{"grace/model": "gpt-oss-120b", "grace/user": "b"})
        # Queued, not sending work: the idle model is scaled down all the same (the run scales it up when it starts).
        _add_run(instance, "r-2b", DagsterRunStatus.QUEUED, **{"grace/model": "gemma-2-2b", "grace/user": "c"})

        result = _evaluate(instance, cluster, prometheus)

        assert isinstance(result, SkipReason)
        assert cluster.scales == [(deployment_name("gemma-2-2b"), 0)]
        for slug in ("gemma-2-9b", "gpt-oss-20b", "gpt-oss-120b"):
            assert cluster.replicas(deployment_name(slug)) == 1, slug

        (event,) = _engine_events(instance, "r-9b")
        assert "vllm-gemma-2-9b (gemma-2-9b) is 10% averaged over 5s, below the NRP's 40%" in event.message
        assert "max_concurrency" in event.message
        metadata = event.dagster_event.engine_event_data.metadata
        assert metadata["gpu_utilisation_percent"].value == 10.0 and metadata["window"].value == WINDOW
        tags = instance.get_run_by_id("r-9b").tags
        assert tags[TAG_GPU_UTILISATION] == "10% of vllm-gemma-2-9b over 5s (NRP minimum 40%)"
        assert _engine_events(instance, "r-120b") == []
        assert TAG_GPU_UTILISATION not in instance.get_run_by_id("r-120b").tags

        message = result.skip_message
        assert "no run sending work, scaled to 0: vllm-gemma-2-2b (10%)" in message
        assert "reported: vllm-gemma-2-9b (10%) to run(s) r-9b" in message
        assert "at or above 40%: vllm-gpt-oss-120b (80%), vllm-gpt-oss-20b (80%)" in message
        assert "gemma-2-27b" not in message


def test_without_a_reachable_prometheus_the_sensor_says_what_to_set(cluster):
    with DagsterInstance.ephemeral() as instance:
        unset = _evaluate(instance, cluster, None)
        assert "set GRACE_PROMETHEUS_URL" in unset.skip_message

        down = _evaluate(instance, cluster, f"http://127.0.0.1:{_free_port()}")
        assert "cannot reach Prometheus at http://127.0.0.1:" in down.skip_message
        assert "prometheus_url (env GRACE_PROMETHEUS_URL)" in down.skip_message
    assert cluster.scales == []
