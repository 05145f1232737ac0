"""The pipeline on the production server: both experiments materialize against real vLLM through the registry's
local vLLM entry, with every check, and Experiment 2's distributions agree with the embedded server's.

Written against the assets' public behaviour (materialize, checks, metadata, output tables), so it holds whatever
the studies ask. Trial subsets: study 1 has 6 questions per trial (the prior among them), study 2 at least one, so 4
and 20 trials give at least 20 questions of each study for the comparison.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from dagster import DagsterInstance, materialize

from grace_dagster.assets import ALL_ASSETS, ALL_CHECKS, EXPERIMENT_ASSETS, exp2_probabilities
from grace_dagster.assets.exp2 import options_of
from grace_dagster.resources import ExperimentSettings
from tests import pipeline
from tests.conftest import VLLM_MODEL
from tests.test_vllm_local import _pinned_vllm_version

EMBEDDED_MODEL = "smollm2-135m"
TRIALS = {"study1": 4, "study2": 20}
# Total variation between the two servers' distributions over one question's options, same weights, bf16 (vLLM)
# against Q4_1 (llama.cpp): (max, median) allowed per study. Measured here (vLLM 0.32 CPU, eager; printed by the
# test, reported in the README): study 1 max 0.161, median 0.067 over 24 questions (up to 11 close numeric options);
# study 2 max 0.122, median 0.034 over 76 (20 utterance questions of 8 options, 56 literal-meaning yes/no questions).
# The bounds leave about 1.6x room, as a different CPU or batch changes bf16 rounding.
TOTAL_VARIATION_BOUNDS = {"study1": (0.25, 0.15), "study2": (0.20, 0.06)}


def _settings(study: str, judge: str) -> ExperimentSettings:
    # A threshold of 0: the tiny model rarely follows the answer format, and its partition is still to be read.
    return ExperimentSettings(
        trial_limit=TRIALS[study], max_tokens=48, judge_model=judge, min_extraction_rate=0.0, judge_audit_size=2
    )


def _failures(result) -> str:
    """The step failures of a run, for the assertion message."""
    return "\n".join(
        f"{e.step_key}: {e.step_failure_data.error.cause.message if e.step_failure_data.error.cause else ''}"
        for e in result.all_events
        if e.is_step_failure
    )


def _checks_of(keys) -> dict[str, bool]:
    """Every check on the given assets: name -> blocking."""
    return {
        spec.name: spec.blocking for checks in ALL_CHECKS for spec in checks.check_specs if spec.asset_key in set(keys)
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory, vllm_server, servers):
    """Both experiments for the vLLM entry (the judge on vLLM too), and Experiment 2 for the embedded model."""
    tmp = tmp_path_factory.mktemp("vllm-pipeline")
    (tmp / "home").mkdir()
    instance = DagsterInstance.local_temp(tempdir=str(tmp / "home"))
    urls = {VLLM_MODEL: vllm_server.base_url, EMBEDDED_MODEL: servers(EMBEDDED_MODEL).base_url}
    res = pipeline.resources(tmp, base_urls=urls)
    pipeline.prepare(instance, res, [VLLM_MODEL, EMBEDDED_MODEL])
    experiment_keys = [a.key for assets in EXPERIMENT_ASSETS.values() for a in assets]
    results = {}
    for study in TRIALS:
        for model, keys in [(VLLM_MODEL, experiment_keys), (EMBEDDED_MODEL, [exp2_probabilities.key])]:
            results[model, study] = materialize(
                [*ALL_ASSETS, *ALL_CHECKS],
                selection=keys,
                partition_key=pipeline.key(model, study),
                resources={**res, "settings": _settings(study, judge=VLLM_MODEL)},
                instance=instance,
                raise_on_error=False,
            )
    return tmp / "data", results, experiment_keys


@pytest.mark.slow
@pytest.mark.parametrize("study", list(TRIALS))
def test_both_experiments_materialize_on_vllm_with_every_check(runs, study):
    data, results, keys = runs
    result = results[VLLM_MODEL, study]
    assert result.success, _failures(result)
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    checks = _checks_of(keys)
    assert set(evaluations) == set(checks), "every check of both experiments ran"
    failed_blocking = [name for name, blocking in checks.items() if blocking and not evaluations[name].passed]
    assert failed_blocking == []
    materialized = {m.asset_key for m in result.get_asset_materialization_events()}
    assert materialized == set(keys)
    pinned = _pinned_vllm_version()
    for key in keys:
        meta = pipeline.metadata(result, key)
        # Provenance: the partition model's answers (server_version) and the judge's (judge_server_version; n/a
        # when the parser read every answer) came from the pinned vLLM release.
        versions = {k: v for k, v in meta.items() if k.endswith("server_version")}
        assert versions and set(versions.values()) <= {pinned, "n/a"}, f"{key.to_user_string()}: {versions}"
        if "server_version" in meta:
            assert meta["server_version"] == pinned
        if "judge_model" in meta:
            assert meta["judge_model"] == VLLM_MODEL, "the judge ran on vLLM too"
    exp1 = pd.read_parquet(data / "exp1" / "responses" / VLLM_MODEL / f"{study}.parquet")
    structured = pd.read_parquet(data / "exp1" / "structured" / VLLM_MODEL / f"{study}.parquet")
    assert len(exp1) == len(structured) == TRIALS[study]
    assert set(structured["extraction"]) <= {"parser", "judge", "failed"}, "nobody reviewed these rows"
    long = pd.read_parquet(data / "exp2" / "probabilities" / VLLM_MODEL / f"{study}.parquet")
    assert long["trial_id"].nunique() == TRIALS[study]
    assert np.allclose(options_of(long).groupby(["trial_id", "question"])["probability"].sum(), 1.0)


def _distributions(data, model: str, study: str) -> pd.DataFrame:
    table = options_of(pd.read_parquet(data / "exp2" / "probabilities" / model / f"{study}.parquet"))
    return table.set_index(["trial_id", "question", "option_index"])[["option", "probability"]]


@pytest.mark.slow
@pytest.mark.parametrize("study", list(TRIALS))
def test_exp2_distributions_from_vllm_and_the_embedded_server_agree(runs, study):
    """Same SmolLM2 weights, different kernels: bf16 on vLLM against Q4_1 on llama.cpp. The total variation per
    question stays within the study's TOTAL_VARIATION_BOUNDS (its max and its median)."""
    data, results, _ = runs
    for model in (EMBEDDED_MODEL, VLLM_MODEL):
        assert results[model, study].success, _failures(results[model, study])
    vllm, embedded = _distributions(data, VLLM_MODEL, study), _distributions(data, EMBEDDED_MODEL, study)
    assert vllm.index.equals(embedded.index) and (vllm["option"] == embedded["option"]).all()
    difference = (vllm["probability"] - embedded["probability"]).abs()
    tv = 0.5 * difference.groupby(level=["trial_id", "question"]).sum()
    assert len(tv) >= 20
    print(
        f"\n{study}: total variation vLLM (bf16) vs embedded (Q4_1) over {len(tv)} questions: "
        f"max {tv.max():.4f}, median {tv.median():.4f}, mean {tv.mean():.4f}"
    )
    max_bound, median_bound = TOTAL_VARIATION_BOUNDS[study]
    assert tv.max() <= max_bound and tv.median() <= median_bound
