"""Structured extraction and the analysis assets on a real embedded model, through materialize() on a real instance.

The model's real replies are replaced by replies in the requested format (as a capable model gives them), so the
partitions pass the extraction gate honestly and the analysis reads both experiments."""

from __future__ import annotations

import pandas as pd
import pytest
from dagster import AssetKey, DagsterInstance, materialize

from grace_dagster.assets import (
    ALL_ASSETS,
    ALL_CHECKS,
    ANALYSIS_ASSETS,
    exp1_responses,
    exp1_structured,
    exp2_probabilities,
)
from grace_dagster.resources import ExperimentSettings
from grace_dagster.studies import STUDIES
from tests import pipeline

MODEL = "smollm2-135m"
# The documented dtypes of the analysis tables (README, "Analysis tables"), a sample of each kind of column.
DOCUMENTED = {
    "study1": {
        "model": "string",
        "trial_id": "string",
        "access": "Int64",
        "observed": "Int64",
        "said": "string",
        "exp1_Prior_A": "Int64",
        "exp1_Bet_2": "Int64",
        "exp1_Knowledge_A": "string",
        "exp1_extraction": "string",
        "exp2_prior_mean": "float64",
        "exp2_state2_mean": "float64",
        "exp2_bet_2": "float64",
        "exp2_knowledge_p_yes": "float64",
    },
    "study2": {
        "model": "string",
        "Goal": "string",
        "State": "Int64",
        "exp1_polarity": "string",
        "exp1_utterance": "string",
        "exp1_extraction": "string",
        "exp2_utterance_p_it_wasn_t_bad": "float64",
        "exp2_utterance_p_negation": "float64",
    },
}


IN_FORMAT = {"prior": "2", "bets": "0: 10, 1: 20, 2: 50, 3: 20", "knowledge": "No.", "utterance": "It wasn't bad."}


@pytest.mark.slow
def test_extraction_rates_are_reported_and_the_analysis_tables_compare_with_people(tmp_path, servers):
    (tmp_path / "home").mkdir()
    instance = DagsterInstance.local_temp(tempdir=str(tmp_path / "home"))
    res = pipeline.resources(tmp_path, trial_limit=2, max_tokens=16, base_urls={MODEL: servers(MODEL).base_url})
    res["settings"] = ExperimentSettings(trial_limit=2, max_tokens=16, judge_audit_size=2)
    pipeline.prepare(instance, res, [MODEL])
    for study in ("study1", "study2"):
        assert pipeline.run(instance, res, exp1_responses.key, MODEL, study).success
        path = tmp_path / "data" / "exp1" / "responses" / MODEL / f"{study}.parquet"
        responses = pd.read_parquet(path)
        for turn in STUDIES[study].exp1_turns:
            responses[f"response_{turn.key}"] = IN_FORMAT[turn.key]
            responses[f"finish_reason_{turn.key}"] = "stop"
        responses.to_parquet(path, index=False)
        result = materialize(
            [*ALL_ASSETS, *ALL_CHECKS],
            selection=[exp1_structured.key, exp2_probabilities.key],
            partition_key=pipeline.key(MODEL, study),
            resources=res,
            instance=instance,
        )
        meta = pipeline.metadata(result, AssetKey(["exp1", "structured"]))
        table = pd.read_parquet(tmp_path / "data" / "exp1" / "structured" / MODEL / f"{study}.parquet")
        assert meta["rows"] == len(table) == 2 and (table["extraction"] == "parser").all()
        assert meta["extraction_rate"] == 1.0 and meta["judge_share"] == 0.0
        assert meta["judge_audited"] == 2 and meta["judge_model"] == MODEL and meta["judge_requests_made"] >= 2
        assert (tmp_path / "data" / "csv" / f"{MODEL}_{study}_structured.csv").exists()
        checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
        assert checks["answers_comply_with_schema"].passed and checks["extraction_rate_at_least_threshold"].passed

    result = materialize(
        [*ALL_ASSETS, *ALL_CHECKS], selection=[a.key for a in ANALYSIS_ASSETS], resources=res, instance=instance
    )
    assert result.success
    for study, documented in DOCUMENTED.items():
        table = pd.read_parquet(tmp_path / "data" / "analysis" / f"{study}.parquet")
        assert {c: str(table[c].dtype) for c in documented} == documented
        assert set(table["model"]) == {MODEL} and len(table) == 2
        assert pd.read_csv(tmp_path / "data" / "csv" / f"analysis_{study}.csv").shape == table.shape
        meta = pipeline.metadata(result, AssetKey(["analysis", study]))
        plots = [v for k, v in meta.items() if k.startswith("plot_")]
        assert plots and all(p.startswith("![") and "data:image/png;base64," in p for p in plots)
        assert "| ok " in meta["partitions_read_and_refused"]
    fits = pd.read_parquet(tmp_path / "data" / "analysis" / "study2_fit_by_model.parquet")
    exp2 = fits[fits.source == "exp2"].iloc[0]
    assert exp2.cells == 2 and 0 <= exp2.negation_rmse <= 1 and -1 <= exp2.distribution_r <= 1
    exp1 = fits[fits.source == "exp1"].iloc[0]
    assert exp1.n_trials == 2, "both extracted answers reached the analysis"
    meta = pipeline.metadata(result, AssetKey(["analysis", "study2"]))
    assert f"{MODEL} exp2" in meta and "negation r=" in meta[f"{MODEL} exp2"]
    findings = pd.read_parquet(tmp_path / "data" / "analysis" / "study1_findings.parquet")
    assert set(findings["source"]) >= {"exp2"} and findings["people"].str.contains("upper-bounded").any()
