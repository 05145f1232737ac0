"""Analysis over all models, one asset per study: the table for R, the comparison with people, plots.

The assets never branch on a study: each study's module says how its analysis is computed (`Study.analyze`).
Every partition read passes the cross-run gate first (`gate.py`); refused partitions are listed, never read.
They bring themselves up to date: declarative automation requests them once experiment partitions have landed.
"""

import base64
import sys

import pandas as pd
from dagster import (
    AssetExecutionContext,
    AssetRecordsFilter,
    AssetsDefinition,
    AssetSelection,
    AutomationCondition,
    AutomationConditionSensorDefinition,
    DagsterInstance,
    DefaultSensorStatus,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from grace_dagster.assets import common, gate
from grace_dagster.assets.exp1 import exp1_responses
from grace_dagster.assets.exp2 import EXP2_CHECKS, exp2_probabilities, wide_path
from grace_dagster.assets.partitions import model_partitions, model_study_partitions
from grace_dagster.assets.structured import STRUCTURED_CHECKS, exp1_structured, structured_path
from grace_dagster.files import atomic_write
from grace_dagster.resources import Storage
from grace_dagster.studies import STUDIES, Study
from grace_dagster.studies import analysis as study_analysis
from grace_dagster.studies.base import AnalysisInput, Sampling

# What the analysis reads from each experiment: the asset, its blocking checks, the table of one partition.
SOURCES = {
    "exp1": (exp1_structured, gate.blocking_check_names(exp1_structured.key, STRUCTURED_CHECKS), structured_path),
    "exp2": (exp2_probabilities, gate.blocking_check_names(exp2_probabilities.key, EXP2_CHECKS), wide_path),
}
CODE_VERSION = common.code_version(study_analysis, gate, sys.modules[__name__])

# When the automation requests an analysis: an experiment partition was updated since the analysis last ran (or was
# requested), no experiment partition is still in progress (a backfill lands as a whole, not once per run), and at
# least one experiment partition passed its blocking checks, so there is something to read. This is `eager()`
# without its "no dependency missing" clause, since model × study partitions that were never run are normal here,
# and with "some" in place of `all_deps_blocking_checks_passed()`: for an unpartitioned asset over partitioned
# ones that condition means "each experiment has a passing partition", which would hold every model's analysis
# back while one experiment fails everywhere (the tiny local models' Experiment 1 does). Which partitions are read
# is still decided per partition by the cross-run gate in the asset: failed ones are refused and listed.
SOMETHING_USABLE = AutomationCondition.any_deps_match(
    AutomationCondition.all_checks_match(AutomationCondition.check_passed(), blocking_only=True)
).with_label("some experiment partition passed its blocking checks")
ANALYSIS_AUTOMATION = (
    AutomationCondition.eager().without(~AutomationCondition.any_deps_missing()) & SOMETHING_USABLE
).with_label("eager once experiment partitions have landed")


def exp1_sampling(instance: DagsterInstance, partition: str) -> Sampling | None:
    """How the partition's Experiment 1 answers were sampled, from its raw responses' latest materialization."""
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=exp1_responses.key, asset_partitions=[partition]), limit=1, ascending=False
    ).records
    metadata = records[0].asset_materialization.metadata if records else {}
    if "temperature" not in metadata:
        return None
    samples = metadata["samples_per_trial"].value if "samples_per_trial" in metadata else 1
    return Sampling(temperature=float(metadata["temperature"].value), samples_per_trial=int(samples))


def readable(table: pd.DataFrame) -> pd.DataFrame:
    """A comparison table for the UI: numbers rounded, and each value with its interval in one cell, "0.75 [0.50,
    1.00]" (the CSV and Parquet keep `<name>`, `<name>_ci_low`, `<name>_ci_high` apart for R)."""
    table = table.copy()
    for column in [c for c in table.columns if f"{c}_ci_low" in table and f"{c}_ci_high" in table]:
        low, high = table.pop(f"{column}_ci_low"), table.pop(f"{column}_ci_high")
        table[column] = [_with_interval(value, lo, hi) for value, lo, hi in zip(table[column], low, high)]
    return table.round(3)


def _with_interval(value, low, high) -> str:
    if pd.isna(value):
        return ""
    digits = 1 if abs(value) >= 10 else 3
    interval = "" if pd.isna(low) or pd.isna(high) else f" [{low:.{digits}f}, {high:.{digits}f}]"
    return f"{value:.{digits}f}{interval}"


def analysis_asset(study: Study) -> AssetsDefinition:
    @asset(
        key=["analysis", study.name],
        deps=[exp1_structured, exp2_probabilities],
        group_name="analysis",
        kinds={"python", "parquet"},
        code_version=CODE_VERSION,
        automation_condition=ANALYSIS_AUTOMATION,
        description=f"{study.title}: every model's answers in one table for R, compared with people "
        f"({study.citation.split('(')[0].strip()}), Experiment 1 set against Experiment 2, with intervals over items "
        "and plots. Reads only partitions that passed their blocking checks; brought up to date automatically once "
        "experiment partitions have landed.",
    )
    def _analysis(context: AssetExecutionContext, storage: Storage) -> MaterializeResult:
        models = sorted(context.instance.get_dynamic_partitions(model_partitions.name))
        tables: dict[str, dict[str, pd.DataFrame]] = {source: {} for source in SOURCES}
        sampling: dict[str, Sampling] = {}
        gate_rows = []
        for model in models:
            part = common.Partition(model, study)
            key = model_study_partitions.get_partition_key_from_str(f"{model}|{study.name}")
            for source, (upstream, blocking, path) in SOURCES.items():
                verdict = gate.verdict(context.instance, upstream.key, key, blocking)
                if verdict.usable:
                    tables[source][model] = storage.read_table(path(storage, part))
                    if source == "exp1" and (how := exp1_sampling(context.instance, key)) is not None:
                        sampling[model] = how
                elif verdict.status != "not materialized":
                    context.log.warning(f"{study.name}: {model} {source} {verdict.status}")
                trials = len(tables[source][model]) if verdict.usable else pd.NA
                gate_rows.append({"model": model, "experiment": source, "trials": trials, "status": verdict.status})
        # Models run with different trial limits sit side by side here: the trials column says how many each has.
        gates = pd.DataFrame(gate_rows, columns=["model", "experiment", "trials", "status"])
        if not any(tables.values()):
            raise Failure(
                description=f"nothing to analyse for {study.name}: no model × {study.name} partition is materialized "
                "with its blocking checks passing. Materialize exp1/structured or exp2/probabilities for a model "
                "(and fix what their checks report), then run this again.",
                metadata={"partitions": MetadataValue.md(gates.to_markdown(index=False) if len(gates) else "none")},
            )

        result = study.analyze(AnalysisInput(study, tables["exp1"], tables["exp2"], sampling))
        csv = storage.path("csv", f"analysis_{study.name}.csv")
        parquet, _ = storage.write_table(result.table, storage.path("analysis", f"{study.name}.parquet"), csv)
        metadata = {
            "rows": len(result.table),
            "models": MetadataValue.json(sorted(result.table["model"].unique().tolist())),
            "partitions_read_and_refused": MetadataValue.md(gates.to_markdown(index=False)),
            "human_data": study.citation,
            "csv": MetadataValue.path(str(csv)),
            "parquet": MetadataValue.path(str(parquet)),
            "dtypes": MetadataValue.json({c: str(t) for c, t in result.table.dtypes.items()}),
            **result.metadata,
        }
        for name, comparison in result.comparisons.items():
            path = storage.path("csv", f"analysis_{study.name}_{name}.csv")
            parquet = storage.path("analysis", f"{study.name}_{name}.parquet")
            if comparison.columns.empty:
                # A table that needs both experiments, one of them refused or not run: no file (an empty CSV stops
                # R's read.csv), and none left from an earlier run to be read as this one's.
                path.unlink(missing_ok=True)
                parquet.unlink(missing_ok=True)
                metadata[name] = "not written: it needs both experiments, and one was refused or not run"
                continue
            storage.write_table(comparison, parquet, path)
            metadata[name] = MetadataValue.md(
                readable(comparison).to_markdown(index=False) if len(comparison) else "none"
            )
        for name, image in result.figures.items():
            path = storage.path("analysis", f"{study.name}_{name}.png")
            atomic_write(path, lambda tmp, image=image: tmp.write_bytes(image))
            encoded = base64.b64encode(image).decode()
            metadata[f"plot_{name}"] = MetadataValue.md(f"![{name}](data:image/png;base64,{encoded})")
        return MaterializeResult(metadata=metadata)

    return _analysis


ANALYSIS_ASSETS = [analysis_asset(study) for study in STUDIES.values()]

# Runs from the start (no one has to switch it on in the UI): the daemon that `make ui` and the cluster run evaluates
# ANALYSIS_AUTOMATION every 30 s.
analysis_automation = AutomationConditionSensorDefinition(
    "analysis_automation",
    target=AssetSelection.assets(*ANALYSIS_ASSETS),
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Requests analysis/<study> once experiment partitions have landed (a backfill, the onboarding "
    "sensor, a run from the UI) and none is still in progress, if at least one passed its blocking checks.",
)
