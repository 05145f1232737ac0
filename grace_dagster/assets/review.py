"""The researchers' readings as an input Dagster can see: an external asset per model × study, observed whenever
the partition's reviewed file changes.

`exp1/structured` depends on it, so a changed reviewed file makes the structured partition stale in the UI until it
is materialized again (which asks no model anything: every answer is in the checkpoints). Dagster judges a
dependency changed against the record that existed when the dependent step started, and misses the change when there
was none; so the version is recorded before the structured step too, by `exp1/responses` in the same run.
"""

import hashlib
from pathlib import Path

from dagster import (
    AssetExecutionContext,
    AssetObservation,
    AssetSpec,
    DefaultSensorStatus,
    MultiPartitionKey,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)
from dagster._core.definitions.data_version import DATA_VERSION_TAG, extract_data_version_from_entry

from grace_dagster.assets.partitions import model_study_partitions
from grace_dagster.resources import Storage
from grace_dagster.studies import STUDIES

REVIEWED_SUFFIX = "_reviewed.csv"
NO_FILE = "none"

review_readings = AssetSpec(
    key=["review", "readings"],
    partitions_def=model_study_partitions,
    group_name="exp1",
    kinds={"csv"},
    description=(
        "Researchers' readings of the replies in a partition's review queue: data/review/{model}_{study}_reviewed.csv "
        "(start from {model}_{study}_queue.csv, which exp1/structured writes). Observed by the sensor "
        "`review_files` when a file changes; exp1/structured then shows as stale until it is materialized again."
    ),
)


def reviewed_path(storage: Storage, model: str, study: str) -> Path:
    return storage.path("review", f"{model}_{study}{REVIEWED_SUFFIX}")


def reading_version(path: Path) -> str:
    """The data version of a partition's readings: the reviewed file's content, or that there is none."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else NO_FILE


def observation(storage: Storage, model: str, study: str) -> AssetObservation:
    path = reviewed_path(storage, model, study)
    return AssetObservation(
        review_readings.key,
        partition=str(MultiPartitionKey({"model": model, "study": study})),
        tags={DATA_VERSION_TAG: reading_version(path)},
        metadata={"path": str(path), "exists": path.exists()},
    )


def record_readings_version(context: AssetExecutionContext, storage: Storage, model: str, study: str) -> None:
    """Record the readings' current version from inside a run, upstream of the structured step (module docstring)."""
    context.log_event(observation(storage, model, study))


def reviewed_partition(path: Path) -> tuple[str, str] | None:
    """(model, study) of a reviewed file ("smollm2-135m_study1_reviewed.csv"); None for another file. Model slugs
    have no underscore, so the name splits unambiguously."""
    if not path.name.endswith(REVIEWED_SUFFIX):
        return None
    model, _, study = path.name.removesuffix(REVIEWED_SUFFIX).rpartition("_")
    return (model, study) if model and study in STUDIES else None


@sensor(
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Notices a new, changed or removed reviewed file under data/review/ and records it as a new version "
    "of review/readings for its partition, so the UI marks that exp1/structured partition stale.",
)
def review_files(context: SensorEvaluationContext, storage: Storage) -> SensorResult | SkipReason:
    models = context.instance.get_dynamic_partitions("model")
    on_disk = {reviewed_partition(p) for p in storage.path("review").glob(f"*{REVIEWED_SUFFIX}")}
    events = []
    for model in models:
        for study in STUDIES:
            partition = str(MultiPartitionKey({"model": model, "study": study}))
            record = context.instance.get_latest_data_version_record(review_readings.key, True, partition)
            if record is None and (model, study) not in on_disk:
                continue  # nothing recorded and nothing to record
            known = extract_data_version_from_entry(record.event_log_entry) if record else None
            current = observation(storage, model, study)
            if known is None or known.value != current.tags[DATA_VERSION_TAG]:
                events.append(current)
    if not events:
        return SkipReason("no new, changed or removed reviewed file")
    return SensorResult(asset_events=events)
