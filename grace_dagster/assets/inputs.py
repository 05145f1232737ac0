"""The validated study inputs: the only way trials reach an experiment."""

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from grace_dagster.assets.partitions import study_partitions
from grace_dagster.resources import Storage
from grace_dagster.studies import STUDIES


@asset(
    partitions_def=study_partitions,
    group_name="inputs",
    kinds={"pandas", "parquet"},
    code_version="1",
)
def study_trials(context: AssetExecutionContext, storage: Storage) -> MaterializeResult:
    """The study's trials, validated against the study's input schema (one partition per study).

    A bad file fails here with every problem listed by row and column, before any model is asked and without
    touching the previous good copy.
    """
    study = STUDIES[context.partition_key]
    source = storage.input_path(study)
    table = study.load(source)
    (written,) = storage.write_table(table, storage.trials_path(study))
    derived = [c for c in study.factor_columns if c in table and table[c].notna().any()]
    context.log.info(f"{study.name}: {len(table)} trials validated from {source}, written to {written}")
    return MaterializeResult(
        metadata={
            "source": MetadataValue.path(str(source)),
            "path": MetadataValue.path(str(written)),
            "rows": len(table),
            "full_size": study.full_size,
            "columns": MetadataValue.json(list(table.columns)),
            "design_factors": MetadataValue.json(derived),
            "preview": MetadataValue.md(table.head(5).to_markdown(index=False)),
        }
    )
