"""The analysis of each study on tables shaped like the assets' outputs, without models: inputs with only the Grace
columns, and one experiment refused."""

from __future__ import annotations

import pandas as pd
import pytest

from grace_dagster.assets.exp2 import wide_table
from grace_dagster.llm.extraction import read_answer
from grace_dagster.studies import ID_COLUMN, STUDIES
from grace_dagster.studies.base import AnalysisInput

ANSWERS = {
    "study1": "Prior: 2\nBets: 0: 10, 1: 20, 2: 50, 3: 20\nKnowledge: no",
    "study2": "It wasn't bad.",
}


def _tables(study, trials: pd.DataFrame, tmp_path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A structured table and an exp2 wide table as the assets write them (through Parquet)."""
    rows = []
    for trial in trials.itertuples(index=False):
        found = read_answer(study.answer, study.parse_answer, ANSWERS[study.name], "stop")
        rows.append({ID_COLUMN: getattr(trial, ID_COLUMN), **found.values, "extraction": found.method})
    keep = [ID_COLUMN, *[c for c in study.factor_columns if c in trials]]
    structured = (
        trials[keep].merge(pd.DataFrame(rows), on=ID_COLUMN).astype({**study.answer_dtypes, "extraction": "string"})
    )
    long = pd.DataFrame(
        [
            {
                ID_COLUMN: getattr(trial, ID_COLUMN),
                "question": q.key,
                "option_index": i,
                "option": option,
                "probability": 1 / len(q.options),
                "captured_mass": 0.5,
            }
            for trial in trials.itertuples(index=False)
            for q in study.exp2_questions(trial)
            for i, option in enumerate(q.options)
        ]
    )
    wide = wide_table(study, trials, long)
    for name, table in (("structured", structured), ("wide", wide)):
        table.to_parquet(tmp_path / f"{name}.parquet", index=False)
    return pd.read_parquet(tmp_path / "structured.parquet"), pd.read_parquet(tmp_path / "wide.parquet")


@pytest.mark.parametrize("study_name", ["study1", "study2"])
def test_inputs_with_only_the_grace_columns_analyse_with_the_documented_dtypes(study_name, tmp_path):
    study = STUDIES[study_name]
    sample = pd.read_csv(study.sample_path).head(12)
    sample[study.text_columns].to_csv(tmp_path / "grace.csv", index=False)
    trials = study.load(tmp_path / "grace.csv")
    exp1, exp2 = _tables(study, trials, tmp_path)

    result = study.analyze(AnalysisInput(study, {"m": exp1}, {"m": exp2}))
    table = result.table
    assert len(table) == 12 and table["model"].tolist() == ["m"] * 12
    assert str(table["exp1_extraction"].dtype) == "string" and (table["exp1_extraction"] == "parser").all()
    exp2_columns = [c for c in table if c.startswith("exp2_")]
    assert exp2_columns and all(str(table[c].dtype) == "float64" for c in exp2_columns)
    assert all(len(c) for c in result.comparisons.values()) and result.figures


@pytest.mark.parametrize("study_name", ["study1", "study2"])
def test_a_refused_experiment_leaves_its_documented_columns_empty(study_name, tmp_path):
    study = STUDIES[study_name]
    trials = study.load().head(12)
    exp1, _ = _tables(study, trials, tmp_path)

    table = study.analyze(AnalysisInput(study, {"m": exp1}, {})).table
    exp2_columns = [c for c in table if c.startswith("exp2_")]
    assert exp2_columns and all(str(table[c].dtype) == "float64" and table[c].isna().all() for c in exp2_columns)
    assert table["exp1_extraction"].notna().all()
