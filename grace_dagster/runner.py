"""The main job on the embedded default, for the command line: `grace run`.

Each model × study partition is one Dagster run, as a backfill from the UI would launch it, recorded in the same
instance the UI reads (DAGSTER_HOME), so its runs, checks and metadata are there when the UI opens.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from dagster import AssetKey, DagsterInstance, MultiPartitionKey, materialize

from grace_dagster.assets import ALL_ASSETS, ALL_CHECKS, ANALYSIS_ASSETS, EXPERIMENT_ASSETS, study_trials
from grace_dagster.assets.common import run_tags
from grace_dagster.resources import ExperimentSettings
from grace_dagster.resources.defaults import default_resources
from grace_dagster.studies import STUDIES

QUICK_TRIALS = 12  # study 1: every (access, observed) condition twice; study 2: every goal × state cell once
RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


@dataclass
class PartitionReport:
    model: str
    study: str
    success: bool
    outputs: dict[str, str] = field(default_factory=dict)
    checks: list[tuple[str, bool, str, str]] = field(default_factory=list)  # (name, passed, severity, evidence)
    notes: list[str] = field(default_factory=list)
    failed_steps: list[str] = field(default_factory=list)  # step keys that failed, check steps included
    error: str | None = None

    @property
    def blocking_failures(self) -> list[str]:
        return [name for name, passed, severity, _ in self.checks if not passed and severity == "ERROR"]

    @property
    def errored(self) -> bool:
        """A step failed for another reason than a blocking check (an exception, a bad input)."""
        check_steps = [name for name, passed, _, _ in self.checks if not passed]
        return any(not any(step.endswith(name) for name in check_steps) for step in self.failed_steps) or (
            not self.success and not self.failed_steps
        )


def _error_message(result) -> str:
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data.error:
            error = event.step_failure_data.error
            return (error.cause or error).message.strip()
    return "the run failed"


def run_pipeline(
    instance: DagsterInstance,
    models: list[str],
    studies: list[str],
    experiments: list[str],
    trial_limit: int | None,
) -> list[PartitionReport]:
    resources = {**default_resources(), "settings": ExperimentSettings(trial_limit=trial_limit)}
    registry = resources["llm"].registry()
    for model in models:
        registry.get(model)  # an unknown slug stops here, before it becomes a partition
    for study in studies:
        # What study_trials runs, before any Dagster run: a bad file's InputError is then all the user sees, where
        # the asset's failure would come after some 90 lines of Dagster's log of the failed step and its stack.
        STUDIES[study].load(resources["storage"].input_path(STUDIES[study]))
    for study in studies:
        result = materialize(
            [study_trials],
            partition_key=study,
            resources=resources,
            instance=instance,
            run_config=RUN_CONFIG,
            raise_on_error=False,
        )
        if not result.success:
            raise SystemExit(f"{study}: the input did not validate:\n{_error_message(result)}")
    known = set(instance.get_dynamic_partitions("model"))
    instance.add_dynamic_partitions("model", [m for m in models if m not in known])

    reports = []
    selection = [a.key for e in experiments for a in EXPERIMENT_ASSETS[e]]
    for model in models:
        for study in studies:
            print(f"\n== {model} × {study}: {', '.join(experiments)}", file=sys.stderr, flush=True)
            result = materialize(
                [*ALL_ASSETS, *ALL_CHECKS],
                selection=selection,
                partition_key=MultiPartitionKey({"model": model, "study": study}),
                resources=resources,
                instance=instance,
                run_config=RUN_CONFIG,
                tags=run_tags(model, study),
                raise_on_error=False,
            )
            reports.append(_report(model, study, result))

    print(f"\n== analysis: {', '.join(studies)}", file=sys.stderr, flush=True)
    analysis = [a for a in ANALYSIS_ASSETS if a.key in {AssetKey(["analysis", s]) for s in studies}]
    result = materialize(
        [*ALL_ASSETS, *ALL_CHECKS],
        selection=[a.key for a in analysis],
        resources=resources,
        instance=instance,
        run_config=RUN_CONFIG,
        tags=run_tags(),
        raise_on_error=False,
    )
    reports.append(_report("all models", ", ".join(studies), result))
    return reports


def _report(model: str, study: str, result) -> PartitionReport:
    report = PartitionReport(model, study, result.success)
    for event in result.get_asset_materialization_events():
        metadata = event.materialization.metadata
        if "csv" in metadata:
            report.outputs[event.asset_key.to_user_string()] = metadata["csv"].value
        if "review_queue" in metadata:
            report.notes.append(
                f"review queue: {metadata['review_queue_rows'].value} rows need a person "
                f"({metadata['review_queue_unreviewed'].value} not reviewed yet): {metadata['review_queue'].value}"
            )
        if "partitions_read_and_refused" in metadata:
            report.notes.append(
                f"{event.asset_key.to_user_string()} read:\n{metadata['partitions_read_and_refused'].value}"
            )
    for evaluation in result.get_asset_check_evaluations():
        numbers = [f"{k}={v.value}" for k, v in evaluation.metadata.items() if isinstance(v.value, int | float)]
        report.checks.append(
            (evaluation.check_name, evaluation.passed, evaluation.severity.value, ", ".join(numbers[:4]))
        )
    report.failed_steps = [event.step_key for event in result.all_events if event.is_step_failure]
    if report.errored:
        report.error = _error_message(result)
    return report


def print_summary(reports: list[PartitionReport]) -> None:
    print("\nSummary")
    for r in reports:
        blocked = r.blocking_failures
        status = "FAILED" if r.errored else f"stopped by blocking check(s): {', '.join(blocked)}" if blocked else "ok"
        print(f"  {r.model} × {r.study}: {status}")
        for asset_name, path in sorted(r.outputs.items()):
            print(f"    {asset_name}: {path}")
        if r.checks:
            print(f"    checks: {sum(c[1] for c in r.checks)}/{len(r.checks)} passed")
        for name, passed, severity, evidence in r.checks:
            if not passed:
                print(f"      {severity} {name}: {evidence}")
        for note in r.notes:
            print("    " + note.replace("\n", "\n    "))
        if r.error:
            print(f"    error: {r.error.splitlines()[0]}")
    blocked = sum(bool(r.blocking_failures) for r in reports)
    if blocked:
        print(
            f"\n{blocked} run(s) stopped by a blocking check: their outputs are written but the analysis does not use "
            "them. With the tiny local models, extraction_rate_at_least_threshold is expected to fail (they rarely "
            "answer in the requested format: README, 'The experiments'); any other blocking failure needs a look."
        )
    print("Open the UI (make ui) to see every check's evidence; CSVs for R are under data/csv/.")
