"""Experiment 1 raw responses through the real asset, the real embedded server and a real Dagster instance."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from dagster import DagsterInstance

from grace_dagster.assets import exp1_responses
from grace_dagster.assets.checks import CheckContext
from grace_dagster.assets.exp1 import answers_not_truncated, every_trial_answered, responses_non_empty
from grace_dagster.resources import ExperimentSettings
from grace_dagster.studies import STUDIES
from tests import pipeline

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"


def _conversations(path: Path) -> list[dict]:
    """The finished conversations in a checkpoint (the other lines are their turns)."""
    return [record for record in pipeline.checkpoint_records(path) if "turns" in record]


@pytest.mark.slow
def test_killed_run_resumes_with_each_trial_once_and_no_repeat_requests(tmp_path):
    """A real `dagster asset materialize` process is SIGKILLed part-way; the rerun finishes the rest."""
    home = tmp_path / "home"
    home.mkdir()
    instance = DagsterInstance.local_temp(tempdir=str(home))
    res = pipeline.resources(tmp_path, trial_limit=8, max_tokens=24)
    pipeline.prepare(instance, res, ["smollm2-135m"], studies=("study2",))
    checkpoint = tmp_path / "data" / "checkpoints" / "exp1" / "smollm2-135m" / "study2.jsonl"

    config = {"resources": {"settings": {"config": {"trial_limit": 8, "max_tokens": 24}}}}
    ready = lambda: len(_conversations(checkpoint)) >= 2  # noqa: E731
    pipeline.kill_part_way(home, tmp_path / "data", "exp1/responses", "smollm2-135m|study2", config, ready)
    answered_before = {r["trial_id"] for r in _conversations(checkpoint)}
    assert 2 <= len(answered_before) < 8, "the run was killed part-way"

    result = pipeline.run(instance, res, exp1_responses.key, "smollm2-135m", "study2")
    assert result.success
    meta = pipeline.metadata(result, exp1_responses.key)
    assert meta["cache_hits"] == len(answered_before)
    assert meta["requests_made"] == 8 - len(answered_before), "no request for a trial already answered"
    records = _conversations(checkpoint)
    assert len(records) == 8 and len({r["trial_id"] for r in records}) == 8, "no duplicates"
    table = pd.read_parquet(tmp_path / "data" / "exp1" / "responses" / "smollm2-135m" / "study2.parquet")
    assert len(table) == 8 and table["trial_id"].is_unique and table["response_utterance"].notna().all()
    assert all(e.passed for e in result.get_asset_check_evaluations() if e.check_name != "answers_not_truncated")


@pytest.mark.slow
def test_rematerializing_a_finished_partition_makes_zero_model_requests(tmp_path):
    instance = DagsterInstance.ephemeral()
    res = pipeline.resources(tmp_path, trial_limit=3, max_tokens=16)
    pipeline.prepare(instance, res, ["gemma3-270m"], studies=("study1",))
    first = pipeline.run(instance, res, exp1_responses.key, "gemma3-270m", "study1")
    assert first.success and pipeline.metadata(first, exp1_responses.key)["requests_made"] == 9  # 3 trials × 3 turns
    csv = tmp_path / "data" / "csv" / "gemma3-270m_study1_raw_responses.csv"
    before = pd.read_csv(csv)
    started_log = (tmp_path / "logs" / f"grace-serve-gemma3-270m-{os.getpid()}.log").read_bytes()

    second = pipeline.run(instance, res, exp1_responses.key, "gemma3-270m", "study1")
    meta = pipeline.metadata(second, exp1_responses.key)
    assert second.success
    assert meta["requests_made"] == 0 and meta["cache_hits"] == 3
    log = tmp_path / "logs" / f"grace-serve-gemma3-270m-{os.getpid()}.log"
    assert log.read_bytes() == started_log, "no server was even started (a starting server writes to its log)"
    pd.testing.assert_frame_equal(pd.read_csv(csv), before)
    turns = {f"{kind}_{turn}" for kind in ("response", "finish_reason") for turn in ("prior", "bets", "knowledge")}
    assert {"story_setup", "speech", "access", "seed", *turns} <= set(before.columns)


def _table(**columns) -> pd.DataFrame:
    return pd.DataFrame(columns)


def test_checks_flag_missing_duplicate_empty_and_truncated_answers():
    trials = pd.DataFrame({"trial_id": ["a", "b", "c"]})
    check = CheckContext(trials, ExperimentSettings(max_tokens=16), STUDIES["study1"])
    good = _table(
        trial_id=["a", "b", "c"],
        sample=[0] * 3,
        response_prior=["1", "2", "3"],
        finish_reason_prior=["stop"] * 3,
        response_bets=["x", "y", "z"],
        finish_reason_bets=["stop"] * 3,
        completion_tokens=[1] * 3,
    )
    assert every_trial_answered(good, check).passed
    assert responses_non_empty(good, check).passed
    assert answers_not_truncated(good, check).passed

    missing = good[good.trial_id != "b"]
    outcome = every_trial_answered(missing, check)
    assert not outcome.passed and outcome.metadata["missing"] == 1
    duplicated = pd.concat([good, good[good.trial_id == "a"]])
    assert every_trial_answered(duplicated, check).metadata["duplicated"] == 1
    second_turn_unanswered = good.assign(finish_reason_bets=["stop", None, "stop"], response_bets=["x", None, "z"])
    assert every_trial_answered(second_turn_unanswered, check).metadata["missing"] == 1

    empty = good.assign(response_bets=["x", "  ", "z"])
    outcome = responses_non_empty(empty, check)
    assert not outcome.passed and outcome.metadata["empty_responses"] == 1
    assert list(outcome.worst.trial_id) == ["b"]

    truncated = good.assign(
        finish_reason_prior=["stop", "length", "stop"], finish_reason_bets=["stop", "stop", "length"]
    )
    outcome = answers_not_truncated(truncated, check)
    assert not outcome.passed and outcome.metadata["truncated"] == 2 and outcome.metadata["truncated_rate"] == 0.6667


@pytest.mark.slow
def test_study1_conversation_resumes_at_the_turn_it_was_on(tmp_path, servers):
    """Each turn is asked after the model's answer to the turn before (its prompt grows by that answer), and each
    finished turn is checkpointed: with the last turns of a conversation lost, a rerun asks only those."""
    instance = DagsterInstance.ephemeral()
    res = pipeline.resources(tmp_path, trial_limit=2, max_tokens=16, base_urls={MODEL: servers(MODEL).base_url})
    pipeline.prepare(instance, res, [MODEL], studies=("study1",))
    first = pipeline.run(instance, res, exp1_responses.key, MODEL, "study1")
    assert first.success and pipeline.metadata(first, exp1_responses.key)["requests_made"] == 6  # 2 trials × 3 turns
    checkpoint = tmp_path / "data" / "checkpoints" / "exp1" / MODEL / "study1.jsonl"
    records = pipeline.checkpoint_records(checkpoint)
    conversations = [r for r in records if "turns" in r]
    assert len(conversations) == 2 and all(len(r["turns"]) == 3 for r in conversations)
    for conversation in conversations:
        prompt_tokens = [turn["prompt_tokens"] for turn in conversation["turns"]]
        assert prompt_tokens[1] > prompt_tokens[0], "the bets turn is asked with the prior turn and its answer"

    # Lose the first trial's whole record and its last two turns, as a run killed after its first turn would.
    lost = conversations[0]["key"]
    kept = [r for r in records if r["key"] not in (lost, f"{lost}/turn1", f"{lost}/turn2")]
    checkpoint.write_text("".join(json.dumps(r) + "\n" for r in kept))
    second = pipeline.run(instance, res, exp1_responses.key, MODEL, "study1")
    meta = pipeline.metadata(second, exp1_responses.key)
    assert second.success and meta["requests_made"] == 2 and meta["cache_hits"] == 1
    table = pd.read_parquet(tmp_path / "data" / "exp1" / "responses" / MODEL / "study1.parquet")
    assert len(table) == 2 and table[["response_prior", "response_bets", "response_knowledge"]].notna().all().all()
    redone = [r for r in pipeline.checkpoint_records(checkpoint) if r["key"] == lost]
    assert redone[0]["turns"][0] == conversations[0]["turns"][0], "the kept first turn was reused, not asked again"
