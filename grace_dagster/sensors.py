"""Sensors: onboard a model added to the registry, and give the cluster's GPUs back when no run needs them.

Onboarding: adding a model is one registry entry. `onboard_new_models` notices a participant the instance has no
partition for, adds its `model` partition and requests one run per study of every experiment asset, as the UI's
backfill dialog would by hand. In local mode only embedded models are onboarded, so a cluster model in the
registry never starts runs that could only fail on a laptop (a model you serve yourself through `base_urls` is
run with `grace run --models`). A local-only vLLM entry (weights converted on this machine) is never onboarded
automatically: its runs need this machine's `.venv-vllm`. Nothing is requested until every study's inputs are
validated (`study_trials`).

Scaling down:
The NRP flags GPUs idle below 40% utilisation, and a vLLM server holds its GPUs for as long as its Deployment is
scaled up; the endpoint resource never scales down (it is set up once per step, so that would thrash). This sensor
is the way down: every few minutes it scales to 0 each model Deployment that no queued or running run needs, judged
by the runs' `grace/model` tag (or Dagster's `dagster/partition/model` tag on a partition run). A run that is queued,
starting, started or being cancelled keeps its model up.

GPU utilisation:
A model that is up can still waste its GPUs: the NRP counts a pod below 40% GPU utilisation as a violation, and
enough of them block new jobs in the namespace. `watch_gpu_utilisation` reads each model pod's utilisation from the
cluster's Prometheus (the DCGM exporter's DCGM_FI_DEV_GPU_UTIL) over a window; a model below the threshold that no
started run is sending work is scaled to zero at once (without waiting for the idle sensor, which keeps models of
queued runs), and one below it while runs send it work is reported in those runs (an engine event with the figures,
and the run tag grace/gpu-utilisation), so the researcher can raise the client concurrency.
"""

from dagster import (
    AssetRecordsFilter,
    AssetSelection,
    DagsterInstance,
    DagsterRunStatus,
    DefaultSensorStatus,
    MetadataValue,
    MultiPartitionKey,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)
from dagster._core.events import EngineEventData

from grace_dagster.assets import EXPERIMENT_ASSETS, study_trials
from grace_dagster.assets.common import run_tags
from grace_dagster.assets.partitions import model_partitions
from grace_dagster.k8s.admission import replicas, run_model
from grace_dagster.k8s.conventions import deployment_name
from grace_dagster.k8s.render import served_models
from grace_dagster.k8s.utilisation import PrometheusError, UtilisationPlan, by_deployment, plan, pod_utilisation
from grace_dagster.registry.loader import EmbeddedServing, VllmServing
from grace_dagster.resources.endpoints import RUNNING_STATUSES, LLMEndpoints
from grace_dagster.resources.monitoring import GpuMonitor
from grace_dagster.resources.settings import ExperimentSettings
from grace_dagster.studies import STUDIES

EXPERIMENT_KEYS = [a.key for assets in EXPERIMENT_ASSETS.values() for a in assets]


def _local_vllm(model) -> bool:
    return isinstance(model.serving, VllmServing) and not model.on_cluster


@sensor(
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.STOPPED,
    target=AssetSelection.assets(*EXPERIMENT_KEYS),
    description=(
        "Onboard new models: for each participant in the model registry without a `model` partition yet (and "
        "servable in the llm resource's mode), add the partition and request its runs for every study of every "
        "experiment asset."
    ),
)
def onboard_new_models(context: SensorEvaluationContext, llm: LLMEndpoints) -> SensorResult | SkipReason:
    known = set(context.instance.get_dynamic_partitions(model_partitions.name))
    new = [
        m.slug
        for m in llm.registry().participants()
        if m.slug not in known
        and (isinstance(m.serving, EmbeddedServing) or (llm.mode == "k8s" and not _local_vllm(m)))
    ]
    if not new:
        return SkipReason(f"every participant servable in {llm.mode} mode has its partition ({len(known)} models)")
    unvalidated = [
        s
        for s in STUDIES
        if not context.instance.fetch_materializations(
            AssetRecordsFilter(asset_key=study_trials.key, asset_partitions=[s]), limit=1
        ).records
    ]
    if unvalidated:
        return SkipReason(
            f"{', '.join(new)} waiting: materialize study_trials for {', '.join(unvalidated)} first (the inputs are "
            "validated before any model is asked)"
        )
    context.log.info(f"onboarding {', '.join(new)}: {len(new) * len(STUDIES)} runs requested")
    return SensorResult(
        run_requests=[
            RunRequest(
                run_key=f"onboard:{slug}|{study}",
                partition_key=MultiPartitionKey({"model": slug, "study": study}),
                asset_selection=EXPERIMENT_KEYS,
                tags=run_tags(slug, study),
            )
            for slug in new
            for study in STUDIES
        ],
        dynamic_partitions_requests=[model_partitions.build_add_request(new)],
    )


# Long enough that the sensor costs nothing, short next to the hours a model runs and the NRP's idle checks.
IDLE_CHECK_SECONDS = 300


@sensor(
    minimum_interval_seconds=IDLE_CHECK_SECONDS,
    default_status=DefaultSensorStatus.STOPPED,
    description=(
        "k8s endpoint mode only: scale to 0 every model Deployment that no queued or running run needs (by the "
        "grace/model run tag), so idle GPUs go back to the cluster. Never launches runs."
    ),
)
def scale_idle_models(context: SensorEvaluationContext, llm: LLMEndpoints, settings: ExperimentSettings) -> SkipReason:
    if llm.mode != "k8s":
        return SkipReason(
            f"the llm resource is in {llm.mode!r} mode: models are served on this machine and stopped with their run, "
            "so there is no Deployment to scale down (this sensor only acts in k8s mode)"
        )
    report = llm.scale_idle_models(context.instance, judge=settings.judge_model)
    context.log.info(report.summary())
    # The sensor acts on the cluster, not by launching runs: every tick ends as a skip that says what it did.
    return SkipReason(f"namespace {llm.namespace}: {report.summary()}")


# A run sends its model work from launch until it ends (a run being cancelled still executes its steps).
SENDING_STATUSES = [*RUNNING_STATUSES, DagsterRunStatus.CANCELING]
TAG_GPU_UTILISATION = "grace/gpu-utilisation"


def runs_sending_work(
    instance: DagsterInstance, deployments: dict[str, str], judge: str | None
) -> dict[str, list[str]]:
    """Deployment -> ids of the runs that are sending its model work now (the judge serves every run)."""
    by_slug = {slug: name for name, slug in deployments.items()}
    working: dict[str, list[str]] = {}
    for run in instance.get_runs(filters=RunsFilter(statuses=SENDING_STATUSES)):
        for slug in {run_model(run.tags), judge}:
            if slug in by_slug:
                working.setdefault(by_slug[slug], []).append(run.run_id)
    return working


def _report_to_runs(
    instance: DagsterInstance, name: str, slug: str, value: float, runs: list[str], decided: UtilisationPlan
) -> None:
    message = (
        f"GPU utilisation of {name} ({slug}) is {value:.0f}% averaged over {decided.window}, below the NRP's "
        f"{decided.threshold:g}%: the runs using it send too few requests at once to keep its GPUs busy, and the "
        "NRP counts the pod as a violation. Raise the client concurrency (max_concurrency of the llm resource) "
        "so that vLLM batches more requests."
    )
    metadata = {
        "gpu_utilisation_percent": MetadataValue.float(round(value, 1)),
        "threshold_percent": MetadataValue.float(decided.threshold),
        "window": MetadataValue.text(decided.window),
        "deployment": MetadataValue.text(name),
        "model": MetadataValue.text(slug),
    }
    for run_id in runs:
        run = instance.get_run_by_id(run_id)
        if run is None:
            continue
        instance.report_engine_event(message, run, EngineEventData(metadata=metadata))
        tag = f"{value:.0f}% of {name} over {decided.window} (NRP minimum {decided.threshold:g}%)"
        instance.add_run_tags(run_id, {TAG_GPU_UTILISATION: tag})


@sensor(
    minimum_interval_seconds=IDLE_CHECK_SECONDS,
    default_status=DefaultSensorStatus.STOPPED,
    description=(
        "k8s endpoint mode only: read each model pod's GPU utilisation from Prometheus (DCGM_FI_DEV_GPU_UTIL); "
        "below the NRP's 40% with no run sending work, scale the model to 0; below it while runs send work, report "
        "it in those runs (event and tag grace/gpu-utilisation). Never launches runs."
    ),
)
def watch_gpu_utilisation(
    context: SensorEvaluationContext, llm: LLMEndpoints, settings: ExperimentSettings, gpu_monitor: GpuMonitor
) -> SkipReason:
    if llm.mode != "k8s":
        return SkipReason(f"the llm resource is in {llm.mode!r} mode: no cluster GPUs to watch (k8s mode only)")
    query = gpu_monitor.query(llm.namespace)
    if query is None:
        return SkipReason(
            "no Prometheus configured: set GRACE_PROMETHEUS_URL (or the gpu_monitor resource's prometheus_url) "
            "to the cluster's Prometheus HTTP API"
        )
    deployments = {deployment_name(m.slug): m.slug for m in served_models(llm.registry())}
    try:
        pods = pod_utilisation(query)
    except PrometheusError as e:
        context.log.warning(str(e))
        return SkipReason(str(e))
    working = runs_sending_work(context.instance, deployments, settings.judge_model)
    decided = plan(by_deployment(pods, deployments), working, gpu_monitor.threshold_percent, gpu_monitor.window)
    _act(context, llm, decided, deployments, settings.judge_model)
    context.log.info(decided.summary())
    return SkipReason(f"namespace {llm.namespace}: {decided.summary()}")


def _act(
    context: SensorEvaluationContext,
    llm: LLMEndpoints,
    decided: UtilisationPlan,
    deployments: dict[str, str],
    judge: str | None,
) -> None:
    cluster = llm.cluster()
    for name in list(decided.scale_down):
        # Asked again right before scaling: a run that started during this tick keeps its model.
        runs = runs_sending_work(context.instance, deployments, judge).get(name)
        live = cluster.get_deployment(name)
        if runs:
            decided.report[name] = (decided.scale_down.pop(name), runs)
        elif live is None or replicas(live) < 1:
            decided.scale_down.pop(name)
        else:
            cluster.scale(name, 0)
    for name, (value, runs) in decided.report.items():
        _report_to_runs(context.instance, name, deployments[name], value, runs, decided)
