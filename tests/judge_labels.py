"""The hand-labelled judge fixture (tests/fixtures/judge_labels.csv): real replies of the local models to one turn
of a trial of the shipped samples, that the parser cannot read, each with the reading a person gave it.

`label` is either "not answered" (the reply gives no answer to the question, or several without choosing) or the
turn's fields as JSON, e.g. {"Prior_A": 2}.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from grace_dagster.studies import STUDIES, Study
from grace_dagster.studies.base import Turn

PATH = Path(__file__).with_name("fixtures") / "judge_labels.csv"
NOT_ANSWERED = "not answered"


@dataclass(frozen=True)
class LabelledReply:
    id: str
    model: str
    study: Study
    trial_id: str
    turn: Turn
    question: str  # the turn's prompt, as the model was asked it
    reply: str
    label: dict | str
    seed: int

    def fields(self, values: dict | None) -> dict | None:
        """A reading's own fields, without computed ones, to compare with the label."""
        return None if values is None else {name: values[name] for name in self.turn.answer.model_fields}


def load_labels(path: Path = PATH) -> list[LabelledReply]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    trials = {name: study.load().set_index("trial_id", drop=False) for name, study in STUDIES.items()}
    labelled = []
    for number, row in enumerate(rows, start=1):
        study = STUDIES[row["study"]]
        turns = [turn.key for turn in study.exp1_turns]
        trial = next(trials[study.name].loc[[row["trial_id"]]].itertuples(index=False))
        question = study.exp1_prompts(trial)[turns.index(row["turn"])]
        label = row["label"] if row["label"] == NOT_ANSWERED else json.loads(row["label"])
        turn = study.exp1_turns[turns.index(row["turn"])]
        labelled.append(
            LabelledReply(row["id"], row["model"], study, row["trial_id"], turn, question, row["reply"], label, number)
        )
    return labelled
