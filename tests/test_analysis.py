"""The analysis of each study on tables shaped like the assets' outputs, without models: inputs with only the Grace
columns, and one experiment refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from grace_dagster.assets.exp2 import wide_table
from grace_dagster.llm.extraction import combine, read_answer
from grace_dagster.studies import ID_COLUMN, STUDIES, analysis, study2
from grace_dagster.studies.base import AnalysisInput, Sampling

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


# --- Computations pinned on small fixed tables, against values worked out by hand -----------------------------------


def test_total_variation_is_half_the_summed_absolute_difference():
    assert analysis.total_variation([0.5, 0.5, 0, 0], [0.25, 0.25, 0.25, 0.25]) == 0.5
    assert analysis.total_variation([1, 0], [0, 1]) == 1.0
    assert analysis.total_variation([0.2, 0.8], [0.2, 0.8]) == 0.0


def test_fit_gives_pearson_r_and_rmse_over_the_known_pairs():
    # model 0.2, 0.4, 0.9 against people 0, 0.5, 1: deviations (-0.3, -0.1, 0.4) and (-0.5, 0, 0.5), so
    # r = 0.35 / sqrt(0.26 × 0.5) = 0.970725; errors 0.2, -0.1, -0.1, so RMSE = sqrt(0.06 / 3) = 0.141421.
    pairs, r, rmse = analysis.fit_arrays([0.2, 0.4, 0.9, np.nan], [0.0, 0.5, 1.0, 0.3])
    assert pairs == 3 and r == pytest.approx(0.970725, abs=1e-6) and rmse == pytest.approx(0.141421, abs=1e-6)
    assert np.isnan(analysis.fit_arrays([0.2, 0.4], [0.0, 0.5])[1]), "r needs 3 pairs"


def test_bootstrap_resamples_items_with_a_fixed_seed():
    boot = analysis.Bootstrap.over(pd.Series(["B", "A", "C", "A"]), "item", resamples=4, seed=7)
    assert boot.items.tolist() == ["A", "B", "C"]
    assert boot.weights.tolist() == [[1, 2, 0], [2, 0, 1], [1, 2, 0], [0, 2, 1]]  # each resample draws 3 items
    # One row per item, values A=0, B=3, C=9: the resamples' means are 6/3, 9/3, 6/3, 15/3 = 2, 3, 2, 5. Percentile
    # 2.5 of (2, 2, 3, 5) sits 0.075 of the way from the 1st to the 2nd value: 2; percentile 97.5 sits 0.925 of the
    # way from the 3rd to the 4th: 3 + 0.925 × 2 = 4.85.
    frame = pd.DataFrame({analysis.ITEM: ["A", "B", "C"], "cell": ["x"] * 3, "value": [0.0, 3.0, 9.0]})
    means = boot.means(frame, ["cell"], ["value"])
    assert means.point[0, 0] == 4.0 and means.replicates[:, 0, 0].tolist() == [2.0, 3.0, 2.0, 5.0]
    low, high = means.interval()
    assert low[0, 0] == pytest.approx(2.0) and high[0, 0] == pytest.approx(4.85)


def test_bootstrap_weights_an_item_by_its_rows_and_needs_two_items_for_an_interval():
    # Item A has two rows (1, 1), item B one (0); drawn twice A, once each, twice B, once each: the means of the
    # rows are 1, 2/3, 0, 2/3. Intervals: percentile 2.5 of (0, 2/3, 2/3, 1) = 0.075 × 2/3 = 0.05; percentile
    # 97.5 = 2/3 + 0.925 × 1/3 = 0.975. Cell "y" has one item only: no interval.
    boot = analysis.Bootstrap(pd.Index(["A", "B"]), np.array([[2, 0], [1, 1], [0, 2], [1, 1]]), "item")
    frame = pd.DataFrame(
        {analysis.ITEM: ["A", "A", "B", "A"], "cell": ["x", "x", "x", "y"], "value": [1.0, 1.0, 0.0, 0.5]}
    )
    means = boot.means(frame, ["cell"], ["value"])
    assert means.index.tolist() == ["x", "y"] and means.n_items.tolist() == [2, 1] and means.n_rows.tolist() == [3, 1]
    assert means.point[:, 0] == pytest.approx([2 / 3, 0.5])
    assert means.replicates[:, 0, 0] == pytest.approx([1, 2 / 3, 0, 2 / 3])
    low, high = means.interval()
    assert low[0, 0] == pytest.approx(0.05) and high[0, 0] == pytest.approx(0.975)
    assert np.isnan(low[1, 0]) and np.isnan(high[1, 0])


def test_wilson_interval_matches_the_human_tables():
    # 56 of 203 people negated in (informative, 0 hearts): the shipped table gives 0.219 to 0.3411.
    low, high = analysis.wilson_interval(np.array([56]), np.array([203]))
    assert low[0] == pytest.approx(0.2190, abs=1e-4) and high[0] == pytest.approx(0.3411, abs=1e-4)
    # 49 of 49: 1 / (1 + 1.96² / 49) = 0.9273 to 1.
    low, high = analysis.wilson_interval(np.array([49]), np.array([49]))
    assert low[0] == pytest.approx(0.9273, abs=1e-4) and high[0] == pytest.approx(1.0)


def _study2_input() -> AnalysisInput:
    """Two items (A, B), one trial each in (informative, 0 hearts), one model. Experiment 1, two samples each:
    A says "It wasn't bad" and "It was terrible", B "It wasn't bad" twice. Experiment 2: A puts 0.5 on "It was
    terrible" and 0.5 on "It wasn't bad", B 0.5 on "It wasn't bad" and 0.5 on "It wasn't terrible". Literal
    meaning, p(yes) of "It was terrible / bad / good" at 0 hearts: A 0.9, 0.7, 0.2; B 0.7, 0.5, 0."""
    study = STUDIES["study2"]
    factors = {"Goal": "informative", "State": 0}
    exp1 = pd.DataFrame(
        [
            {"trial_id": t, "item": i, **factors, "sample": s, "polarity": p, "assessment": a, "extraction": "parser"}
            for t, i, s, p, a in [
                ("t-a", "A", 0, "wasn't", "bad"),
                ("t-a", "A", 1, "was", "terrible"),
                ("t-b", "B", 0, "wasn't", "bad"),
                ("t-b", "B", 1, "wasn't", "bad"),
            ]
        ]
    )
    exp1["utterance"] = "It " + exp1["polarity"] + " " + exp1["assessment"]
    wide = pd.DataFrame({"trial_id": ["t-a", "t-b"], "item": ["A", "B"], **{k: [v, v] for k, v in factors.items()}})
    for column in [*study2.UTTERANCE_COLUMNS.values(), *study2.LITERAL_COLUMNS.values()]:
        wide[column] = np.nan
    distributions = {"It was terrible": [0.5, 0.0], "It wasn't bad": [0.5, 0.5], "It wasn't terrible": [0.0, 0.5]}
    for utterance in study2.UTTERANCES:
        wide[study2.UTTERANCE_COLUMNS[utterance]] = distributions.get(utterance, [0.0, 0.0])
    wide["utterance_p_negation"] = [0.5, 1.0]
    literal = {"It was terrible": [0.9, 0.7], "It was bad": [0.7, 0.5], "It was good": [0.2, 0.0]}
    for utterance, p_yes in literal.items():
        wide[study2.LITERAL_COLUMNS[utterance]] = p_yes
    wide["utterance_captured_mass"] = [0.01, 0.1]
    return AnalysisInput(
        study,
        {"m": exp1.astype({"polarity": "string", "assessment": "string"})},
        {"m": wide},
        {"m": Sampling(temperature=0.7, samples_per_trial=2)},
    )


def test_study2_sets_each_cell_of_experiment1_against_experiment2_with_intervals_over_items():
    result = STUDIES["study2"].analyze(_study2_input())
    (row,) = result.comparisons["exp1_vs_exp2"].to_dict("records")
    # Experiment 1: "It wasn't bad" 3 of 4, "It was terrible" 1 of 4. Experiment 2: the mean of the trials'
    # distributions, "It was terrible" 0.25, "It wasn't bad" 0.5, "It wasn't terrible" 0.25.
    assert row["exp1_p_it_wasn_t_bad"] == 0.75 and row["exp1_p_it_was_terrible"] == 0.25
    assert row["exp2_p_it_wasn_t_bad"] == 0.5 and row["exp2_p_it_wasn_t_terrible"] == 0.25
    # TV: 0.5 × (|0.75 - 0.5| + |0 - 0.25|) = 0.25. Resampling items: A alone gives 0 (both experiments split
    # 0.5/0.5 on the same two utterances), B alone 0.5 (1 on "It wasn't bad" against 0.5): the interval is [0, 0.5].
    assert row["tv_exp1_exp2"] == pytest.approx(0.25)
    assert (row["tv_exp1_exp2_ci_low"], row["tv_exp1_exp2_ci_high"]) == pytest.approx((0.0, 0.5))
    # People in (informative, 0): 0.5813, 0.1281, 0.0148, 0, 0.0739, 0.0197, 0.1576, 0.0246 (terrible .. amazing,
    # was then wasn't). Experiment 1 against them: 0.5 × (0.3313 + 0.1281 + 0.0148 + 0.0739 + 0.7303 + 0.1576 +
    # 0.0246) = 0.7303; A alone 0.4803, B alone 0.9803. Experiment 2: 0.5 × (0.3313 + 0.1281 + 0.0148 + 0.1761 +
    # 0.4803 + 0.1576 + 0.0246) = 0.6564.
    assert row["tv_exp1_people"] == pytest.approx(0.7303, abs=1e-4)
    assert (row["tv_exp1_people_ci_low"], row["tv_exp1_people_ci_high"]) == pytest.approx((0.4803, 0.9803), abs=1e-4)
    assert row["tv_exp2_people"] == pytest.approx(0.6564, abs=1e-4)
    # Negations: 3 of 4 answers; 0.75 of Experiment 2's mass. A alone: 0.5 in both; B alone: 1 in both.
    assert row["exp1_p_negation"] == 0.75 and row["exp2_p_negation"] == 0.75
    assert (row["exp1_p_negation_ci_low"], row["exp1_p_negation_ci_high"]) == pytest.approx((0.5, 1.0))
    assert (row["exp2_p_negation_ci_low"], row["exp2_p_negation_ci_high"]) == pytest.approx((0.5, 1.0))
    assert (row["exp1_answers"], row["exp2_trials"], row["n_items"]) == (4, 2, 2)
    assert (row["exp1_temperature"], row["exp1_samples_per_trial"], row["exp2_temperature"]) == (0.7, 2, 1.0)
    assert "temperature 0.7" in result.metadata["temperatures"] and "temperature 1" in result.metadata["temperatures"]
    # One cell: RMSE against people's 0.2759 negated is |0.75 - 0.2759| = 0.4741, for both experiments.
    fits = result.comparisons["fit_by_model"].set_index("source")
    assert fits.loc["exp1", "negation_rmse"] == pytest.approx(0.4741) and fits.loc["exp2", "cells"] == 1
    assert fits.loc["exp1", "n_answers"] == 4 and fits.loc["exp2", "n_answers"] == 2
    assert set(result.figures) == {
        "negation_by_goal_state",
        "utterance_heatmaps",
        "exp1_vs_exp2",
        "literal_meaning",
        "captured_mass",
    }


def test_study2_literal_meaning_is_compared_with_people_cell_by_cell():
    result = STUDIES["study2"].analyze(_study2_input())
    cells = result.comparisons["literal_meaning"].set_index(["utterance", "state_hearts"])
    # Model p(yes) per cell: the mean over the two items; people: the shipped proportions (1.0, 1.0, 0.0204 of 49).
    terrible = cells.loc[("It was terrible", 0)]
    assert terrible["model_p_yes"] == pytest.approx(0.8) and terrible["human_p_yes"] == 1.0
    assert terrible["difference"] == pytest.approx(-0.2)
    assert (terrible["model_p_yes_ci_low"], terrible["model_p_yes_ci_high"]) == pytest.approx((0.7, 0.9))
    assert terrible["human_ci_low"] == pytest.approx(0.9273, abs=1e-4) and terrible["human_n"] == 49
    assert cells.loc[("It was good", 0), "difference"] == pytest.approx(0.1 - 0.0204)
    assert len(cells) == 3, "cells the model was not asked about are not invented"
    # Over the 3 cells, model (0.8, 0.6, 0.1) against people (1, 1, 0.0204): deviations (0.3, 0.1, -0.4) and
    # (0.3265, 0.3265, -0.6531): r = 0.39184 / sqrt(0.26 × 0.63974) = 0.96077; RMSE = sqrt((0.04 + 0.16 +
    # 0.0063362) / 3) = 0.26226.
    (fit,) = result.comparisons["literal_fit_by_model"].to_dict("records")
    assert fit["cells"] == 3
    assert fit["p_yes_r"] == pytest.approx(0.96077, abs=1e-5) and fit["p_yes_rmse"] == pytest.approx(0.26226, abs=1e-5)
    (mass,) = result.comparisons["captured_mass"].to_dict("records")
    assert (mass["question_set"], mass["questions"], mass["captured_mass_min"]) == ("utterance", 2, 0.01)


def _study1_input() -> AnalysisInput:
    """Stories A and B, each at access 1 and access 3, the speaker reporting "one"; one model, two samples per trial.
    Experiment 1 bets (0, 1, 2, 3) and knowledge; Experiment 2's four states' expected chances (%) and p(yes)."""
    study = STUDIES["study1"]
    trials = [  # trial, story, access, exp1 samples [(bets, knows)], exp2 state means, exp2 p(yes)
        ("t1", "A", 1, [((10, 60, 20, 10), "yes"), ((0, 80, 20, 0), "no")], (10, 20, 30, 50), 0.2),
        ("t2", "B", 1, [((20, 40, 20, 20), "yes"), ((20, 40, 20, 20), "yes")], (25, 25, 25, 25), 0.4),
        ("t3", "A", 3, [((0, 100, 0, 0), "no"), ((0, 90, 10, 0), "no")], (0, 60, 30, 30), 0.9),
        ("t4", "B", 3, [((0, 100, 0, 0), "yes"), ((0, 100, 0, 0), "yes")], (0, 100, 0, 0), 0.7),
    ]
    factors = lambda t, story, access: {"trial_id": t, "story": story, "access": access, "observed": 1}  # noqa: E731
    exp1 = pd.DataFrame(
        [
            {
                **factors(t, story, access),
                "sample": s,
                "Prior_A": 1,
                **{f"Bet_{k}": b[k] for k in range(4)},
                "Knowledge_A": knows,
                "extraction": "parser",
            }
            for t, story, access, samples, _, _ in trials
            for s, (b, knows) in enumerate(samples)
        ]
    )
    exp1["quantifier"] = pd.Series([pd.NA] * len(exp1), dtype="string")
    wide = pd.DataFrame(
        [
            {
                **factors(t, story, access),
                "prior_mean": 1.0,
                **{f"state{k}_mean": m[k] for k in range(4)},
                "knowledge_p_yes": p_yes,
                "knowledge_captured_mass": 0.5,
            }
            for t, story, access, _, m, p_yes in trials
        ]
    )
    wide["quantifier"] = pd.Series([pd.NA] * len(wide), dtype="string")
    return AnalysisInput(study, {"m": exp1}, {"m": wide}, {"m": Sampling(temperature=1.0, samples_per_trial=2)})


def test_study1_coherence_sums_rescaled_bets_and_knowledge_by_access():
    result = STUDIES["study1"].analyze(_study1_input())
    table = result.table
    # The four separately asked chances: t1 10+20+30+50 = 110, t2 100, t3 120, t4 100 (percentage points).
    sums = table.drop_duplicates("trial_id").set_index("trial_id")["exp2_state_means_sum"]
    assert sums.to_dict() == {"t1": 110.0, "t2": 100.0, "t3": 120.0, "t4": 100.0}
    t1 = table[table.trial_id == "t1"].iloc[0]
    assert [t1[f"exp2_bet_{k}"] for k in range(4)] == pytest.approx([1000 / 110, 2000 / 110, 3000 / 110, 5000 / 110])
    assert len(table) == 8 and table["sample"].tolist() == [0, 1] * 4, "one row per trial × sample"
    (coherence,) = result.comparisons["coherence"].to_dict("records")
    # Mean 107.5; story A alone (110 + 120) / 2 = 115, B alone 100: interval [100, 115].
    assert coherence["state_means_sum_mean"] == 107.5
    assert (coherence["state_means_sum_min"], coherence["state_means_sum_max"]) == (100.0, 120.0)
    assert (coherence["state_means_sum_ci_low"], coherence["state_means_sum_ci_high"]) == pytest.approx((100, 115))
    # p(yes) that the speaker knows exactly: access 1 (0.2 + 0.4) / 2, access 3 (0.9 + 0.7) / 2.
    assert coherence["knowledge_p_yes_access_1"] == pytest.approx(0.3)
    assert coherence["knowledge_p_yes_access_3"] == pytest.approx(0.8)
    assert (coherence["knowledge_p_yes_access_1_ci_low"], coherence["knowledge_p_yes_access_1_ci_high"]) == (
        pytest.approx((0.2, 0.4))
    )
    assert np.isnan(coherence["knowledge_p_yes_access_2"]), "no trial at access 2"


def test_study1_sets_experiment1_bets_against_experiment2_with_intervals_over_stories():
    result = STUDIES["study1"].analyze(_study1_input())
    comparison = result.comparisons["exp1_vs_exp2"].set_index(["access", "measure"])
    on_one = comparison.loc[(1, "bet on 1")]
    # Access 1: Experiment 1 bets on 1 are 60, 80 (story A) and 40, 40 (B): mean 55, A alone 70, B alone 40.
    # Experiment 2 rescaled: 100 × 20 / 110 = 18.1818 (A) and 25 (B): mean 21.5909.
    assert on_one["exp1_mean"] == 55.0 and on_one["exp2_mean"] == pytest.approx(21.5909, abs=1e-4)
    assert (on_one["exp1_ci_low"], on_one["exp1_ci_high"]) == pytest.approx((40.0, 70.0))
    assert (on_one["exp2_ci_low"], on_one["exp2_ci_high"]) == pytest.approx((18.1818, 25.0), abs=1e-4)
    # The difference resampled with both experiments together: B alone 40 - 25 = 15, A alone 70 - 18.18 = 51.82.
    assert on_one["difference"] == pytest.approx(33.4091, abs=1e-4)
    assert (on_one["difference_ci_low"], on_one["difference_ci_high"]) == pytest.approx((15.0, 51.8182), abs=1e-4)
    knows = comparison.loc[(1, "bet that the speaker knows exactly")]
    assert knows["exp1_mean"] == 75.0 and knows["exp2_mean"] == pytest.approx(30.0)  # 3 yes of 4; 100 × 0.3
    knowledge = result.comparisons["knowledge_by_access"].set_index(["source", "access"])
    # People reported for numbers: 42.0 with partial access, 92.1 with complete access.
    assert (
        knowledge.loc[("exp1", 1), "people_mean_bet"] == 42.0 and knowledge.loc[("exp1", 3), "people_mean_bet"] == 92.1
    )
    assert knowledge.loc[("exp2", 3), "bet_knows_exactly"] == pytest.approx(80.0)
    fits = result.comparisons["fit_by_model"].set_index("source")
    # Against 42.0 and 92.1: exp2 30 and 80, errors 12 and 12.1: RMSE sqrt((144 + 146.41) / 2) = 12.0501.
    assert fits.loc["exp2", "conditions"] == 2 and fits.loc["exp2", "knowledge_rmse"] == pytest.approx(
        12.0501, abs=1e-4
    )
    assert "temperature 1" in result.metadata["temperatures"] and "differ" not in result.metadata["temperatures"]
    assert {"bets_by_condition", "knowledge_by_access", "exp1_vs_exp2", "coherence", "captured_mass"} == set(
        result.figures
    )


def test_the_analysis_table_repeats_a_trials_experiment2_values_on_each_of_its_samples():
    inp = _study2_input()
    only_exp2 = AnalysisInput(inp.study, {}, {"other": inp.exp2["m"]})
    both = STUDIES["study2"].analyze(AnalysisInput(inp.study, inp.exp1, {**inp.exp2, **only_exp2.exp2}))
    table = both.table
    mine = table[table.model == "m"]
    assert mine[["trial_id", "sample"]].values.tolist() == [["t-a", 0], ["t-a", 1], ["t-b", 0], ["t-b", 1]]
    assert mine["exp2_utterance_p_negation"].tolist() == [0.5, 0.5, 1.0, 1.0]
    other = table[table.model == "other"]
    assert len(other) == 2 and other["sample"].isna().all() and other["exp1_utterance"].isna().all()
    assert str(table["sample"].dtype) == "Int64"


def test_study2_reports_answers_by_the_order_the_options_were_listed_in():
    """Item A asked with the options in order 1 ("It was terrible" first, "It wasn't amazing" last), item B in order
    3 ("It wasn't terrible" first, "It was amazing" last). Experiment 1: A chose "It was terrible" once of two, B
    never; Experiment 2: A put 0.5 on "It was terrible", B 0.5 on "It wasn't terrible" and none on "It was
    terrible". The lift is an option's share when listed first against its share where it was not."""
    inp = _study2_input()
    orders = {"t-a": 1, "t-b": 3}
    for tables in (inp.exp1, inp.exp2):
        tables["m"]["option_order"] = tables["m"]["trial_id"].map(orders).astype("Int64")
    table = STUDIES["study2"].analyze(inp).comparisons["by_option_order"]
    rows = table.set_index(["source", "option_order"])
    assert list(rows.index) == [("exp1", 1), ("exp1", 3), ("exp2", 1), ("exp2", 3)]
    assert rows["first_listed"].tolist() == ["It was terrible", "It wasn't terrible"] * 2
    assert rows["p_first_listed"].tolist() == [0.5, 0.0, 0.5, 0.5]
    assert rows["p_first_listed_elsewhere"].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert rows["first_listed_lift"].tolist() == [0.5, 0.0, 0.5, 0.5]
    assert rows["last_listed"].tolist() == ["It wasn't amazing", "It was amazing"] * 2
    assert rows["last_listed_lift"].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert rows["p_negation"].tolist() == [0.5, 1.0, 0.5, 1.0]
    assert rows["n_answers"].tolist() == [2, 2, 1, 1] and (rows["n_items"] == 1).all()
    assert rows["first_listed_lift_ci_low"].isna().all(), "one item per order: no interval"


def test_study2_option_order_lift_is_zero_for_a_model_that_ignores_the_order():
    """Both items answered "It was terrible" in Experiment 1 whatever the order: listed first in order 1, it gets the
    same share as in order 3, so no lift."""
    inp = _study2_input()
    inp.exp1["m"] = inp.exp1["m"].assign(polarity="was", assessment="terrible", utterance="It was terrible")
    for tables in (inp.exp1, inp.exp2):
        tables["m"]["option_order"] = tables["m"]["trial_id"].map({"t-a": 1, "t-b": 3}).astype("Int64")
    rows = STUDIES["study2"].analyze(inp).comparisons["by_option_order"].set_index(["source", "option_order"])
    assert rows.loc[("exp1", 1), "p_first_listed"] == 1.0 and rows.loc[("exp1", 1), "first_listed_lift"] == 0.0


def test_study2_options_are_listed_in_the_originals_four_orders_balanced_over_participants():
    study = STUDIES["study2"]
    trials = study.load(study.sample_path)
    counts = trials["option_order"].value_counts()
    assert set(counts.index) == {1, 2, 3, 4} and counts.max() - counts.min() <= 12  # whole participants of 12 trials
    assert (trials.groupby("participant")["option_order"].nunique() == 1).all(), "one order per participant"
    listed = {}
    for trial in trials.drop_duplicates("option_order").itertuples(index=False):
        (prompt,) = study.exp1_prompts(trial)
        listed[trial.option_order] = prompt.rsplit("Reply with exactly one of: ", 1)[1].rstrip(".").split(", ")
    assert listed[1][0] == "It was terrible" and listed[2][0] == "It was amazing"
    assert listed[3][0] == "It wasn't terrible" and listed[4][-1] == "It was terrible"
    assert all(sorted(options) == sorted(study2.UTTERANCES) for options in listed.values())
