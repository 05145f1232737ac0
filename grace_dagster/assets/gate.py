"""The gate that holds across runs (DESIGN section 3).

Blocking checks stop downstream steps in the same run only; when the analysis runs in a later run (a backfill's
second wave, a manual materialization) Dagster would let it read a partition whose checks failed. So the analysis
asks the instance, for every partition it reads, whether the latest materialization exists and every blocking check
of that asset passed on it, and refuses the partition otherwise.
"""

from dataclasses import dataclass

from dagster import AssetCheckKey, AssetChecksDefinition, AssetKey, AssetRecordsFilter, DagsterInstance
from dagster._core.event_api import PartitionKeyFilter
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus


@dataclass(frozen=True)
class Verdict:
    usable: bool
    status: str  # "ok", "not materialized", or why the partition is refused


def blocking_check_names(asset_key: AssetKey, checks: list[AssetChecksDefinition]) -> list[str]:
    return sorted(
        spec.name
        for definition in checks
        for spec in definition.check_specs
        if spec.asset_key == asset_key and spec.blocking
    )


def verdict(instance: DagsterInstance, asset_key: AssetKey, partition: str, blocking_checks: list[str]) -> Verdict:
    """Usable only if the partition's latest materialization was checked by every blocking check, and all passed."""
    materializations = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition]), limit=1, ascending=False
    ).records
    if not materializations:
        return Verdict(False, "not materialized")
    latest = materializations[0].storage_id
    records = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [AssetCheckKey(asset_key, name) for name in blocking_checks], partition_filter=PartitionKeyFilter(key=partition)
    )
    problems = []
    for name in blocking_checks:
        record = records.get(AssetCheckKey(asset_key, name))
        evaluation = record.evaluation if record is not None else None
        if record is None or record.status == AssetCheckExecutionRecordStatus.PLANNED or evaluation is None:
            problems.append(f"{name} has no result for this partition (materialize it with its checks)")
        elif record.status == AssetCheckExecutionRecordStatus.FAILED:
            problems.append(f"{name} failed (run {record.run_id[:8]})")
        elif (
            evaluation.target_materialization_data is None
            or evaluation.target_materialization_data.storage_id != latest
        ):
            problems.append(f"{name} passed on an earlier materialization, not the latest (run the check again)")
    if problems:
        return Verdict(False, "refused: " + "; ".join(problems))
    return Verdict(True, "ok")
