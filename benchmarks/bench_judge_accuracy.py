"""The judge's accuracy on hand-labelled replies, through the pipeline's own review path.

The fixture (tests/fixtures/judge_labels.csv) holds real replies of the local models that the parser cannot read
(rambling, partial, refusals), each with the reading a person gave it. Each becomes a trial of its study (its other
turns, for study 1, get replies in the requested format); `exp1/structured` runs with the judge; the person's
readings are handed back as the partition's reviewed file; `exp1/structured` runs again and its check
`judge_agrees_with_people` measures the judge against them.

Reported: how many rows the judge decided and how often that answer is the person's (issue "measurements"), how
often it said "not answered" where the person found no answer, and the check's accuracy against people.

    .venv/bin/python -m benchmarks.bench_judge_accuracy                 # the default judge (settings.judge_model)
    .venv/bin/python -m benchmarks.bench_judge_accuracy --judge smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
from dagster import DagsterInstance, materialize

from benchmarks.common import machine
from grace_dagster.assets import ALL_ASSETS, ALL_CHECKS, exp1_responses, exp1_structured
from grace_dagster.resources import ExperimentSettings, LLMEndpoints, Storage
from grace_dagster.studies import STUDIES
from grace_dagster.studies.review import REVIEWER, reading_columns
from tests import pipeline
from tests.judge_labels import NOT_ANSWERED, load_labels

RESULTS = Path(__file__).with_name("results") / "judge_accuracy.json"
PARTITION_MODEL = "smollm2-135m"  # the partition the fixture's trials are filed under (no model answers them)
IN_FORMAT = {  # the other turns of a study 1 trial, replied in the requested format, and their readings
    "prior": ("2", {"Prior_A": 2}),
    "bets": ("0: 10, 1: 20, 2: 50, 3: 20", {"Bet_0": 10, "Bet_1": 20, "Bet_2": 50, "Bet_3": 20}),
    "knowledge": ("No.", {"Knowledge_A": "no"}),
}


def _inputs(directory: Path, labels: list) -> None:
    """One trial per labelled reply: its sample trial's row under the label's id."""
    for name, study in STUDIES.items():
        sample = pd.read_csv(study.sample_path).set_index("trial_id", drop=False)
        rows = [sample.loc[row.trial_id].copy() for row in labels if row.study is study]
        ids = [row.id for row in labels if row.study is study]
        pd.DataFrame(rows).assign(trial_id=ids).to_csv(directory / f"{name}.csv", index=False)


def _replies(responses: pd.DataFrame, labels: list) -> pd.DataFrame:
    by_id = {row.id: row for row in labels}
    for index, trial in responses.iterrows():
        row = by_id[trial.trial_id]
        for turn in row.study.exp1_turns:
            reply = row.reply if turn is row.turn else IN_FORMAT[turn.key][0]
            responses.loc[index, [f"response_{turn.key}", f"finish_reason_{turn.key}"]] = [reply, "stop"]
    return responses


def _person(row) -> dict | None:
    """The person's reading of the whole trial: the label for the labelled turn, the format's for the others."""
    if row.label == NOT_ANSWERED:
        return None
    reading = dict(row.label)
    for turn in row.study.exp1_turns:
        if turn is not row.turn:
            reading |= IN_FORMAT[turn.key][1]
    return reading


def run(judge: str, data: Path, labels: list) -> dict:
    inputs = data / "inputs"
    inputs.mkdir(parents=True)
    _inputs(inputs, labels)
    res = {
        "storage": Storage(data_dir=str(data), input_dir=str(inputs)),
        "llm": LLMEndpoints(log_dir=str(data / "logs")),
        "settings": ExperimentSettings(trial_limit=None, max_tokens=1, judge_model=judge, judge_audit_size=0),
    }
    instance = DagsterInstance.ephemeral()
    pipeline.prepare(instance, res, [PARTITION_MODEL])
    by_id = {row.id: row for row in labels}
    judge_decided, right, abstained, abstained_right, compared, agreeing = 0, 0, 0, 0, 0, 0.0
    for name, study in STUDIES.items():
        key = pipeline.key(PARTITION_MODEL, name)
        assert materialize(
            [*ALL_ASSETS, *ALL_CHECKS],
            selection=[exp1_responses.key],
            partition_key=key,
            resources=res,
            instance=instance,
        ).success
        path = data / "exp1" / "responses" / PARTITION_MODEL / f"{name}.parquet"
        _replies(pd.read_parquet(path), labels).to_parquet(path, index=False)
        materialize(
            [*ALL_ASSETS, *ALL_CHECKS],
            selection=[exp1_structured.key],
            partition_key=key,
            resources=res,
            instance=instance,
            raise_on_error=False,
        )
        table = pd.read_parquet(data / "exp1" / "structured" / PARTITION_MODEL / f"{name}.parquet")
        for trial in table.itertuples(index=False):
            person = _person(by_id[trial.trial_id])
            if trial.machine_extraction == "judge":
                judge_decided += 1
                right += person is not None and json.loads(trial.judge_reading) == person
            elif trial.judge_reading == NOT_ANSWERED:
                abstained += 1
                abstained_right += person is None
        queue = pd.read_csv(data / "review" / f"{PARTITION_MODEL}_{name}_queue.csv", keep_default_na=False)
        columns = reading_columns(study)
        for index, trial in queue.iterrows():
            person = _person(by_id[trial.trial_id]) or {}
            for field, column in columns.items():
                queue.loc[index, column] = str(person.get(field, ""))
        queue[REVIEWER] = "fixture"
        queue.to_csv(data / "review" / f"{PARTITION_MODEL}_{name}_reviewed.csv", index=False)
        second = materialize(
            [*ALL_ASSETS, *ALL_CHECKS],
            selection=[exp1_structured.key],
            partition_key=key,
            resources=res,
            instance=instance,
            raise_on_error=False,
        )
        (check,) = [e for e in second.get_asset_check_evaluations() if e.check_name == "judge_agrees_with_people"]
        compared += check.metadata["compared_rows"].value
        accuracy = check.metadata["judge_accuracy_vs_people"].value
        agreeing += accuracy * check.metadata["compared_rows"].value if isinstance(accuracy, float) else 0
    unanswerable = sum(row.label == NOT_ANSWERED for row in labels)
    return {
        "rows": len(labels),
        "labelled_answered": len(labels) - unanswerable,
        "labelled_not_answered": unanswerable,
        "judge_decided": judge_decided,
        "judge_decided_correctly": int(right),
        "accuracy_on_decided_rows": round(right / judge_decided, 3) if judge_decided else None,
        "judge_said_not_answered": abstained,
        "said_not_answered_where_the_person_found_no_answer": int(abstained_right),
        "reviewed_rows_compared_by_the_check": compared,
        "judge_accuracy_vs_people_by_the_check": round(agreeing / compared, 3) if compared else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judge", default=ExperimentSettings().judge_model, help="registry slug of the judge")
    args = parser.parse_args()
    labels = load_labels()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as data:
        figures = run(args.judge, Path(data), labels)
    result = {
        "judge": args.judge,
        "machine": machine(),
        "command": "python -m benchmarks.bench_judge_accuracy",
        "seconds": round(time.perf_counter() - start, 1),
        **figures,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
