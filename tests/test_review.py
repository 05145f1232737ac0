"""Human review of structured answers: the review queue, readings handed back as data, the judge measured against
people, and bad review files refused before anything is written."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from dagster import AssetKey, DagsterInstance, build_sensor_context, materialize
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContextForTest

from grace_dagster.assets import ALL_ASSETS, ALL_CHECKS, ANALYSIS_ASSETS, EXPERIMENT_ASSETS, review_files
from grace_dagster.assets.checks import CheckContext
from grace_dagster.assets.structured import exp1_structured, judge_agrees_with_people
from grace_dagster.definitions import defs
from grace_dagster.resources import ExperimentSettings
from grace_dagster.studies import STUDIES, InputError
from grace_dagster.studies.review import read_reviewed
from tests import pipeline

MODEL = "smollm2-135m"
STUDY2 = STUDIES["study2"]


def _responses(n: int = 3) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "trial_id": [f"t{i}" for i in range(1, n + 1)],
            "sample": [0] * n,
            "response_utterance": ["I'd say it was okay.", "It wasn't bad.\r\nShe is kind.", "No idea."][:n],
        }
    )


def _reviewed(tmp_path, rows: list[dict]):
    path = tmp_path / "m_study2_reviewed.csv"
    columns = ["trial_id", "sample", "response_utterance", "Was/Wasn't", "Assessment", "reviewer", "note"]
    pd.DataFrame(rows, columns=columns).astype("object").fillna("").to_csv(path, index=False)
    return path


GOOD = {"trial_id": "t1", "sample": 0, "response_utterance": "I'd say it was okay.", "reviewer": "ana"}


def test_readings_come_back_as_data_with_the_file_hash_and_reviewers(tmp_path):
    path = _reviewed(
        tmp_path,
        [
            {**GOOD, "Was/Wasn't": "wasn’t", "Assessment": "Bad"},  # curly apostrophe and capital, as typed
            # The spreadsheet turned the reply's line ending into \n; that is the same reply.
            {**GOOD, "trial_id": "t2", "response_utterance": "It wasn't bad.\nShe is kind.", "reviewer": "ben"},
            {**GOOD, "trial_id": "t3", "response_utterance": "No idea.", "reviewer": ""},  # not reviewed
        ],
    )
    review = read_reviewed(STUDY2, path, _responses())
    assert review.readings[("t1", 0)].values == {
        "polarity": "wasn't",
        "assessment": "bad",
        "utterance": "It wasn't bad",
    }
    assert review.readings[("t2", 0)].values is None, "reviewed with no reading: the reply gives no answer"
    assert ("t3", 0) not in review.readings and review.reviewers == ["ana", "ben"] and len(review.sha256) == 64


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({**GOOD, "Was/Wasn't": "was", "Assessment": "great"}, "row 1, line 2, column 'Assessment': expected a value"),
        ({**GOOD, "trial_id": "t9", "Was/Wasn't": "was", "Assessment": "bad"}, "column 'trial_id': trial 't9'"),
        (
            {**GOOD, "response_utterance": "I'd say it was fine.", "Was/Wasn't": "was", "Assessment": "good"},
            "column 'response_utterance': the reply differs from the one the model gave",
        ),
        ({**GOOD, "Was/Wasn't": "was"}, "column 'Assessment': expected all of Was/Wasn't, Assessment filled, or none"),
        ({**GOOD, "reviewer": "", "Was/Wasn't": "was", "Assessment": "bad"}, "column 'reviewer': a reading without"),
    ],
    ids=["outside-the-schema", "not-in-the-partition", "changed-reply", "half-a-reading", "no-reviewer"],
)
def test_bad_review_input_is_refused_with_file_row_and_column(tmp_path, row, expected):
    path = _reviewed(tmp_path, [row])
    with pytest.raises(InputError) as error:
        read_reviewed(STUDY2, path, _responses())
    assert str(path) in str(error.value) and expected in str(error.value)


def test_two_readings_for_one_row_are_refused(tmp_path):
    reading = {**GOOD, "Was/Wasn't": "was", "Assessment": "good"}
    with pytest.raises(
        InputError, match=r"row 2, line 3, column 'trial_id': a second reading for 't1' \(first in row 1\)"
    ):
        read_reviewed(STUDY2, _reviewed(tmp_path, [reading, reading]), _responses())


def _judged(n_agree: int, n_disagree: int, unreviewed_judge_rows: int) -> pd.DataFrame:
    good = {"polarity": "was", "assessment": "good"}
    rows = []
    for i in range(n_agree + n_disagree):
        rows.append(
            {
                "trial_id": f"r{i}",
                **good,
                "extraction": "human",
                "reviewer": "ana",
                "machine_extraction": "judge",
                "judge_reading": json.dumps(good if i < n_agree else {"polarity": "was", "assessment": "bad"}),
            }
        )
    for i in range(unreviewed_judge_rows):
        rows.append(
            {
                "trial_id": f"u{i}",
                **good,
                "extraction": "judge",
                "reviewer": None,
                "machine_extraction": "judge",
                "judge_reading": json.dumps(good),
            }
        )
    return pd.DataFrame(rows)


def test_a_judge_below_the_threshold_on_reviewed_rows_blocks_while_it_decides_rows_unreviewed():
    settings = ExperimentSettings(min_judge_accuracy=0.9, min_reviewed_for_judge_accuracy=10)
    table = _judged(n_agree=8, n_disagree=2, unreviewed_judge_rows=3)  # 0.8 on 10 reviewed rows
    check = CheckContext(pd.DataFrame(), settings, STUDY2, {"study2": table})
    outcome = judge_agrees_with_people(table, check)
    assert not outcome.passed and outcome.metadata["judge_accuracy_vs_people"] == 0.8
    assert outcome.metadata["compared_rows"] == 10 and outcome.metadata["judge_decided_rows_unreviewed"] == 3
    assert len(outcome.worst) == 2
    all_reviewed = _judged(8, 2, 0)
    assert judge_agrees_with_people(
        all_reviewed, CheckContext(pd.DataFrame(), settings, STUDY2, {"study2": all_reviewed})
    ).passed
    study1 = pd.DataFrame(  # the model's study 1 partition: one reviewed row the judge read wrong
        [
            {
                "trial_id": "s1",
                "Prior_A": 2,
                "Bet_0": 0,
                "Bet_1": 0,
                "Bet_2": 100,
                "Bet_3": 0,
                "Knowledge_A": "no",
                "extraction": "human",
                "reviewer": "ana",
                "machine_extraction": "judge",
                "judge_reading": json.dumps(
                    {"Prior_A": 1, "Bet_0": 0, "Bet_1": 0, "Bet_2": 100, "Bet_3": 0, "Knowledge_A": "no"}
                ),
            }
        ]
    )
    both = CheckContext(pd.DataFrame(), settings, STUDY2, {"study1": study1, "study2": table})
    outcome = judge_agrees_with_people(table, both)
    assert outcome.metadata["model_compared_rows"] == 11 and outcome.metadata[
        "model_judge_accuracy_vs_people"
    ] == round(8 / 11, 4)
    too_few = _judged(4, 2, 3)  # 6 reviewed rows: not yet enough to judge the judge
    assert judge_agrees_with_people(too_few, CheckContext(pd.DataFrame(), settings, STUDY2, {"study2": too_few})).passed


READINGS = {"Was/Wasn't": "wasn't", "Assessment": "bad"}


@pytest.mark.slow
def test_a_failed_partition_passes_with_researchers_readings_and_the_analysis_uses_them(tmp_path, servers):
    """End to end on the real embedded model: the tiny model's study 2 answers fail the extraction gate; a reviewer
    fills in the queue and hands it back; Dagster sees the new file (structured goes stale), the partition is
    rebuilt without asking any model, passes with the human readings, and the analysis reads them. A bad review file
    later is refused and leaves the table as it was."""
    home = tmp_path / "home"
    home.mkdir()
    instance = DagsterInstance.local_temp(tempdir=str(home))
    data = tmp_path / "data"
    res = pipeline.resources(tmp_path, trial_limit=4, max_tokens=24, base_urls={MODEL: servers(MODEL).base_url})
    pipeline.prepare(instance, res, [MODEL], studies=("study2",))
    experiment = [a.key for a in EXPERIMENT_ASSETS["exp1"]]
    first = materialize(
        [*ALL_ASSETS, *ALL_CHECKS],
        selection=experiment,
        partition_key=pipeline.key(MODEL, "study2"),
        resources=res,
        instance=instance,
        raise_on_error=False,
    )
    rate = {e.check_name: e for e in first.get_asset_check_evaluations()}["extraction_rate_at_least_threshold"]
    assert not rate.passed, "the tiny model's replies fail the gate"
    meta = pipeline.metadata(first, exp1_structured.key)
    queue_path = data / "review" / f"{MODEL}_study2_queue.csv"
    queue = pd.read_csv(queue_path, keep_default_na=False)
    structured = pd.read_parquet(data / "exp1" / "structured" / MODEL / "study2.parquet")
    needing = structured[structured.machine_extraction.isin(["failed", "judge"]) | structured.judge_audit.notna()]
    assert meta["review_queue_rows"] == len(queue) == len(needing) > 0
    assert list(queue.columns[-4:]) == ["Was/Wasn't", "Assessment", "reviewer", "note"]
    assert {"why_review", "question_utterance", "response_utterance", "machine_method", "machine_reason"} <= set(queue)

    # The reviewer reads every queued reply (here: all as "It wasn't bad") and saves the file in the review folder.
    queue = queue.assign(**READINGS, reviewer="Zoë")
    queue.to_csv(data / "review" / f"{MODEL}_study2_reviewed.csv", index=False)
    context = build_sensor_context(instance=instance, resources={"storage": res["storage"]})
    observed = review_files(context)
    assert len(observed.asset_events) == 1
    instance.report_runless_asset_event(observed.asset_events[0])
    resolver = CachingStaleStatusResolver(instance, defs.resolve_asset_graph(), LoadingContextForTest(instance))
    assert resolver.get_status(exp1_structured.key, pipeline.key(MODEL, "study2")) == StaleStatus.STALE

    second = materialize(
        [*ALL_ASSETS, *ALL_CHECKS],
        selection=[exp1_structured.key],
        partition_key=pipeline.key(MODEL, "study2"),
        resources=res,
        instance=instance,
    )
    meta = pipeline.metadata(second, exp1_structured.key)
    assert meta["judge_requests_made"] == 0, "every answer came from the checkpoints"
    assert (
        meta["reviewers"] == ["Zoë"] and meta["reviewed_rows"] == len(queue) and len(meta["reviewed_file_sha256"]) == 64
    )
    assert meta["extraction_rate"] == 1.0 and meta["review_queue_unreviewed"] == 0
    checks = {e.check_name: e for e in second.get_asset_check_evaluations()}
    assert checks["extraction_rate_at_least_threshold"].passed and checks["answers_comply_with_schema"].passed
    table = pd.read_parquet(data / "exp1" / "structured" / MODEL / "study2.parquet")
    humans = table[table.extraction == "human"]
    assert len(humans) == len(queue) and set(humans.utterance) == {"It wasn't bad"}

    analysis = [a for a in ANALYSIS_ASSETS if a.key == AssetKey(["analysis", "study2"])]
    assert materialize(
        [*ALL_ASSETS, *ALL_CHECKS], selection=[a.key for a in analysis], resources=res, instance=instance
    ).success
    rows = pd.read_parquet(data / "analysis" / "study2.parquet")
    assert (rows.loc[rows.exp1_extraction == "human", "exp1_utterance"] == "It wasn't bad").sum() == len(queue)

    # A bad review file is refused before anything is written: the table stays as it was.
    before = (data / "exp1" / "structured" / MODEL / "study2.parquet").read_bytes()
    queue.assign(Assessment="great").to_csv(data / "review" / f"{MODEL}_study2_reviewed.csv", index=False)
    third = materialize(
        [*ALL_ASSETS, *ALL_CHECKS],
        selection=[exp1_structured.key],
        partition_key=pipeline.key(MODEL, "study2"),
        resources=res,
        instance=instance,
        raise_on_error=False,
    )
    assert not third.success
    (failure,) = [e for e in third.all_events if e.is_step_failure]
    error = failure.step_failure_data.error
    assert "column 'Assessment': expected a value in the answer schema" in (error.cause or error).message
    assert (data / "exp1" / "structured" / MODEL / "study2.parquet").read_bytes() == before
