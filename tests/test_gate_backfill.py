"""The structured checks gate the analysis through a real backfill: `dagster dev` (webserver and daemon) on a temporary
instance with the project's dagster.yaml, driven through GraphQL as the UI drives it.

The raw responses are real (the embedded SmolLM2 answered), then replaced: study 1's by answers outside the schema,
as a model that ignores the answer format gives them (a bet of 140, bets summing to 90); study 2's by answers in the
requested format. So one partition fails its blocking checks and the other passes, and the analysis, launched by the
backfill and again later in a run of its own, uses the first and refuses the second.
"""

from __future__ import annotations

import itertools

import pandas as pd
import pytest
from dagster import AssetCheckKey, AssetKey, DagsterEventType, DagsterRunStatus, RunsFilter
from dagster._core.event_api import PartitionKeyFilter

from grace_dagster.assets import exp1_responses
from grace_dagster.assets.structured import exp1_structured
from tests import pipeline
from tests.dagster_dev import DagsterDev, new_home

MODEL = "smollm2-135m"
REPLIES = {  # each trial's replies, by turn
    "study1": [
        {"prior": "2", "bets": "0: 140, 1: 0, 2: 0, 3: 0", "knowledge": "yes"},  # a bet of 140
        {"prior": "1", "bets": "0: 10, 1: 20, 2: 40, 3: 20", "knowledge": "no"},  # bets summing to 90
    ],
    "study2": [{"utterance": "It wasn't bad."}, {"utterance": "It was good."}],  # as asked
}


def _check_result(instance, check: str, partition: str):
    records = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [AssetCheckKey(exp1_structured.key, check)],
        partition_filter=PartitionKeyFilter(key=partition),
    )
    return records[AssetCheckKey(exp1_structured.key, check)].evaluation


def _refusal(instance, run_id: str) -> str:
    (failure,) = instance.all_logs(run_id, of_type=DagsterEventType.STEP_FAILURE)
    return str(failure.dagster_event.step_failure_data.user_failure_data.metadata["partitions"].value)


@pytest.mark.slow
def test_one_partition_passes_and_one_fails_across_runs_and_the_analysis_uses_only_the_first(tmp_path, servers):
    home = new_home(tmp_path / "home")
    data = tmp_path / "data"
    res = pipeline.resources(tmp_path, trial_limit=4, max_tokens=16, base_urls={MODEL: servers(MODEL).base_url})
    with DagsterDev(home, {"GRACE_DATA_DIR": str(data), "GRACE_TRIAL_LIMIT": "4"}, tmp_path / "dagster-dev.log") as dev:
        instance = dev.instance()
        pipeline.prepare(instance, res, [MODEL])
        for study, answers in REPLIES.items():
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
        failed = _check_result(instance, "extraction_rate_at_least_threshold", f"{MODEL}|study1")
        assert not failed.passed and failed.metadata["extraction_rate"].value == 0.0
        assert "the answer is outside the schema" in str(failed.metadata["failure_reasons"].value)
        assert _check_result(instance, "answers_comply_with_schema", f"{MODEL}|study1").passed, "nothing invalid stored"
        passed = _check_result(instance, "extraction_rate_at_least_threshold", f"{MODEL}|study2")
        assert passed.passed and passed.metadata["extraction_rate"].value == 1.0
        table = pd.read_parquet(data / "exp1" / "structured" / MODEL / "study1.parquet")
        reasons = " ".join(table["failure_reason"])
        assert "less than or equal to 100" in reasons and "add up to 90" in reasons

        # The backfill launched the analysis: study 2's read the passing partition, study 1's refused the failing one.
        runs = instance.get_runs(RunsFilter(tags={"dagster/backfill": backfill["id"]}))
        analysis_runs = [r for r in runs if any(k.path[0] == "analysis" for k in r.asset_selection or ())]
        assert analysis_runs, f"the backfill launched no analysis run: {[(r.run_id, r.asset_selection) for r in runs]}"
        study2 = instance.get_latest_materialization_event(AssetKey(["analysis", "study2"]))
        assert study2 is not None and study2.run_id in {r.run_id for r in analysis_runs}
        read = str(study2.asset_materialization.metadata["partitions_read_and_refused"].value)
        (exp1_row,) = [line for line in read.splitlines() if MODEL in line and "exp1" in line]
        assert "| 4 " in exp1_row and "| ok" in exp1_row
        assert instance.get_latest_materialization_event(AssetKey(["analysis", "study1"])) is None
        study1_run = next(r for r in analysis_runs if AssetKey(["analysis", "study1"]) in r.asset_selection)
        assert "refused: extraction_rate_at_least_threshold failed" in _refusal(instance, study1_run.run_id)

        # The gate holds in a later run too: the analysis launched on its own refuses the failed partition again.
        run_id = dev.materialize([["analysis", "study1"]])
        assert instance.get_run_by_id(run_id).status == DagsterRunStatus.FAILURE
        assert instance.get_latest_materialization_event(AssetKey(["analysis", "study1"])) is None
        (exp1_row,) = [line for line in _refusal(instance, run_id).splitlines() if MODEL in line and "exp1" in line]
        assert "refused: extraction_rate_at_least_threshold failed" in exp1_row
