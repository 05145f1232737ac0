"""What every study provides. The assets only use this interface, so a third study is a new module, not new code
paths in the assets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from grace_dagster.studies.inputs import Column, read_study_csv

DATA_DIR = Path(__file__).with_name("data")
ID_COLUMN = "trial_id"

Trial = Any  # one row of the trials table, as given by DataFrame.itertuples()
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Question:
    """One Experiment 2 question: a conversation and the closed set of answers whose probabilities are read."""

    key: str  # column stem in the outputs, e.g. "state2", "knowledge", "utterance"
    messages: Messages
    options: tuple[str, ...]  # the answers exactly as the model should say them
    values: tuple[float, ...] | None = None  # numeric meaning of each option, for mean and sd
    sums: dict[str, tuple[int, ...]] = field(default_factory=dict)  # named sums of option probabilities


@dataclass(frozen=True)
class Study:
    name: str  # partition key and file-name stem, e.g. "study1"
    title: str
    citation: str
    columns: tuple[Column, ...]
    full_size: int  # trials in the research group's full input
    # Experiment 1: the conversation asking for a free-text answer in the study's answer format.
    exp1_messages: Callable[[Trial], Messages]
    # Experiment 2: the questions whose answer distributions are read from log-probabilities.
    exp2_questions: Callable[[Trial], list[Question]]

    @property
    def sample_path(self) -> Path:
        return DATA_DIR / f"{self.name}.csv"

    @property
    def text_columns(self) -> list[str]:
        """The Grace columns: the ones the research group's files must have."""
        return [c.name for c in self.columns if c.required]

    @property
    def factor_columns(self) -> list[str]:
        """Design factors and ids, the columns analysis tables keep (prose columns stay in the raw responses)."""
        return [c.name for c in self.columns if not c.prose]

    def load(self, path: Path | None = None) -> pd.DataFrame:
        """Read and validate an input file (default: the shipped sample); raises InputError."""
        return read_study_csv(path or self.sample_path, self.columns, ID_COLUMN, id_prefix=self.name)


def user(text: str) -> Messages:
    return [{"role": "user", "content": text}]


def value(trial: Trial, column: str, default: str) -> str:
    """A trial's optional column, or `default` where the input file does not have it (or the cell is empty)."""
    found = getattr(trial, column, None)
    return default if found is None or pd.isna(found) else str(found)
