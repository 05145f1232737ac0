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
from grace_dagster.assets.exp1 import answers_not_truncated, every_trial_answered, responses_non_empty, seeded_runs
from grace_dagster.resources import ExperimentSettings
from grace_dagster.studies import STUDIES
from tests import pipeline

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"


def _trial_records(path: Path) -> list[dict]:
    """The finished trials in a checkpoint (all their samples' conversations); the other lines are single turns."""
    return [record for record in pipeline.checkpoint_records(path) if "conversations" in record]


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
    ready = lambda: len(_trial_records(checkpoint)) >= 2  # noqa: E731
    pipeline.kill_part_way(home, tmp_path / "data", "exp1/responses", "smollm2-135m|study2", config, ready)
    answered_before = {r["trial_id"] for r in _trial_records(checkpoint)}
    assert 2 <= len(answered_before) < 8, "the run was killed part-way"

    result = pipeline.run(instance, res, exp1_responses.key, "smollm2-135m", "study2")
    assert result.success
    meta = pipeline.metadata(result, exp1_responses.key)
    assert meta["cache_hits"] == len(answered_before)
    assert meta["requests_made"] == 8 - len(answered_before), "no request for a trial already answered"
    records = _trial_records(checkpoint)
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


def test_a_missing_sample_is_reported_with_its_trial_and_number():
    trials = pd.DataFrame({"trial_id": ["a", "b"]})
    check = CheckContext(trials, ExperimentSettings(samples_per_trial=2), STUDIES["study2"])
    table = _table(
        trial_id=["a", "a", "b"],
        sample=[0, 1, 0],
        response_utterance=["It was good."] * 3,
        finish_reason_utterance=["stop"] * 3,
    )
    outcome = every_trial_answered(table, check)
    assert not outcome.passed and outcome.metadata["expected_conversations"] == 4
    assert outcome.metadata["missing"] == 1 and outcome.metadata["examples"].value == ["b sample 1"]
    extra = pd.concat(
        [
            table,
            _table(
                trial_id=["b", "b"], sample=[1, 2], response_utterance=["x"] * 2, finish_reason_utterance=["stop"] * 2
            ),
        ]
    )
    outcome = every_trial_answered(extra, check)
    assert not outcome.passed and outcome.metadata["unexpected"] == 1 and outcome.metadata["missing"] == 0


def test_samples_whose_seeds_follow_one_another_share_a_request():
    assert seeded_runs([0, 1, 2, 4, 5], lambda sample: 10 + sample) == [[0, 1, 2], [4, 5]]
    # Seeds wrap at 2**31: the server would seed the third answer of one request with 2**31, not 0.
    assert seeded_runs([0, 1, 2, 3], lambda sample: (2**31 - 2 + sample) % 2**31) == [[0, 1], [2, 3]]
    assert seeded_runs([], lambda sample: sample) == []


def _responses(tmp_path: Path, study: str) -> pd.DataFrame:
    return pd.read_parquet(tmp_path / "data" / "exp1" / "responses" / MODEL / f"{study}.parquet")


@pytest.mark.slow
def test_samples_are_asked_together_reproducible_alone_and_only_the_missing_ones_are_asked(tmp_path, servers):
    """Study 2 (one turn): a trial's samples are one request with `n`; raising samples_per_trial asks only the new
    samples; a lost sample is asked alone (n=1, the trial's seed + i) and comes back word for word the same."""
    instance = DagsterInstance.ephemeral()
    base_urls = {MODEL: servers(MODEL).base_url}
    res = pipeline.resources(tmp_path, trial_limit=2, max_tokens=16, base_urls=base_urls)
    res["settings"] = ExperimentSettings(trial_limit=2, max_tokens=16, samples_per_trial=3)
    pipeline.prepare(instance, res, [MODEL], studies=("study2",))
    first = pipeline.run(instance, res, exp1_responses.key, MODEL, "study2")
    meta = pipeline.metadata(first, exp1_responses.key)
    assert first.success and meta["requests_made"] == 2 and meta["answers_generated"] == 6  # 2 trials, n=3 each
    three = _responses(tmp_path, "study2")
    assert three[["trial_id", "sample"]].values.tolist() == [[t, s] for t in three.trial_id.unique() for s in range(3)]
    seeds = three.groupby("trial_id")["seed"].apply(lambda seed: (seed - seed.iloc[0]).tolist())
    assert seeds.tolist() == [[0, 1, 2], [0, 1, 2]], "sample i is seeded with the trial's seed + i"
    assert three["completion_tokens"].notna().all() and (three["completion_tokens"] > 0).all()

    res["settings"] = ExperimentSettings(trial_limit=2, max_tokens=16, samples_per_trial=5)
    more = pipeline.run(instance, res, exp1_responses.key, MODEL, "study2")
    meta = pipeline.metadata(more, exp1_responses.key)
    assert more.success and meta["requests_made"] == 2 and meta["answers_generated"] == 4  # samples 3-4: n=2 each
    five = _responses(tmp_path, "study2")
    assert len(five) == 10 and all(
        e.passed for e in more.get_asset_check_evaluations() if e.check_name == "every_trial_answered"
    )
    kept = five[five["sample"] < 3].reset_index(drop=True)
    pd.testing.assert_series_equal(kept["response_utterance"], three["response_utterance"])
    assert five["response_utterance"].nunique() > 1, "samples with different seeds are different draws"

    # Lose sample 1 of the first trial (its turn and its trial's record), as a run killed before recording it.
    checkpoint = tmp_path / "data" / "checkpoints" / "exp1" / MODEL / "study2.jsonl"
    records = pipeline.checkpoint_records(checkpoint)
    first_trial = five["trial_id"].iloc[0]
    (trial_record,) = [
        r for r in _trial_records(checkpoint) if r["trial_id"] == first_trial and len(r["conversations"]) == 5
    ]
    lost = trial_record["conversations"][1]["key"]
    kept_lines = [r for r in records if r["key"] not in (trial_record["key"], f"{lost}/turn0")]
    checkpoint.write_text("".join(json.dumps(r) + "\n" for r in kept_lines))
    again = pipeline.run(instance, res, exp1_responses.key, MODEL, "study2")
    meta = pipeline.metadata(again, exp1_responses.key)
    assert again.success and meta["requests_made"] == 1 and meta["answers_generated"] == 1
    assert meta["cache_hits"] == 1, "the other trial's record was complete"
    pd.testing.assert_frame_equal(_responses(tmp_path, "study2"), five)


@pytest.mark.slow
def test_study1_conversation_resumes_at_the_turn_it_was_on(tmp_path, servers):
    """Each turn is asked after the model's answer to the turn before (its prompt grows by that answer), and each
    finished turn of each sample is checkpointed: the first turn of a trial's samples is one request (`n`), the
    later turns one request per sample; with the last turns of one sample lost, a rerun asks only those."""
    instance = DagsterInstance.ephemeral()
    res = pipeline.resources(tmp_path, trial_limit=2, max_tokens=16, base_urls={MODEL: servers(MODEL).base_url})
    res["settings"] = ExperimentSettings(trial_limit=2, max_tokens=16, samples_per_trial=2)
    pipeline.prepare(instance, res, [MODEL], studies=("study1",))
    first = pipeline.run(instance, res, exp1_responses.key, MODEL, "study1")
    meta = pipeline.metadata(first, exp1_responses.key)
    # 2 trials: one first-turn request each (n=2), then 2 samples × 2 later turns each.
    assert first.success and meta["requests_made"] == 2 + 2 * 2 * 2 and meta["answers_generated"] == 12
    checkpoint = tmp_path / "data" / "checkpoints" / "exp1" / MODEL / "study1.jsonl"
    records = pipeline.checkpoint_records(checkpoint)
    trials = _trial_records(checkpoint)
    assert len(trials) == 2 and all(len(c["turns"]) == 3 for r in trials for c in r["conversations"])
    for conversation in (c for r in trials for c in r["conversations"]):
        prompt_tokens = [turn["prompt_tokens"] for turn in conversation["turns"]]
        assert prompt_tokens[1] > prompt_tokens[0], "the bets turn is asked with the prior turn and its answer"
    before = _responses(tmp_path, "study1")

    # Lose the first trial's record and its second sample's last two turns, as a run killed after that sample's
    # first turn would.
    trial = trials[0]
    lost = trial["conversations"][1]["key"]
    kept = [r for r in records if r["key"] not in (trial["key"], f"{lost}/turn1", f"{lost}/turn2")]
    checkpoint.write_text("".join(json.dumps(r) + "\n" for r in kept))
    second = pipeline.run(instance, res, exp1_responses.key, MODEL, "study1")
    meta = pipeline.metadata(second, exp1_responses.key)
    assert second.success and meta["requests_made"] == 2 and meta["cache_hits"] == 1
    after = _responses(tmp_path, "study1")
    assert len(after) == 4 and after[["response_prior", "response_bets", "response_knowledge"]].notna().all().all()
    (redone,) = [r for r in _trial_records(checkpoint) if r["key"] == trial["key"]]
    assert redone["conversations"][1]["turns"][0] == trial["conversations"][1]["turns"][0], "first turn reused"
    assert redone["conversations"][0] == trial["conversations"][0], "the intact sample was not asked again"
    pd.testing.assert_frame_equal(after, before)  # the lost turns, asked again with their seeds, came back the same
