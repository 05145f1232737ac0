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
"""

from dagster import (
    AssetRecordsFilter,
    AssetSelection,
    DefaultSensorStatus,
    MultiPartitionKey,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from grace_dagster.assets import EXPERIMENT_ASSETS, study_trials
from grace_dagster.assets.common import run_tags
from grace_dagster.assets.partitions import model_partitions
from grace_dagster.registry.loader import EmbeddedServing, VllmServing
from grace_dagster.resources.endpoints import LLMEndpoints
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
