"""LLMEndpoints in k8s mode, the admission check and the idle-model sensor, through the real `kubernetes` client.

The Kubernetes API server here is a FAKE (tests/k8s_fake.py): no cluster is reachable from the development
machines, so a small HTTP server on 127.0.0.1 answers the few calls the code makes the way a real one does where
the code depends on it: PATCH bodies checked against the client's models, 403 for anything the Role rendered into
k8s/03-rbac.yaml does not grant to grace-run, and 429/500 now and then while a Deployment rolls out. It starts from
the committed manifests under k8s/models/ and also answers `GET /v1/models` for ready models, standing in for the
vLLM Services (the tests point `base_urls` at it). Runs are real runs in a real (temporary) Dagster instance.
"""

import copy
import time
from pathlib import Path

import kubernetes
import pytest
import yaml
from dagster import (
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    DefaultSensorStatus,
    SkipReason,
    asset,
    build_sensor_context,
    materialize,
)
from dagster._core.remote_origin import RegisteredCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin

from grace_dagster.k8s import cluster as cluster_module
from grace_dagster.k8s.admission import AdmissionRefused
from grace_dagster.k8s.cluster import ClusterError, api_client, service_url
from grace_dagster.k8s.conventions import NAMESPACE, deployment_name
from grace_dagster.registry import DEFAULT_REGISTRY_PATH, load_registry
from grace_dagster.resources.endpoints import LLMEndpoints
from grace_dagster.resources.settings import ExperimentSettings
from grace_dagster.sensors import scale_idle_models
from tests.k8s_fake import FakeCluster, role_rules

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = load_registry()
READY_DELAY = 0.3


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    # The fake asks for Retry-After: 1 like a real server; the tests need not wait that long.
    monkeypatch.setattr(cluster_module, "RETRY_BASE_DELAY", 0.01)
    monkeypatch.setattr(cluster_module, "RETRY_MAX_DELAY", 0.02)


@pytest.fixture
def cluster():
    with FakeCluster(ready_delay=READY_DELAY) as fake:
        yield fake
    assert not fake.unexpected, f"calls the fake does not implement: {fake.unexpected}"


@pytest.fixture
def instance():
    # In memory: the run storage filters by status and tag like the PostgreSQL one, without a schema to migrate.
    with DagsterInstance.ephemeral() as inst:
        yield inst


def _k8s(fake: FakeCluster, **kwargs) -> LLMEndpoints:
    slugs = [m.slug for m in REGISTRY.models if m.on_cluster]
    kwargs.setdefault("base_urls", {slug: fake.url for slug in slugs})
    kwargs.setdefault("ready_timeout", 10.0)
    return LLMEndpoints(mode="k8s", api_host=fake.url, poll_interval=0.05, **kwargs)


# Dagster keeps a queued run's origin so the daemon can launch it later; these runs are never launched.
_ORIGIN = RemoteJobOrigin(
    repository_origin=RemoteRepositoryOrigin(
        code_location_origin=RegisteredCodeLocationOrigin(location_name="grace"), repository_name="__repository__"
    ),
    job_name="__ASSET_JOB",
)


def _add_run(instance, run_id: str, status: DagsterRunStatus, **tags: str) -> None:
    """A run in the instance as the run coordinator and run worker leave it, with the project's tags."""
    instance.add_run(
        DagsterRun(job_name="__ASSET_JOB", run_id=run_id, status=status, tags=tags, remote_job_origin=_ORIGIN)
    )


def _use_model(slug: str, seen: dict):
    """An asset that asks the resource for the model's endpoint, as the experiment assets do."""

    @asset
    def probe(llm: LLMEndpoints) -> None:
        try:
            seen["endpoint"] = llm.endpoint(slug)
            seen["again"] = llm.endpoint(slug)
        except Exception as e:
            seen["error"] = e
            raise

    return probe


# --- ensure ready ------------------------------------------------------------------------------------------------


def test_scale_from_zero_wait_until_served_and_teardown_never_scales_down(cluster, instance):
    name = deployment_name("gemma-2-9b")
    assert cluster.replicas(name) == 0
    seen: dict = {}
    started = time.monotonic()
    result = materialize(
        [_use_model("gemma-2-9b", seen)],
        resources={"llm": _k8s(cluster)},
        instance=instance,
        tags={"grace/user": "alice", "grace/model": "gemma-2-9b"},
    )
    assert result.success
    assert time.monotonic() - started >= READY_DELAY, "the endpoint was handed out only after the rollout"
    assert seen["endpoint"].base_url == cluster.url and seen["again"] is seen["endpoint"]
    assert cluster.scales == [(name, 1)], "scaled once from 0 to 1, through deployments/scale"
    polls = [c for c in cluster.calls if c == ("GET", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{name}")]
    assert len(polls) >= 3, "readiness was polled until the replica was ready"
    assert ("GET", "/v1/models") in cluster.calls
    # Resources are torn down after every step under the k8s executor: the model must stay up.
    assert cluster.replicas(name) == 1

    # A second run finds the model up: admitted and served without another scale-up.
    seen.clear()
    result = materialize(
        [_use_model("gemma-2-9b", seen)],
        resources={"llm": _k8s(cluster)},
        instance=instance,
        tags={"grace/user": "alice", "grace/model": "gemma-2-9b"},
    )
    assert result.success and cluster.scales == [(name, 1)] and cluster.replicas(name) == 1


def test_a_model_scaled_down_during_the_rollout_is_scaled_up_again(cluster):
    name = deployment_name("gemma-2-2b")
    cluster.race_scale_down.add(name)
    assert _k8s(cluster, user="alice").endpoint("gemma-2-2b").base_url == cluster.url
    assert cluster.scales == [(name, 1), (name, 1)] and cluster.replicas(name) == 1


def test_base_url_is_the_model_service_in_the_namespace():
    assert service_url("llama-3.1-70b") == "http://vllm-llama-3-1-70b.grace.svc:8000"
    assert service_url("gemma-2-9b", "other") == "http://vllm-gemma-2-9b.other.svc:8000"


def test_a_deployment_that_never_becomes_ready_times_out_with_advice(cluster):
    name = deployment_name("gemma-2-27b")
    cluster.never_ready.add(name)
    llm = _k8s(cluster, user="alice", ready_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ClusterError) as info:
        llm.endpoint("gemma-2-27b")
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert f"deployment {name} in namespace {NAMESPACE} has no ready replica after 0.5 s (ready_timeout)" in message
    assert "1 desired, 1 created, 0 ready" in message and "MinimumReplicasUnavailable" in message
    assert f"kubectl -n {NAMESPACE} describe deployment {name}" in message
    assert "2 free GPU(s) of NVIDIA-A40" in message and "ready_timeout" in message


def test_a_ready_deployment_that_never_serves_the_model_times_out_with_advice(cluster):
    name = deployment_name("gpt-oss-20b")
    cluster.not_serving.add(name)
    with pytest.raises(ClusterError) as info:
        _k8s(cluster, user="alice", ready_timeout=1.0).endpoint("gpt-oss-20b")
    message = str(info.value)
    assert f"deployment {name} in namespace grace is ready, but {cluster.url}/v1/models did not list" in message
    assert "'openai/gpt-oss-20b' within 1 s (ready_timeout); last: it lists []" in message
    assert f"kubectl -n grace logs deployment/{name}" in message and "port-forward svc/" in message


def test_a_deployment_missing_from_the_cluster_says_how_to_create_it(cluster):
    del cluster.deployments[deployment_name("gpt-oss-20b")]
    with pytest.raises(ClusterError, match=r"does not exist in namespace grace.*kubectl apply -R -f k8s/"):
        _k8s(cluster, user="alice").endpoint("gpt-oss-20b")
    assert cluster.scales == []


def test_external_and_embedded_models_need_no_cluster_in_k8s_mode(cluster, monkeypatch):
    monkeypatch.setenv("DEEPSEEK_API_KEY", "sk-test-secret")
    llm = _k8s(cluster, user="alice", base_urls={"smollm2-135m": "http://127.0.0.1:9"})
    assert llm.endpoint("deepseek-chat-api").base_url == "https://api.deepseek.com/v1"
    assert llm.endpoint("smollm2-135m").base_url == "http://127.0.0.1:9"
    assert cluster.calls == []


# --- the API answers like a real one -------------------------------------------------------------------------------


def test_readiness_wait_rides_out_429_and_500_from_the_api(cluster):
    name = deployment_name("gemma-2-9b")
    cluster.ready_delay = 1.5  # long enough for several polls, so the fake throttles some of them
    cluster.flaky_every = 2
    assert _k8s(cluster, user="alice").endpoint("gemma-2-9b").base_url == cluster.url
    statuses = {code for code, _ in cluster.refused}
    assert statuses == {429, 500}, cluster.refused
    assert cluster.scales == [(name, 1)]


def test_a_persistent_api_failure_is_reported_after_the_retries(cluster):
    cluster.ready_delay = 60.0
    cluster.flaky_every, cluster.flaky_statuses = 1, (500,)  # every read during the rollout fails
    with pytest.raises(ClusterError) as info:
        _k8s(cluster, user="alice").endpoint("gemma-2-2b")
    message = str(info.value)
    assert "failed to get deployments vllm-gemma-2-2b in namespace grace: HTTP" in message
    assert f"after {cluster_module.RETRY_ATTEMPTS} attempts" in message
    assert len(cluster.refused) == cluster_module.RETRY_ATTEMPTS


def _role_without(resource: str) -> list[dict]:
    rules = copy.deepcopy(role_rules())
    for rule in rules:
        rule["resources"] = [r for r in rule["resources"] if r != resource]
    return rules


def test_403_stops_at_once_and_names_the_missing_permission(cluster):
    cluster.rules = _role_without("deployments/scale")
    with pytest.raises(ClusterError) as info:
        _k8s(cluster, user="alice").endpoint("gemma-2-9b")
    message = str(info.value)
    assert "refused to patch deployments/scale vllm-gemma-2-9b in namespace grace (HTTP 403 Forbidden" in message
    assert 'cannot patch resource "deployments/scale" in API group "apps"' in message
    assert "Missing permission: `patch` on `deployments/scale` for vllm-gemma-2-9b" in message
    assert "kubectl apply -f k8s/03-rbac.yaml" in message
    assert cluster.refused == [
        (403, f"PATCH /apis/apps/v1/namespaces/grace/deployments/{deployment_name('gemma-2-9b')}/scale")
    ]


def test_a_model_the_applied_role_does_not_name_is_refused_on_read(cluster):
    """A model added to the registry after the Role was applied: its Deployment is not in resourceNames."""
    name = deployment_name("gemma-2-27b")
    cluster.rules = copy.deepcopy(role_rules())
    cluster.rules[0]["resourceNames"].remove(name)
    with pytest.raises(ClusterError, match=r"Missing permission: `get` on `deployments` for vllm-gemma-2-27b"):
        _k8s(cluster, user="alice").endpoint("gemma-2-27b")
    assert cluster.scales == []


def test_the_fake_checks_patch_bodies_against_the_client_models(cluster):
    """What the code sends passes; what a real server would refuse, the fake refuses too."""
    apps = kubernetes.client.AppsV1Api(api_client(cluster.url))
    name = deployment_name("gemma-2-2b")

    def patch(body, **kwargs):
        return apps.patch_namespaced_deployment_scale(
            name, NAMESPACE, body, _content_type="application/merge-patch+json", **kwargs
        )

    with pytest.raises(kubernetes.client.ApiException) as info:
        patch({"spec": {"replica": 1}}, field_validation="Strict")
    assert info.value.status == 400 and 'unknown field \\"spec.replica\\"' in info.value.body
    with pytest.raises(kubernetes.client.ApiException) as info:
        patch({"spec": {"replicas": "1"}})
    assert info.value.status == 400 and "of type int32" in info.value.body
    patch({"spec": {"replica": 1}})  # without Strict the server drops the unknown field and warns
    assert cluster.warnings == ['unknown field "spec.replica"'] and cluster.replicas(name) == 0
    patch({"spec": {"replicas": 1}}, field_validation="Strict")
    assert cluster.replicas(name) == 1


# --- admission ---------------------------------------------------------------------------------------------------


def _registry_without_exception(tmp_path, slug: str, rule: str) -> str:
    raw = yaml.safe_load(DEFAULT_REGISTRY_PATH.read_text())
    entry = next(m for m in raw["models"] if m["slug"] == slug)
    entry["nrp_exceptions"] = [e for e in entry["nrp_exceptions"] if e["rule"] != rule]
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def test_refused_on_the_nrp_policy_of_the_registry_entry(cluster, tmp_path):
    registry = _registry_without_exception(tmp_path, "llama-3.1-70b", "gpus-over-2")
    with pytest.raises(AdmissionRefused) as info:
        _k8s(cluster, user="alice", registry_path=registry).endpoint("llama-3.1-70b")
    message = str(info.value)
    assert "NRP policy: Deployment/vllm-llama-3-1-70b (rendered from the registry): [gpus-over-2]" in message
    assert "needs 4 GPUs per pod (allowed: 2)" in message and "Fix: add {rule: gpus-over-2" in message
    assert message.count("[gpus-over-2]") == 1, "the same violation of the live object is not repeated"
    assert cluster.scales == [], "nothing is scaled up before admission passes"


def test_refused_on_the_nrp_policy_of_a_live_deployment_edited_by_hand(cluster):
    name = deployment_name("gemma-2-9b")
    server = cluster.deployments[name]["spec"]["template"]["spec"]["containers"][0]
    server["resources"]["limits"]["memory"] = "64Gi"  # someone ran `kubectl edit`
    with pytest.raises(AdmissionRefused) as info:
        _k8s(cluster, user="alice").endpoint("gemma-2-9b")
    message = str(info.value)
    assert f"Deployment/{name} (live in the cluster): [limits-within-20pct]" in message
    assert "the NRP allows at most 120%" in message
    assert cluster.scales == []


def test_refused_when_the_namespace_gpu_quota_would_be_exceeded(cluster):
    cluster.set_replicas(deployment_name("llama-3.1-70b"), 3)  # 12 GPUs
    cluster.set_replicas(deployment_name("gpt-oss-120b"), 1)  # 2 GPUs
    with pytest.raises(AdmissionRefused) as info:
        _k8s(cluster, user="alice").endpoint("gemma-2-27b")  # 2 more: 16 > 15
    message = str(info.value)
    assert "namespace GPU quota: the limit is 15 GPUs" in message
    assert "14 are held (vllm-gpt-oss-120b: 1 × 2, vllm-llama-3-1-70b: 3 × 4)" in message
    assert "scaling vllm-gemma-2-27b to 1 needs 2 more, 16 in all" in message
    assert "kubectl -n grace scale deployment <name> --replicas=0" in message
    assert cluster.scales == []

    # One GPU still fits, and a model that is already up adds nothing.
    assert _k8s(cluster, user="alice").endpoint("gemma-2-9b").base_url == cluster.url
    assert _k8s(cluster, user="alice").endpoint("gpt-oss-120b").base_url == cluster.url
    assert cluster.scales == [(deployment_name("gemma-2-9b"), 1)]


def test_refused_over_the_per_user_limit_of_gpu_backed_runs(cluster, instance):
    _add_run(instance, "alice-9b", DagsterRunStatus.STARTED, **{"grace/user": "alice", "grace/model": "gemma-2-9b"})
    # Not counted: a CPU model, a finished run, a queued run, another user.
    _add_run(instance, "alice-cpu", DagsterRunStatus.STARTED, **{"grace/user": "alice", "grace/model": "smollm2-135m"})
    _add_run(instance, "alice-done", DagsterRunStatus.SUCCESS, **{"grace/user": "alice", "grace/model": "gemma-2-27b"})
    _add_run(instance, "alice-queued", DagsterRunStatus.QUEUED, **{"grace/user": "alice", "grace/model": "gemma-2-27b"})
    _add_run(instance, "bob-2b", DagsterRunStatus.STARTED, **{"grace/user": "bob", "grace/model": "gemma-2-2b"})

    def run(user: str, **llm_config) -> tuple[bool, dict]:
        seen: dict = {}
        result = materialize(
            [_use_model("gemma-2-2b", seen)],
            resources={"llm": _k8s(cluster, **llm_config)},
            instance=instance,
            tags={"grace/user": user, "grace/model": "gemma-2-2b"},
            raise_on_error=False,
        )
        return result.success, seen

    ok, seen = run("alice")
    assert not ok and isinstance(seen["error"], AdmissionRefused)
    message = str(seen["error"])
    assert "per-user GPU limit: user 'alice' may have 1 GPU-backed run(s) at a time and has 1 running" in message
    assert "alice-9b (gemma-2-9b, STARTED)" in message and "alice-cpu" not in message
    assert "wait for it to finish or cancel it" in message and "user_exceptions (e.g. {alice: 2})" in message
    assert cluster.scales == []

    ok, seen = run("carol")  # her only GPU-backed run is this one, which is not counted against itself
    assert ok, seen.get("error")
    ok, seen = run("alice", user_exceptions={"alice": 2})
    assert ok, seen.get("error")
    assert cluster.scales == [(deployment_name("gemma-2-2b"), 1)]


def test_a_run_without_a_user_is_refused(cluster, monkeypatch):
    monkeypatch.delenv("GRACE_USER", raising=False)
    with pytest.raises(AdmissionRefused, match=r"no user is known for this run.*grace/user"):
        _k8s(cluster).endpoint("gemma-2-9b")
    monkeypatch.setenv("GRACE_USER", "alice")
    assert _k8s(cluster).endpoint("gemma-2-9b").base_url == cluster.url


# --- the idle-model sensor ---------------------------------------------------------------------------------------


JUDGE = "deepseek-r1-distill-qwen-32b"  # the cluster's judge: no run is tagged with it, every run may need it


def _evaluate_sensor(instance, llm: LLMEndpoints):
    """One tick of the sensor, as the daemon runs it (resources set up and torn down around the evaluation)."""
    resources = {"llm": llm, "settings": ExperimentSettings(judge_model=JUDGE)}
    with build_sensor_context(instance=instance, resources=resources) as context:
        return scale_idle_models(context)


def test_sensor_scales_idle_models_to_zero_and_keeps_those_runs_need(cluster, instance):
    for slug in ("gemma-2-2b", "gemma-2-9b", "gpt-oss-20b", "gpt-oss-120b", "gemma-2-27b", JUDGE):
        cluster.set_replicas(deployment_name(slug), 1)
    _add_run(instance, "running", DagsterRunStatus.STARTED, **{"grace/model": "gemma-2-9b", "grace/user": "a"})
    _add_run(instance, "starting", DagsterRunStatus.STARTING, **{"grace/model": "gemma-2-27b"})
    # Launched from the UI for one model × study partition: only Dagster's own partition tag names the model.
    _add_run(instance, "queued", DagsterRunStatus.QUEUED, **{"dagster/partition/model": "gpt-oss-20b"})
    _add_run(instance, "finished", DagsterRunStatus.SUCCESS, **{"grace/model": "gemma-2-2b"})
    _add_run(instance, "failed", DagsterRunStatus.FAILURE, **{"grace/model": "gpt-oss-120b"})

    result = _evaluate_sensor(instance, _k8s(cluster))

    assert isinstance(result, SkipReason)
    assert sorted(cluster.scales) == [(deployment_name("gemma-2-2b"), 0), (deployment_name("gpt-oss-120b"), 0)]
    for slug in ("gemma-2-9b", "gemma-2-27b", "gpt-oss-20b", JUDGE):
        assert cluster.replicas(deployment_name(slug)) == 1, f"{slug} is needed by a run and stays up"
    assert "scaled to 0: vllm-gemma-2-2b, vllm-gpt-oss-120b" in result.skip_message
    assert "vllm-gemma-2-9b (needed by run running (STARTED))" in result.skip_message

    # A run being cancelled still executes: its model stays. Once the runs end, their models go too.
    cluster.scales.clear()
    instance.report_run_canceling(instance.get_run_by_id("running"))
    _evaluate_sensor(instance, _k8s(cluster))
    assert cluster.scales == []
    instance.report_run_canceled(instance.get_run_by_id("running"))
    for run_id in ("starting", "queued"):
        instance.report_run_failed(instance.get_run_by_id(run_id))
    _evaluate_sensor(instance, _k8s(cluster))
    assert sorted(cluster.scales) == sorted(
        (deployment_name(s), 0) for s in ("gemma-2-9b", "gemma-2-27b", "gpt-oss-20b", JUDGE)
    )
    assert all(cluster.replicas(deployment_name(m.slug)) == 0 for m in REGISTRY.models if m.on_cluster)


def test_sensor_is_stopped_by_default_and_does_nothing_in_local_mode(cluster, instance):
    from grace_dagster.definitions import defs

    assert scale_idle_models in defs.sensors
    assert scale_idle_models.default_status == DefaultSensorStatus.STOPPED
    result = _evaluate_sensor(instance, LLMEndpoints(api_host=cluster.url))
    assert isinstance(result, SkipReason) and "'local' mode" in result.skip_message
    assert "only acts in k8s mode" in result.skip_message
    assert cluster.calls == []
