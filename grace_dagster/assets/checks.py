"""Asset checks over a stored partition table.

A check is a plain function (table, CheckContext) -> CheckOutcome, unit-testable without Dagster; `table_check`
turns it into a partitioned Dagster asset check that reads the partition's table. Checks carry their evidence as
metadata (counts, worst rows); ERROR means "do not use", WARN means "look at this".
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from dagster import AssetCheckResult, AssetChecksDefinition, AssetCheckSeverity, AssetKey, MetadataValue, asset_check

from grace_dagster.assets import common
from grace_dagster.assets.partitions import model_study_partitions
from grace_dagster.resources import Storage
from grace_dagster.resources.settings import ExperimentSettings
from grace_dagster.studies import STUDIES, Study

MAX_LISTED = 20


@dataclass
class CheckOutcome:
    passed: bool
    metadata: dict = field(default_factory=dict)
    worst: pd.DataFrame | None = None  # the rows that explain a failure, shown as a table

    def to_result(self, severity: AssetCheckSeverity, description: str) -> AssetCheckResult:
        metadata = dict(self.metadata)
        if self.worst is not None and len(self.worst):
            metadata["worst_rows"] = MetadataValue.md(self.worst.head(MAX_LISTED).to_markdown(index=False))
        return AssetCheckResult(passed=self.passed, severity=severity, metadata=metadata, description=description)


@dataclass(frozen=True)
class CheckContext:
    """What a check may compare a table with: the trials it should cover, the run's settings, the study."""

    trials: pd.DataFrame
    settings: ExperimentSettings
    study: Study
    # The same asset's tables of this model for every study that has one (this partition's included).
    model_tables: dict[str, pd.DataFrame] = field(default_factory=dict)


Evaluate = Callable[[pd.DataFrame, CheckContext], CheckOutcome]


def table_check(
    asset_key: AssetKey,
    name: str,
    description: str,
    table_path: Callable[[Storage, common.Partition], Path],
    evaluate: Evaluate,
    blocking: bool,
) -> AssetChecksDefinition:
    """A partitioned check of `asset_key`. Blocking checks are ERROR: downstream assets in the run do not start."""
    severity = AssetCheckSeverity.ERROR if blocking else AssetCheckSeverity.WARN

    @asset_check(
        asset=asset_key,
        name=name,
        description=description,
        blocking=blocking,
        partitions_def=model_study_partitions,
    )
    def _check(context, storage: Storage, settings: ExperimentSettings) -> AssetCheckResult:
        part = common.partition(context)
        path = table_path(storage, part)
        if not path.exists():
            return AssetCheckResult(
                passed=False,
                severity=severity,
                description=f"{path} does not exist: materialize the partition first",
            )
        table = storage.read_table(path)
        trials = common.load_trials(storage, settings, part.study)
        siblings = {s: table_path(storage, common.Partition(part.model, STUDIES[s])) for s in STUDIES}
        tables = {s: storage.read_table(p) for s, p in siblings.items() if p.exists()} | {part.study.name: table}
        return evaluate(table, CheckContext(trials, settings, part.study, tables)).to_result(severity, description)

    return _check
