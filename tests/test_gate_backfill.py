"""The structured checks gate the analysis through a real backfill: `dagster dev` (webserver and daemon) on a temporary
instance with the project's dagster.yaml, driven through GraphQL as the UI drives it.

The raw responses are real (the embedded SmolLM2 answered), then replaced by answers outside the schema, as a model
that ignores the answer format would give them: a bet of 140, bets summing to 90, an unknown assessment word.
"""

from __future__ import annotations

import itertools

import pandas as pd
import pytest
from dagster import AssetCheckKey, AssetKey, DagsterEventType, DagsterRunStatus
from dagster._core.event_api import PartitionKeyFilter

from grace_dagster.assets import exp1_responses
from grace_dagster.assets.structured import exp1_structured
from tests import pipeline
from tests.dagster_dev import DagsterDev, new_home

MODEL = "smollm2-135m"
OUTSIDE_THE_SCHEMA = {  # each trial's replies, by turn
    "study1": [
        {"prior": "2", "bets": "0: 140, 1: 0, 2: 0, 3: 0", "knowledge": "yes"},  # a bet of 140
        {"prior": "1", "bets": "0: 10, 1: 20, 2: 40, 3: 20", "knowledge": "no"},  # bets summing to 90
    ],
    "study2": [{"utterance": "It was fantastic!"}, {"utterance": "It wasn't superb."}],  # unknown assessment words
}


def _check_result(instance, check: str, partition: str):
    records = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [AssetCheckKey(exp1_structured.key, check)],
        partition_filter=PartitionKeyFilter(key=partition),
    )
    return records[AssetCheckKey(exp1_structured.key, check)].evaluation


@pytest.mark.slow
def test_schema_violations_fail_the_blocking_check_and_the_analysis_does_not_materialize_in_a_backfill(
    tmp_path, servers
):
    home = new_home(tmp_path / "home")
    data = tmp_path / "data"
    res = pipeline.resources(tmp_path, trial_limit=4, max_tokens=16, base_urls={MODEL: servers(MODEL).base_url})
    with DagsterDev(home, {"GRACE_DATA_DIR": str(data), "GRACE_TRIAL_LIMIT": "4"}, tmp_path / "dagster-dev.log") as dev:
        instance = dev.instance()
        pipeline.prepare(instance, res, [MODEL])
        for study, answers in OUTSIDE_THE_SCHEMA.items():
            assert pipeline.run(instance, res, exp1_responses.key, MODEL, study).success
            path = data / "exp1" / "responses" / MODEL / f"{study}.parquet"
            responses = pd.read_parquet(path)
            replies = list(itertools.islice(itertools.cycle(answers), len(responses)))
            for turn in replies[0]:
                responses[f"response_{turn}"] = [reply[turn] for reply in replies]
                responses[f"finish_reason_{turn}"] = "stop"
            responses.to_parquet(path, index=False)

        partitions = [f"{MODEL}|study1", f"{MODEL}|study2"]
        backfill = dev.backfill(partitions, [["exp1", "structured"], ["analysis", "study1"], ["analysis", "study2"]])
        assert backfill["runs"], "the daemon launched the backfill's runs"
        for partition in partitions:
            rate = _check_result(instance, "extraction_rate_at_least_threshold", partition)
            assert rate is not None and not rate.passed, partition
            assert rate.metadata["extraction_rate"].value == 0.0
            assert "the answer is outside the schema" in str(rate.metadata["failure_reasons"].value)
            # Nothing invalid was stored: the violations are failed extractions, each with its reason.
            assert _check_result(instance, "answers_comply_with_schema", partition).passed
        table = pd.read_parquet(data / "exp1" / "structured" / MODEL / "study1.parquet")
        reasons = " ".join(table["failure_reason"])
        assert "less than or equal to 100" in reasons and "add up to 90" in reasons
        for study in ("study1", "study2"):
            assert instance.get_latest_materialization_event(AssetKey(["analysis", study])) is None

        # The gate holds in a later run too: the analysis launched on its own refuses the failed partition.
        run_id = dev.materialize([["analysis", "study1"]])
        assert instance.get_run_by_id(run_id).status == DagsterRunStatus.FAILURE
        assert instance.get_latest_materialization_event(AssetKey(["analysis", "study1"])) is None
        (failure,) = instance.all_logs(run_id, of_type=DagsterEventType.STEP_FAILURE)
        user_failure = failure.dagster_event.step_failure_data.user_failure_data
        refused = str(user_failure.metadata["partitions"].value)
        (exp1_row,) = [line for line in refused.splitlines() if MODEL in line and "exp1" in line]
        assert "refused: extraction_rate_at_least_threshold failed" in exp1_row
