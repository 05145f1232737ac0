"""Analysis over all models, one asset per study: the table for R, the comparison with people, plots.

The assets never branch on a study: each study's module says how its analysis is computed (`Study.analyze`).
Every partition read passes the cross-run gate first (`gate.py`); refused partitions are listed, never read.
"""

import base64
import sys

import pandas as pd
from dagster import AssetExecutionContext, AssetsDefinition, Failure, MaterializeResult, MetadataValue, asset

from grace_dagster.assets import common, gate
from grace_dagster.assets.exp2 import EXP2_CHECKS, exp2_probabilities, wide_path
from grace_dagster.assets.partitions import model_partitions, model_study_partitions
from grace_dagster.assets.structured import STRUCTURED_CHECKS, exp1_structured, structured_path
from grace_dagster.files import atomic_write
from grace_dagster.resources import Storage
from grace_dagster.studies import STUDIES, Study
from grace_dagster.studies import analysis as study_analysis
from grace_dagster.studies.base import AnalysisInput

# What the analysis reads from each experiment: the asset, its blocking checks, the table of one partition.
SOURCES = {
    "exp1": (exp1_structured, gate.blocking_check_names(exp1_structured.key, STRUCTURED_CHECKS), structured_path),
    "exp2": (exp2_probabilities, gate.blocking_check_names(exp2_probabilities.key, EXP2_CHECKS), wide_path),
}
CODE_VERSION = common.code_version(study_analysis, gate, sys.modules[__name__])


def analysis_asset(study: Study) -> AssetsDefinition:
    @asset(
        key=["analysis", study.name],
        deps=[exp1_structured, exp2_probabilities],
        group_name="analysis",
        kinds={"python", "parquet"},
        code_version=CODE_VERSION,
        description=f"{study.title}: every model's answers in one table for R, compared with people "
        f"({study.citation.split('(')[0].strip()}), with plots. Reads only partitions that passed their "
        "blocking checks.",
    )
    def _analysis(context: AssetExecutionContext, storage: Storage) -> MaterializeResult:
        models = sorted(context.instance.get_dynamic_partitions(model_partitions.name))
        tables: dict[str, dict[str, pd.DataFrame]] = {source: {} for source in SOURCES}
        gate_rows = []
        for model in models:
            part = common.Partition(model, study)
            key = model_study_partitions.get_partition_key_from_str(f"{model}|{study.name}")
            for source, (upstream, blocking, path) in SOURCES.items():
                verdict = gate.verdict(context.instance, upstream.key, key, blocking)
                if verdict.usable:
                    tables[source][model] = storage.read_table(path(storage, part))
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

        result = study.analyze(AnalysisInput(study, tables["exp1"], tables["exp2"]))
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
            storage.write_table(comparison, storage.path("analysis", f"{study.name}_{name}.parquet"), path)
            metadata[name] = MetadataValue.md(comparison.round(3).to_markdown(index=False))
        for name, image in result.figures.items():
            path = storage.path("analysis", f"{study.name}_{name}.png")
            atomic_write(path, lambda tmp, image=image: tmp.write_bytes(image))
            encoded = base64.b64encode(image).decode()
            metadata[f"plot_{name}"] = MetadataValue.md(f"![{name}](data:image/png;base64,{encoded})")
        return MaterializeResult(metadata=metadata)

    return _analysis


ANALYSIS_ASSETS = [analysis_asset(study) for study in STUDIES.values()]
