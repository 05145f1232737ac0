"""The deployment: the Helm values, the instance config they render, the run pods, the run queue, the image.

There is no helm, no docker engine and no cluster on the development machines, so each part is checked with the real
tool that can run here:

- Helm values: merged onto the chart's defaults the way helm merges them, then validated against the chart's own
  values.schema.json (both vendored in deploy/helm/chart/, see its README for the source commit). The schema's
  references to Kubernetes definitions (kubernetes-json-schema v1.19 on GitHub) resolve to kubernetes-validate's
  offline definitions for the project's pinned Kubernetes version.
- Instance config: the chart's dagster.yaml is rendered from the values by `render_instance`, a transliteration of
  the chart's templates (cited per function), then checked by Dagster's own config schema and by each configured
  class's schema. The local dagster.yaml is loaded into a real DagsterInstance.
- Run pods: built by dagster-k8s's own K8sRunLauncher from that instance config (its Kubernetes client replaced by a
  recorder, its kubeconfig by a dummy file), then validated against the Kubernetes schemas and the NRP policy.
- The run queue: Dagster's own queue daemon dequeues real queued runs against each instance config, with Dagster's
  mocked run launcher so nothing is executed.
- The code server: the user-code subchart's templates transliterated in tests/helm_user_code.py render its
  Deployment from the values (service account, environment), and every key we set under
  `dagster-user-deployments` must be one those templates read: the chart's schema accepts unknown keys silently.
- The image: deploy/Dockerfile is checked statically (no docker engine here to build it) and linted by hadolint.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes
import kubernetes_validate
import pytest
import referencing
import referencing.jsonschema
import yaml
from dagster import DagsterInstance, asset, materialize
from dagster._config import process_config
from dagster._core.errors import DagsterInvalidConfigError
from dagster._core.instance.config import dagster_instance_config
from dagster._core.storage.dagster_run import DagsterRunStatus
from dagster._serdes.config_class import ConfigurableClassData
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from grace_dagster.k8s.conventions import LABEL_MODEL_CLIENT, QUOTA_HARD
from grace_dagster.k8s.manifests import load_manifests
from grace_dagster.k8s.policy import check_objects, pod_spec, required_exceptions
from grace_dagster.k8s.schema import KUBERNETES_VERSION, validate_object
from grace_dagster.registry import load_registry
from tests.helm_user_code import helm_merge, render_user_code

ROOT = Path(__file__).resolve().parents[1]
LOCAL_INSTANCE = ROOT / "dagster.yaml"
DEPLOY = ROOT / "deploy"
VALUES = DEPLOY / "helm" / "values.yaml"
CHART = DEPLOY / "helm" / "chart"
RELEASE, NAMESPACE = "grace-dagster", "grace"
POOL = "llm-endpoints"
IMAGE = "gitlab-registry.nrp-nautilus.io/grace/grace-dagster:0.1.0"
# Where the chart's schema points for Kubernetes object definitions.
K8S_DEFINITIONS_URL = "https://raw.githubusercontent.com/yannh/kubernetes-json-schema/master/v1.19.0/_definitions.json"


# --- helm, emulated ----------------------------------------------------------------------------------------------


def helm_values(overrides: Mapping | None = None) -> dict:
    """The values helm would render with: chart defaults, then deploy/helm/values.yaml, then `overrides`."""
    values = helm_merge(yaml.safe_load((CHART / "values.yaml").read_text()), yaml.safe_load(VALUES.read_text()))
    return helm_merge(values, overrides or {})


def _k8s_definitions() -> referencing.Resource:
    version_dir = f"v{KUBERNETES_VERSION}.0-local"
    path = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / version_dir / "_definitions.json"
    local = json.loads(path.read_text())
    # The chart points into `definitions`; kubernetes-validate's copy keeps them (and its own refs) under `$defs`.
    contents = {"$defs": local["$defs"], "definitions": local["$defs"]}
    return referencing.jsonschema.DRAFT202012.create_resource(contents)


def chart_schema_errors(values: Mapping) -> list[str]:
    schema = json.loads((CHART / "values.schema.json").read_text())
    registry = referencing.Registry().with_resource(K8S_DEFINITIONS_URL, _k8s_definitions())
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return sorted(
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(values)
    )


def _empty(value: Any) -> bool:
    """Sprig's `empty`: what helm templates treat as unset."""
    return value is None or value is False or value == 0 or value == "" or value == [] or value == {}


def _fullname(values: Mapping) -> str:
    # helpers/_helpers.tpl "dagster.fullname": the release name when it already contains the chart name.
    return values.get("fullnameOverride") or (RELEASE if "dagster" in RELEASE else f"{RELEASE}-dagster")


def _postgres(values: Mapping) -> dict:
    """helpers/instance/_postgresql.tpl (commit 0bd187e), external database (postgresql.enabled false)."""
    pg = values["postgresql"]
    config = {
        "username": pg["postgresqlUsername"],
        "password": {"env": "DAGSTER_PG_PASSWORD"},
        "hostname": pg["postgresqlHost"],
        "db_name": pg["postgresqlDatabase"],
        "port": pg["service"]["port"],
        "params": pg.get("postgresqlParams") or {},
    }
    if pg.get("postgresqlScheme"):
        config["scheme"] = pg["postgresqlScheme"]
    return {"postgres_db": config}


def _queued_run_coordinator(values: Mapping) -> dict:
    """helpers/instance/_run-coordinator.tpl (commit 7b87546): a config block renders once any field is set, and then
    always carries max_concurrent_runs (-1 when unset)."""
    qrc = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"] or {}
    block: dict[str, Any] = {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator"}
    if all(_empty(v) for v in qrc.values()):
        return block
    config: dict[str, Any] = {
        "max_concurrent_runs": -1 if qrc.get("maxConcurrentRuns") is None else qrc["maxConcurrentRuns"]
    }
    for key, name in (
        ("tagConcurrencyLimits", "tag_concurrency_limits"),
        ("dequeueIntervalSeconds", "dequeue_interval_seconds"),
        ("dequeueUseThreads", "dequeue_use_threads"),
        ("dequeueNumWorkers", "dequeue_num_workers"),
    ):
        if not _empty(qrc.get(key)):
            config[name] = qrc[key]
    if not _empty(qrc.get("blockOpConcurrencyLimitedRuns")):
        block_op = qrc["blockOpConcurrencyLimitedRuns"]
        config["block_op_concurrency_limited_runs"] = {
            "enabled": block_op["enabled"],
            "op_concurrency_slot_buffer": block_op["opConcurrencySlotBuffer"],
        }
    block["config"] = config
    return block


def _k8s_run_launcher(values: Mapping) -> dict:
    """helpers/instance/_run-launcher.tpl "dagsterYaml.runLauncher.k8s" (commit a07d616)."""
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    config: dict[str, Any] = {"load_incluster_config": k8s["loadInclusterConfig"]}
    if k8s.get("kubeconfigFile"):
        config["kubeconfig_file"] = k8s["kubeconfigFile"]
    config["job_namespace"] = k8s.get("jobNamespace") or NAMESPACE
    config["image_pull_policy"] = k8s["imagePullPolicy"]
    if values.get("imagePullSecrets"):
        config["image_pull_secrets"] = values["imagePullSecrets"]
    account = values["serviceAccount"]
    config["service_account_name"] = values["global"]["serviceAccountName"] or account.get("name") or _fullname(values)
    if "image" in k8s:
        config["job_image"] = f"{k8s['image']['repository']}:{k8s['image']['tag']}"
    config["dagster_home"] = values["global"]["dagsterHome"]
    config["instance_config_map"] = f"{_fullname(values)}-instance"
    config["postgres_password_secret"] = values["global"]["postgresqlSecretName"]
    if k8s.get("envConfigMaps"):
        config["env_config_maps"] = [m["name"] for m in k8s["envConfigMaps"] if "name" in m]
    if k8s.get("envSecrets"):
        config["env_secrets"] = [s["name"] for s in k8s["envSecrets"] if "name" in s]
    for key, name in (
        ("envVars", "env_vars"),
        ("volumeMounts", "volume_mounts"),
        ("volumes", "volumes"),
        ("labels", "labels"),
        ("resources", "resources"),
        ("schedulerName", "scheduler_name"),
        ("securityContext", "security_context"),
    ):
        if k8s.get(key):
            config[name] = k8s[key]
    if k8s.get("failPodOnRunFailure"):
        config["fail_pod_on_run_failure"] = True
    run_k8s = k8s.get("runK8sConfig") or {}
    if run_k8s:
        config["run_k8s_config"] = {
            name: run_k8s[key]
            for key, name in (
                ("containerConfig", "container_config"),
                ("podSpecConfig", "pod_spec_config"),
                ("podTemplateSpecMetadata", "pod_template_spec_metadata"),
                ("jobSpecConfig", "job_spec_config"),
                ("jobMetadata", "job_metadata"),
            )
            if run_k8s.get(key)
        }
    return {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": config}


def _concurrency(values: Mapping) -> dict:
    """helpers/instance/_concurrency.tpl (commit 99dc34f), including the conflicts for which it fails the render."""
    pools, runs = values["concurrency"]["pools"], values["concurrency"]["runs"]
    daemon = values["dagsterDaemon"]
    if daemon["runCoordinator"]["enabled"] and daemon["runCoordinator"]["type"] == "QueuedRunCoordinator":
        qrc = daemon["runCoordinator"]["config"]["queuedRunCoordinator"] or {}
        if runs.get("maxConcurrentRuns") is not None and qrc.get("maxConcurrentRuns") is not None:
            raise ValueError("helm: Cannot set both concurrency.runs.maxConcurrentRuns and queuedRunCoordinator's")
        if runs.get("tagConcurrencyLimits") and qrc.get("tagConcurrencyLimits"):
            raise ValueError("helm: Cannot set both concurrency.runs.tagConcurrencyLimits and queuedRunCoordinator's")
    rendered: dict[str, Any] = {}
    pool_fields = (("defaultLimit", "default_limit"), ("granularity", "granularity"))
    pool_fields += (("opGranularityRunBuffer", "op_granularity_run_buffer"),)
    if any(pools.get(key) is not None for key, _ in pool_fields):
        rendered["pools"] = {name: pools[key] for key, name in pool_fields if pools.get(key) is not None}
    if runs.get("maxConcurrentRuns") is not None or runs.get("tagConcurrencyLimits"):
        rendered["runs"] = {}
        if runs.get("maxConcurrentRuns") is not None:
            rendered["runs"]["max_concurrent_runs"] = runs["maxConcurrentRuns"]
        if runs.get("tagConcurrencyLimits"):
            rendered["runs"]["tag_concurrency_limits"] = [
                {"key": t["key"], **({"value": t["value"]} if t.get("value") else {}), "limit": t["limit"]}
                for t in runs["tagConcurrencyLimits"]
            ]
    return rendered


def render_instance(values: Mapping) -> dict:
    """The dagster.yaml of templates/configmap-instance.yaml (commit 2bdb239), for the parts these values use."""
    daemon = values["dagsterDaemon"]
    pg = _postgres(values)
    doc: dict[str, Any] = {
        "scheduler": {"module": "dagster._core.scheduler", "class": "DagsterDaemonScheduler"},
        "schedule_storage": {"module": "dagster_postgres.schedule_storage", "class": "PostgresScheduleStorage"},
        "run_launcher": _k8s_run_launcher(values),
        "run_storage": {"module": "dagster_postgres.run_storage", "class": "PostgresRunStorage"},
        "event_log_storage": {"module": "dagster_postgres.event_log", "class": "PostgresEventLogStorage"},
    }
    for storage in ("schedule_storage", "run_storage", "event_log_storage"):
        doc[storage]["config"] = copy.deepcopy(pg)
    assert values["runLauncher"]["type"] == "K8sRunLauncher", "render_instance covers the K8sRunLauncher only"
    if daemon["enabled"] and daemon["runCoordinator"]["enabled"]:
        assert daemon["runCoordinator"]["type"] == "QueuedRunCoordinator"
        doc["run_coordinator"] = _queued_run_coordinator(values)
    assert values["computeLogManager"]["type"] == "NoOpComputeLogManager"
    doc["compute_logs"] = {"module": "dagster.core.storage.noop_compute_log_manager", "class": "NoOpComputeLogManager"}
    monitoring = daemon["runMonitoring"]
    if daemon["enabled"] and monitoring["enabled"]:
        doc["run_monitoring"] = {"enabled": True, "start_timeout_seconds": monitoring["startTimeoutSeconds"]}
        for key, name in (
            ("cancelTimeoutSeconds", "cancel_timeout_seconds"),
            ("maxRuntimeSeconds", "max_runtime_seconds"),
            ("maxResumeRunAttempts", "max_resume_run_attempts"),
        ):
            if monitoring.get(key) is not None:
                doc["run_monitoring"][name] = monitoring[key]
        doc["run_monitoring"]["poll_interval_seconds"] = monitoring["pollIntervalSeconds"]
        doc["run_monitoring"]["free_slots_after_run_end_seconds"] = monitoring["freeSlotsAfterRunEndSeconds"]
    retries = daemon["runRetries"]
    if daemon["enabled"] and retries["enabled"]:
        doc["run_retries"] = {
            "enabled": True,
            **({"max_retries": retries["maxRetries"]} if retries.get("maxRetries") else {}),
        }
    for section in ("sensors", "schedules"):
        threads = daemon[section]
        if daemon["enabled"] and threads.get("useThreads"):
            doc[section] = {"use_threads": True}
            for key, name in (("numWorkers", "num_workers"), ("numSubmitWorkers", "num_submit_workers")):
                if threads.get(key):
                    doc[section][name] = threads[key]
    doc["telemetry"] = {"enabled": values["telemetry"]["enabled"]}
    if values["concurrency"]["enabled"]:
        doc["concurrency"] = _concurrency(values)
    doc.update(values.get("additionalInstanceConfig") or {})
    return doc


# --- dagster, for real -------------------------------------------------------------------------------------------


def validate_instance_config(doc: Mapping, home: Path) -> Mapping:
    """Dagster's own validation of a dagster.yaml (schema plus the cross-field rules); returns the processed config."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(dict(doc)))
    config, _ = dagster_instance_config(str(home))
    return config


def class_config_errors(block: Mapping) -> list[str]:
    """What the configured class's own config schema says about its config (without instantiating the class)."""
    data = ConfigurableClassData(block["module"], block["class"], yaml.safe_dump(dict(block.get("config") or {})))
    cls = getattr(importlib.import_module(data.module_name), data.class_name)
    result = process_config(cls.config_type(), data.config_dict)
    return [] if result.success else [e.message for e in result.errors]


@pytest.fixture
def pg_password(monkeypatch):
    # The instance config reads the password from the environment, as in the chart's pods.
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "not-a-real-password")


# --- Helm values -------------------------------------------------------------------------------------------------


def test_helm_values_pass_the_charts_own_schema():
    assert chart_schema_errors(helm_values()) == []


def test_chart_schema_refuses_a_misspelt_or_mistyped_value():
    misspelt = helm_values({"runLauncher": {"config": {"k8sRunLauncher": {"runK8sConfg": {}}}}})
    mistyped = helm_values({"concurrency": {"pools": {"defaultLimit": "fifteen"}}})
    bad_resources = helm_values({"dagsterDaemon": {"resources": {"limits": "1Gi"}}})

    assert any("runK8sConfg" in e for e in chart_schema_errors(misspelt))
    assert any(e.startswith("concurrency.pools.defaultLimit") for e in chart_schema_errors(mistyped))
    # The Kubernetes definitions behind the chart's schema are resolved, not skipped.
    assert any(e.startswith("dagsterDaemon.resources.limits") for e in chart_schema_errors(bad_resources))


def test_chart_renders_an_instance_config_that_dagster_accepts(tmp_path, pg_password):
    doc = render_instance(helm_values())
    config = validate_instance_config(doc, tmp_path / "home")

    for section in ("run_storage", "event_log_storage", "schedule_storage", "run_launcher", "run_coordinator"):
        assert class_config_errors(config[section]) == [], section
    assert config["run_storage"]["config"]["postgres_db"]["scheme"] == "postgresql+psycopg2"
    assert config["run_storage"]["config"]["postgres_db"]["password"] == {"env": "DAGSTER_PG_PASSWORD"}
    assert "config" not in config["run_coordinator"], "every run limit belongs in `concurrency`"
    assert config["run_launcher"]["class"] == "K8sRunLauncher"


def test_the_charts_daemon_defaults_next_to_concurrency_would_be_refused_by_dagster(tmp_path, pg_password):
    """Why values.yaml empties queuedRunCoordinator: with the chart's defaults left in, the template renders
    `max_concurrent_runs: -1` into run_coordinator, and Dagster refuses it next to a `concurrency` block."""
    defaults = {"dagsterDaemon": {"runCoordinator": {"config": {"queuedRunCoordinator": {"dequeueUseThreads": True}}}}}
    doc = render_instance(helm_values(defaults))

    assert doc["run_coordinator"]["config"]["max_concurrent_runs"] == -1
    with pytest.raises(DagsterInvalidConfigError, match="max_concurrent_runs"):
        validate_instance_config(doc, tmp_path / "home")


def test_local_and_cluster_instances_apply_the_same_run_limits(tmp_path, pg_password):
    local = yaml.safe_load(LOCAL_INSTANCE.read_text())
    cluster = render_instance(helm_values())

    local_runs, cluster_runs = local["concurrency"]["runs"], cluster["concurrency"]["runs"]
    assert cluster_runs["tag_concurrency_limits"] == local_runs["tag_concurrency_limits"]
    assert cluster["concurrency"]["pools"]["granularity"] == local["concurrency"]["pools"]["granularity"] == "run"
    # The sizes differ on purpose: one embedded server fills a laptop; the cluster has as many as its GPUs.
    assert _limits(local) == (2, 1)
    gpu_quota = int(QUOTA_HARD["requests.nvidia.com/gpu"])
    assert _limits(cluster) == (20, gpu_quota)
    assert local["telemetry"] == cluster["telemetry"] == {"enabled": False}


# --- the code server ----------------------------------------------------------------------------------------------

# What every process on the cluster must read from its environment to use the cluster's models (resources/defaults.py
# reads GRACE_ENDPOINTS, resources/settings.py GRACE_JUDGE_MODEL).
CLUSTER_ENV = {"GRACE_ENDPOINTS": "k8s", "GRACE_JUDGE_MODEL": "deepseek-chat-api"}


def _our_user_code_block() -> dict:
    return yaml.safe_load(VALUES.read_text())["dagster-user-deployments"]


def _code_server(values: Mapping | None = None, ours: Mapping | None = None):
    rendered = render_user_code(values or helm_values(), ours or _our_user_code_block(), RELEASE)
    (deployment,) = rendered.deployments
    return deployment, rendered


def _env(container: Mapping) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env") or []}


def test_code_server_runs_as_grace_run_with_the_clusters_endpoints():
    """The sensors run in the code server and scale model Deployments: only grace-run may (k8s/03-rbac.yaml)."""
    deployment, rendered = _code_server()
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]

    assert pod["serviceAccountName"] == "grace-run"
    assert _env(container).items() >= CLUSTER_ENV.items()
    assert _env(container)["GRACE_PROMETHEUS_URL"].startswith("https://")
    # k8s/ creates grace-run and its Role; the chart must neither create an account nor bind its own job/pod Role.
    assert [o["kind"] for o in rendered.objects if o["kind"] in ("ServiceAccount", "Role", "RoleBinding")] == []
    assert container["args"] == ["dagster", "api", "grpc", "-h", "0.0.0.0", "-p", "3030", *_dagster_api_args()]
    assert validate_object(deployment) == []


def _dagster_api_args() -> list[str]:
    return helm_values()["dagster-user-deployments"]["deployments"][0]["dagsterApiGrpcArgs"]


def test_every_user_code_key_we_set_is_one_the_chart_reads():
    _, rendered = _code_server()
    assert rendered.unread == []


def test_a_service_account_inside_a_deployment_entry_passes_the_schema_and_is_ignored():
    """The mistake this check exists for: the schema accepts the key, the templates never read it, and the code
    server falls back to the chart's own account, which may not scale a model (403 on the cluster)."""
    entry = {**_our_user_code_block()["deployments"][0], "serviceAccount": {"name": "grace-run"}}
    ours = {"enabled": True, "enableSubchart": True, "deployments": [entry]}
    values = helm_values({"dagster-user-deployments": {"serviceAccount": None, "rbacEnabled": None, **ours}})

    deployment, rendered = _code_server(values, ours)

    assert chart_schema_errors(values) == []
    assert rendered.unread == ["deployments[].serviceAccount"]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == (
        "grace-dagster-dagster-user-deployments-user-deployments"
    )
    assert {o["kind"] for o in rendered.objects} >= {"ServiceAccount", "Role", "RoleBinding"}


def test_run_pods_and_code_server_agree_on_the_endpoint_mode_and_judge(tmp_path, pg_password):
    """Each process reads its own environment: the code server's never reaches a run pod
    (includeConfigInLaunchedRuns is off), so the run launcher names the same values."""
    _, job = _launched_job(tmp_path, {"grace/model": "gemma-2-2b", "grace/user": "alice"})
    (run_container,) = job["spec"]["template"]["spec"]["containers"]
    deployment, _ = _code_server()
    (server_container,) = deployment["spec"]["template"]["spec"]["containers"]

    run_env, server_env = _env(run_container), _env(server_container)
    assert run_env.items() >= CLUSTER_ENV.items()
    assert {k: run_env[k] for k in CLUSTER_ENV} == {k: server_env[k] for k in CLUSTER_ENV}
    assert "DAGSTER_CLI_API_GRPC_CONTAINER_CONTEXT" not in server_env


# --- the local instance ------------------------------------------------------------------------------------------


def test_local_instance_config_loads_with_the_queue_and_the_limits(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(LOCAL_INSTANCE.read_text())
    with DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        concurrency = instance.get_concurrency_config()
        limits = {t["key"]: t for t in concurrency.run_queue_config.tag_concurrency_limits}
        pool_config = concurrency.pool_config
        storage = type(instance.run_storage).__name__
    assert storage == "SqliteRunStorage"
    assert set(limits) == {"grace/model", "dagster/partition/model", "grace/user"}
    assert all(t["value"] == {"applyLimitPerUniqueValue": True} and t["limit"] == 1 for t in limits.values())
    assert concurrency.run_queue_config.max_concurrent_runs == 2
    assert pool_config.default_pool_limit == 1
    assert pool_config.pool_granularity.value == "run"


@contextmanager
def _instance(config: Mapping, home: Path) -> Iterator[DagsterInstance]:
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(dict(config)))
    with DagsterInstance.from_config(str(home)) as instance:
        yield instance


@asset(pool=POOL)
def answers() -> int:
    """Stands in for an endpoint-bound asset: it belongs to the pool the LLM assets use."""
    return 1


def test_in_process_runs_pass_while_the_queue_would_hold_them(tmp_path):
    """`grace run` and the tests materialize in process: neither the queue's limits nor the pool hold them, and
    they claim no pool slot that a killed process could leak."""
    from dagster._core.test_utils import create_run_for_test

    with _instance(yaml.safe_load(LOCAL_INSTANCE.read_text()), tmp_path / "home") as instance:
        tags = {"grace/model": "smollm2-135m", "grace/user": "alice"}
        create_run_for_test(instance, job_name="other", status=DagsterRunStatus.STARTED, tags=tags)

        result = materialize([answers], instance=instance, tags=tags)

        assert result.success
        assert instance.get_run_by_id(result.run_id).status == DagsterRunStatus.SUCCESS
        assert instance.event_log_storage.get_concurrency_info(POOL).claimed_slots == []


# --- the run queue -----------------------------------------------------------------------------------------------


def _queue_configs() -> dict[str, dict]:
    local = yaml.safe_load(LOCAL_INSTANCE.read_text())
    cluster = render_instance(helm_values())
    # The cluster's queue settings over local storage: the queue logic is the same on SQLite and PostgreSQL.
    cluster_queue = {key: cluster[key] for key in ("run_coordinator", "concurrency", "telemetry")}
    return {"local dagster.yaml": local, "Helm-rendered instance": cluster_queue}


@pytest.fixture
def queue_for(tmp_path):
    """Queue runs into a fresh instance with a given config, run one pass of Dagster's queue daemon, and report
    which runs it launched (to Dagster's mocked launcher: nothing executes)."""
    from dagster import Definitions, define_asset_job
    from dagster._core.execution.api import create_execution_plan
    from dagster._core.remote_origin import RegisteredCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
    from dagster._core.snap import snapshot_from_execution_plan
    from dagster._core.test_utils import create_run_for_test
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import EmptyWorkspaceTarget
    from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon

    job = Definitions(assets=[answers], jobs=[define_asset_job("answer")]).resolve_job_def("answer")
    job_snapshot = job.get_job_snapshot()
    plan = snapshot_from_execution_plan(create_execution_plan(job), job_snapshot.snapshot_id)
    location = RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("grace"), "__repository__")
    origin = RemoteJobOrigin(repository_origin=location, job_name="answer")
    # The queue writes every run's events to SQLite; in memory when the machine has a tmpfs (3x faster here).
    scratch = Path(tempfile.mkdtemp(dir="/dev/shm")) if Path("/dev/shm").is_dir() else tmp_path
    homes = iter(scratch / f"home{i}" for i in range(100))

    def run_queue(config: Mapping, runs: list[tuple[str, str, bool]]) -> list[str]:
        config = {**config, "run_launcher": {"module": "dagster._core.test_utils", "class": "MockedRunLauncher"}}
        with _instance(config, next(homes)) as instance:
            # The daemon creates the pool from default_limit itself, but only after reading the limits in that same
            # pass, so its first pass would let every run in the pool through: deploy/README.md sets the pool first.
            instance.event_log_storage.initialize_concurrency_limit_to_default(POOL)
            run_ids = []
            for model, user, in_pool in runs:
                snapshots = {"job_snapshot": job_snapshot, "execution_plan_snapshot": plan} if in_pool else {}
                tags = {"grace/model": model, "grace/user": user}
                run = create_run_for_test(
                    instance, "answer", status=DagsterRunStatus.QUEUED, tags=tags, remote_job_origin=origin, **snapshots
                )
                run_ids.append(run.run_id)
            with WorkspaceProcessContext(instance, EmptyWorkspaceTarget()) as workspace:
                list(QueuedRunCoordinatorDaemon(interval_seconds=1).run_iteration(workspace))
            return [instance.get_run_by_id(run_id).status.value for run_id in run_ids]

    yield run_queue
    if scratch != tmp_path:
        shutil.rmtree(scratch, ignore_errors=True)


def _limits(config: Mapping) -> tuple[int, int]:
    return config["concurrency"]["runs"]["max_concurrent_runs"], config["concurrency"]["pools"]["default_limit"]


@pytest.mark.parametrize("name", list(_queue_configs()))
def test_queue_holds_a_second_run_of_one_model_or_one_user(name, queue_for):
    statuses = queue_for(
        _queue_configs()[name],
        [("gemma-2-2b", "alice", False), ("gemma-2-2b", "bob", False), ("gemma-2-9b", "alice", False)],
    )
    assert statuses == ["STARTING", "QUEUED", "QUEUED"]


@pytest.mark.parametrize("name", list(_queue_configs()))
def test_queue_holds_endpoint_bound_runs_beyond_the_pool_limit(name, queue_for):
    config = _queue_configs()[name]
    _, pool_limit = _limits(config)
    statuses = queue_for(config, [(f"model-{i}", f"user-{i}", True) for i in range(pool_limit + 1)])
    assert statuses == ["STARTING"] * pool_limit + ["QUEUED"]


@pytest.mark.parametrize("name", list(_queue_configs()))
def test_queue_holds_runs_beyond_the_run_limit(name, queue_for):
    config = _queue_configs()[name]
    max_runs, _ = _limits(config)
    statuses = queue_for(config, [(f"model-{i}", f"user-{i}", False) for i in range(max_runs + 1)])
    assert statuses == ["STARTING"] * max_runs + ["QUEUED"]


# --- run pods ----------------------------------------------------------------------------------------------------


class _RecordingBatchApi:
    """Stands in for the Kubernetes BatchV1Api: keeps the Job the launcher would create."""

    def __init__(self) -> None:
        self.jobs: list[tuple[str, Any]] = []

    def create_namespaced_job(self, body, namespace, **kwargs):
        self.jobs.append((namespace, body))
        return body


def _launched_job(tmp_path: Path, run_tags: Mapping[str, str]) -> tuple[str, dict]:
    """The Job dagster-k8s's K8sRunLauncher creates for one run, from the Helm-rendered run launcher config."""
    from dagster._core.code_pointer import ModuleCodePointer
    from dagster._core.launcher import LaunchRunContext
    from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin
    from dagster._core.test_utils import create_run_for_test
    from dagster_k8s import K8sRunLauncher

    block = render_instance(helm_values())["run_launcher"]
    # The only substitution: a kubeconfig that is parsed but never contacted, instead of the in-cluster account.
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:9"}}],
                "users": [{"name": "none", "user": {}}],
                "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none"}}],
                "current-context": "none",
            }
        )
    )
    config = {**block["config"], "load_incluster_config": False, "kubeconfig_file": str(kubeconfig)}
    processed = process_config(K8sRunLauncher.config_type(), config)
    assert processed.success, processed.errors
    batch_api = _RecordingBatchApi()
    launcher = K8sRunLauncher(**processed.value, k8s_client_batch_api=batch_api)

    origin = JobPythonOrigin(
        "__ASSET_JOB",
        RepositoryPythonOrigin(
            executable_path="/usr/local/bin/python",
            code_pointer=ModuleCodePointer("grace_dagster.definitions", "defs", working_directory=None),
            container_image=IMAGE,
        ),
    )
    with _instance({"telemetry": {"enabled": False}}, tmp_path / "home") as instance:
        launcher.register_instance(instance)
        run = create_run_for_test(instance, "__ASSET_JOB", tags=dict(run_tags), job_code_origin=origin)
        launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
    ((namespace, job),) = batch_api.jobs
    return namespace, kubernetes.client.ApiClient().sanitize_for_serialization(job)


def _shared_claims() -> list[dict]:
    return [m.obj for m in load_manifests(ROOT / "k8s") if m.obj.get("kind") == "PersistentVolumeClaim"]


def test_run_pods_are_guaranteed_qos_and_pass_the_kubernetes_schema_and_nrp_policy(tmp_path, pg_password):
    namespace, job = _launched_job(tmp_path, {"grace/model": "gemma-2-2b", "grace/user": "alice"})
    pod = job["spec"]["template"]
    (container,) = pod["spec"]["containers"]

    assert namespace == NAMESPACE
    assert validate_object(job) == []
    assert check_objects([job, *_shared_claims()], load_registry()) == []
    # Sized from the measured run (the comment in values.yaml): within the NRP's 20-150% of use.
    assert container["resources"]["requests"] == container["resources"]["limits"] == {"cpu": "500m", "memory": "2Gi"}
    assert pod["spec"]["serviceAccountName"] == "grace-run"
    assert pod["metadata"]["labels"][LABEL_MODEL_CLIENT] == "true"
    assert container["image"] == IMAGE
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["input"]["readOnly"] is True and not mounts["output"].get("readOnly")
    env = {e["name"]: e for e in container["env"]}
    assert env["GRACE_DATA_DIR"]["value"] == "/data/output"
    assert env["DAGSTER_PG_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "grace-dagster-postgresql",
        "key": "postgresql-password",
    }
    assert {"secretRef": {"name": "api-key-deepseek-chat-api"}} in container["envFrom"]
    # dagster-k8s's default: Kubernetes removes a finished run's Job a day later (its record stays in PostgreSQL).
    assert job["spec"]["ttlSecondsAfterFinished"] == 86400


def test_a_run_tag_that_breaks_guaranteed_qos_is_caught_by_the_policy(tmp_path, pg_password):
    override = {"container_config": {"resources": {"limits": {"cpu": "2"}}}}
    _, job = _launched_job(tmp_path, {"grace/model": "gemma-2-2b", "dagster-k8s/config": json.dumps(override)})

    rules = {v.rule for v in check_objects([job, *_shared_claims()], load_registry())}
    assert rules == {"job-guaranteed-qos", "limits-within-20pct"}


def test_dagsters_own_deployments_need_only_the_lifetime_exception():
    """The webserver and daemon Deployments as the values size them (built from the values: their templates are not
    transliterated here), and the code server as the chart renders it: within the NRP's resource rules, and
    long-lived, which takes the namespace-level exception named in deploy/README.md."""
    values = helm_values()
    sized = {
        "dagster-webserver": (
            values["dagsterWebserver"]["resources"],
            values["dagsterWebserver"]["initContainerResources"],
        ),
        "dagster-daemon": (values["dagsterDaemon"]["resources"], values["dagsterDaemon"]["initContainerResources"]),
    }
    deployments = []
    for name, (resources, init_resources) in sized.items():
        spec: dict[str, Any] = {"containers": [{"name": "main", "image": IMAGE, "resources": resources}]}
        spec["initContainers"] = [{"name": "check-db-ready", "image": "postgres", "resources": init_resources}]
        deployments.append(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": name, "namespace": NAMESPACE},
                "spec": {"replicas": 1, "template": {"spec": spec}},
            }
        )
    code_server, _ = _code_server()
    deployments.append(code_server)
    names = [*sized, code_server["metadata"]["name"]]

    violations = check_objects(deployments, load_registry())
    assert {(v.name, v.rule) for v in violations} == {(d, "deployment-lifetime-over-2-weeks") for d in names}
    assert {need.rule for need in required_exceptions(deployments)} == {"deployment-lifetime-over-2-weeks"}


def test_archive_pod_passes_the_kubernetes_schema_and_nrp_policy():
    (pod,) = yaml.safe_load_all((DEPLOY / "archive-pod.yaml").read_text())
    (container,) = pod["spec"]["containers"]

    assert validate_object(pod) == []
    assert check_objects([pod, *_shared_claims()], load_registry()) == []
    assert container["image"] == IMAGE
    # An interactive pod lives at most 6 hours on the NRP.
    assert pod["spec"]["activeDeadlineSeconds"] <= 6 * 3600
    assert {m["name"]: m.get("readOnly", False) for m in container["volumeMounts"]}["output"] is True


def test_every_volume_in_k8s_is_mounted_by_something(tmp_path, pg_password):
    """A claim nothing mounts only waits to be purged (the logs volume was one): each has a user, so each has a
    place in the archive-then-delete order of `grace k8s cleanup-plan`."""
    _, job = _launched_job(tmp_path, {"grace/model": "gemma-2-2b", "grace/user": "alice"})
    (archive_pod,) = yaml.safe_load_all((DEPLOY / "archive-pod.yaml").read_text())
    model_servers = [m.obj for m in load_manifests(ROOT / "k8s") if m.obj["kind"] == "Deployment"]
    mounted = {
        volume["persistentVolumeClaim"]["claimName"]
        for workload in [job, archive_pod, *model_servers]
        for volume in pod_spec(workload).get("volumes") or []
        if "persistentVolumeClaim" in volume
    }
    claims = {claim["metadata"]["name"] for claim in _shared_claims()}
    assert claims - mounted == set()
    assert {"grace-input", "grace-output"} <= mounted


# --- the image ---------------------------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    lines, current = [], ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += line.removesuffix("\\") + " "
        if not line.endswith("\\"):
            instruction, _, rest = current.strip().partition(" ")
            lines.append((instruction.upper(), rest.strip()))
            current = ""
    return lines


def test_dockerfile_installs_everything_at_build_time_and_serves_the_helm_code_location():
    """Static: no docker engine runs here, so the image is not built by the tests (deploy/README.md has the command)."""
    instructions = _dockerfile_instructions()
    bases = [rest.split()[0] for op, rest in instructions if op == "FROM"]
    final_stage = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM") :]
    runs = [rest for op, rest in final_stage if op == "RUN"]
    (cmd,) = [json.loads(rest) for op, rest in final_stage if op == "CMD"]
    user_code = helm_values()["dagster-user-deployments"]["deployments"][0]
    pyproject = (ROOT / "pyproject.toml").read_text()

    assert f"{user_code['image']['repository']}:{user_code['image']['tag']}" == IMAGE
    # The final image installs only the wheels built in the first stage, never from an index.
    assert all("--no-index" in r for r in runs if "pip install" in r)
    assert any(op == "USER" and rest != "root" for op, rest in final_stage)
    assert cmd[:3] == ["dagster", "api", "grpc"]
    module = cmd[cmd.index("--module-name") + 1]
    assert module == user_code["dagsterApiGrpcArgs"][1] == "grace_dagster.definitions"
    assert f'module_name = "{module}"' in pyproject
    assert str(user_code["port"]) in cmd
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignored[0] == "*" and "!grace_dagster" in ignored and "!pyproject.toml" in ignored
    assert len(bases) == 2


def test_both_stages_start_from_one_base_image_pinned_by_digest():
    bases = [rest.split()[0] for op, rest in _dockerfile_instructions() if op == "FROM"]
    assert len(bases) == 2 and bases[0] == bases[1], bases
    name, _, digest = bases[0].partition("@")
    assert name.startswith("python:3.11.") and name.endswith("-slim-bookworm"), name
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"{bases[0]} is not pinned by digest"


def test_llama_cpp_is_built_for_a_portable_cpu_baseline():
    """GGML_NATIVE would compile for the build machine's CPU; the image must run on every node."""
    wheel_stage = _dockerfile_instructions()[: [op for op, _ in _dockerfile_instructions()].index("FROM", 1)]
    (cmake_args,) = [rest for op, rest in wheel_stage if op == "ENV" and rest.startswith("CMAKE_ARGS=")]
    flags = set(json.loads(cmake_args.removeprefix("CMAKE_ARGS=")).split())
    assert {"-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_AVX512=OFF"} <= flags
    builds = [rest for op, rest in wheel_stage if op == "RUN" and "pip wheel" in rest]
    # The ENV comes before the build that compiles llama-cpp-python (the one that reads the lock).
    env_at = [rest for op, rest in wheel_stage].index(cmake_args)
    lock_build = next(i for i, (op, rest) in enumerate(wheel_stage) if op == "RUN" and "requirements.lock" in rest)
    assert env_at < lock_build and builds


def test_image_installs_from_the_lock_with_hashes():
    instructions = _dockerfile_instructions()
    lock_builds = [rest for op, rest in instructions if op == "RUN" and "-r requirements.lock" in rest]
    assert lock_builds and all("--require-hashes" in r for r in lock_builds)
    assert ("COPY", "deploy/requirements.lock ./") in instructions
    assert "!deploy/requirements.lock" in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    final_installs = [rest for op, rest in instructions[-12:] if op == "RUN" and "pip install" in rest]
    assert final_installs and all("--no-deps" in r and "pip check" in r for r in final_installs)


def _lock_module():
    spec = importlib.util.spec_from_file_location("deploy_lock", DEPLOY / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _locked_versions() -> dict[str, str]:
    pins = {}
    for line in (DEPLOY / "requirements.lock").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9._-]+)==([^ \\;]+)", line)
        if match:
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def test_lock_file_is_up_to_date_with_pyproject():
    """`make lock` writes deploy/requirements.lock from pyproject.toml; change one without the other and this fails."""
    lock = _lock_module()
    assert lock.recorded_digest() == lock.dependencies_digest(), (
        "deploy/requirements.lock was resolved from other dependencies than pyproject.toml now lists: run `make lock` "
        "and commit deploy/requirements.lock"
    )
    pins = _locked_versions()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dependency in map(Requirement, project["dependencies"]):
        name = canonicalize_name(dependency.name)
        assert name in pins, f"{dependency} is not in deploy/requirements.lock: run `make lock`"
        assert dependency.specifier.contains(pins[name], prereleases=True), f"{dependency} vs locked {pins[name]}"
    text = (DEPLOY / "requirements.lock").read_text()
    assert text.count("==") == len(pins) and text.count("--hash=sha256:") >= len(pins)


def test_lock_check_fails_when_pyproject_changes(tmp_path):
    lock = _lock_module()
    changed = tmp_path / "pyproject.toml"
    changed.write_text((ROOT / "pyproject.toml").read_text().replace('"pandas>=2.2"', '"pandas>=2.3"'))
    assert lock.dependencies_digest(changed) != lock.recorded_digest()
    reformatted = tmp_path / "reformatted.toml"
    reformatted.write_text((ROOT / "pyproject.toml").read_text().replace('"pandas>=2.2"', '"pandas >= 2.2"'))
    assert lock.dependencies_digest(reformatted) == lock.recorded_digest()


def _hadolint(path: Path) -> subprocess.CompletedProcess:
    hadolint = Path(sys.executable).with_name("hadolint")
    return subprocess.run(
        [str(hadolint if hadolint.exists() else "hadolint"), "--no-color", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_hadolint_passes_the_dockerfile_and_catches_a_regression(tmp_path):
    clean = _hadolint(DEPLOY / "Dockerfile")
    assert clean.returncode == 0, clean.stdout + clean.stderr

    regressed = tmp_path / "Dockerfile"
    regressed.write_text((DEPLOY / "Dockerfile").read_text().replace(" --no-install-recommends", ""))
    caught = _hadolint(regressed)
    assert caught.returncode != 0 and "DL3015" in caught.stdout
