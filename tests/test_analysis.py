"""The analysis of each study on tables shaped like the assets' outputs, without models: inputs with only the Grace
columns, and one experiment refused."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from grace_dagster.assets.exp2 import wide_table
from grace_dagster.llm.extraction import combine, read_answer
from grace_dagster.studies import ID_COLUMN, STUDIES
from grace_dagster.studies.base import AnalysisInput

FIXTURES = Path(__file__).with_name("fixtures")
REPLIES = {"prior": "2", "bets": "0: 10, 1: 20, 2: 50, 3: 20", "knowledge": "No.", "utterance": "It wasn't bad."}


def _tables(study, trials: pd.DataFrame, tmp_path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A structured table and an exp2 wide table as the assets write them (through Parquet)."""
    rows = []
    for trial in trials.itertuples(index=False):
        turns = {t.key: read_answer(t.answer, t.parse, REPLIES[t.key], "stop") for t in study.exp1_turns}
        found, _ = combine(study.answer, turns)
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
                "variant": option,
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


def test_a_study1_input_of_only_some_trials_analyses_with_the_experiment1_tests(tmp_path):
    study = STUDIES["study1"]
    trials = study.load(FIXTURES / "study1_some_only.csv")
    exp1, exp2 = _tables(study, trials, tmp_path)
    result = study.analyze(AnalysisInput(study, {"m": exp1}, {"m": exp2}))
    bets = result.comparisons["bets_by_condition"]
    assert set(bets["said"]) == {"some"} and bets.groupby("source")["n_trials"].sum().tolist() == [6, 6]
    findings = result.comparisons["findings"]
    some_full = findings[(findings.said == "some") & (findings.access == 3) & findings.comparison.str.contains("2")]
    # exp1 bets 10/20/50/20: 30 more on 2 than on 3, as people read "some" with full access ("not all").
    assert some_full.set_index("source").loc["exp1", "model_difference"] == 30.0
    knows = findings[findings.comparison.str.startswith("bet that the speaker knows") & (findings.said == "some")]
    assert sorted(knows["people"].unique()) == ["mean bet 27.1", "mean bet 34.8", "mean bet 93.0"]
    assert result.metadata["trials_not_placed"] == {} and result.figures


def test_trials_that_cannot_be_placed_are_counted_with_the_reason_not_dropped_silently(tmp_path):
    study = STUDIES["study1"]
    path = tmp_path / "study1.csv"
    path.write_text(
        "story_setup,priorQ,speech,speechQ\n"
        'Seeds sprout.,How many of the 3 seeds do you think have sprouted?,"Jim says: ""I have looked at 2 of the 3 '
        'seeds. Two of the seeds have sprouted.""",Now how many of the 3 seeds do you think have sprouted?\n'
        'Seeds sprout.,How many of the 3 seeds do you think have sprouted?,"Jim says: ""I checked. Most sprouted.""",'
        "Now how many of the 3 seeds do you think have sprouted?\n"
    )
    trials = study.load(path)
    exp1, exp2 = _tables(study, trials, tmp_path)
    result = study.analyze(AnalysisInput(study, {"m": exp1}, {"m": exp2}))
    assert len(result.table) == 2, "the unplaced trial stays in the table for R"
    assert sorted(result.metadata["trials_not_placed"].values()) == [1, 1]
    assert any("access" in reason for reason in result.metadata["trials_not_placed"])
