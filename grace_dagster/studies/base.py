"""What every study provides. The assets only use this interface, so a third study is a new module, not new code
paths in the assets."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel

from grace_dagster.studies.inputs import Column, RowCheck, read_study_csv

DATA_DIR = Path(__file__).with_name("data")
ID_COLUMN = "trial_id"

Trial = Any  # one row of the trials table, as given by DataFrame.itertuples()
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Question:
    """One Experiment 2 question: a conversation and the closed set of answers whose probabilities are read."""

    key: str  # column stem in the outputs, e.g. "state2", "knowledge", "utterance"
    messages: Messages
    options: tuple[str, ...]  # the answers, in their canonical form; each is scored with its surface variants
    values: tuple[float, ...] | None = None  # numeric meaning of each option, for mean and sd
    sums: dict[str, tuple[int, ...]] = field(default_factory=dict)  # named sums of option probabilities

    @property
    def variants(self) -> tuple[tuple[str, ...], ...]:
        """Each option's surface forms, scored in the same request and merged per option."""
        return tuple(surface_variants(option) for option in self.options)

    @property
    def forms(self) -> tuple[str, ...]:
        """Every surface form of every option, option by option: what one scoring request scores."""
        return tuple(form for forms in self.variants for form in forms)


def surface_variants(option: str) -> tuple[str, ...]:
    """The forms in which a model may give an answer: as written, with its first letter in the other case, and each
    with a final period ("yes", "Yes", "yes.", "Yes."). They are distinct whole replies (the scorer closes each with
    the end of the turn), so their probabilities add up to the answer's."""
    cases = [option, option[:1].upper() + option[1:], option[:1].lower() + option[1:]]
    forms = [form for case in cases for form in (case, case + ".")]
    return tuple(dict.fromkeys(forms))


@dataclass(frozen=True)
class Turn:
    """One question of Experiment 1's conversation, asked after the model's answers to the turns before it.

    Each turn asks for one thing in a short format: `answer` holds the fields it fills (a part of the study's answer
    schema), `parse` reads a reply that gives them unambiguously (None otherwise: the judge reads it), and `task`
    tells the judge what the participant was asked.
    """

    key: str  # names the raw table's response_{key} and finish_reason_{key} columns
    answer: type[BaseModel]
    parse: Callable[[str], dict | None]
    task: str


@dataclass(frozen=True)
class Study:
    name: str  # partition key and file-name stem, e.g. "study1"
    title: str
    citation: str
    columns: tuple[Column, ...]
    full_size: int  # trials in the research group's full input
    # Experiment 1: a conversation of turns, each a user message (`exp1_prompts`, one per turn) answered by the
    # model before the next is shown; `answer` is the whole answer schema (the structured table's columns).
    exp1_turns: tuple[Turn, ...]
    exp1_prompts: Callable[[Trial], list[str]]
    answer: type[BaseModel]
    # The research group's names for the structured columns (R reads them with check.names = FALSE), in their order.
    csv_names: dict[str, str]
    # Experiment 2: the questions whose answer distributions are read from log-probabilities.
    exp2_questions: Callable[[Trial], list[Question]]
    # Analysis over all models: the analysis-ready table, the comparison with the published human results, plots.
    analyze: Callable[[AnalysisInput], Analysis]
    # Checks across a row's columns (e.g. a scenario that states another true state than the State column).
    row_checks: tuple[RowCheck, ...] = ()
    # The column naming a trial's item (the story, the scenario): the analysis resamples items, not trials or
    # samples, for its intervals, since repeated answers to one item are not independent evidence. Trials stand in
    # for items when an input lacks the column.
    item_column: str | None = None

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

    @property
    def answer_dtypes(self) -> dict[str, str]:
        """The answer schema's fields (computed ones too) as table columns: integers stay integers in R."""
        schema = self.answer
        fields = {name: "Int64" if f.annotation is int else "string" for name, f in schema.model_fields.items()}
        return fields | {name: "string" for name in schema.model_computed_fields}

    @property
    def factor_dtypes(self) -> dict[str, str]:
        return {c.name: c.dtype for c in self.columns if not c.prose}

    def load(self, path: Path | None = None) -> pd.DataFrame:
        """Read and validate an input file (default: the shipped sample); raises InputError."""
        return read_study_csv(path or self.sample_path, self.columns, ID_COLUMN, self.name, self.row_checks)


@dataclass(frozen=True)
class Sampling:
    """How a model's Experiment 1 answers were sampled (from its raw responses' materialization)."""

    temperature: float
    samples_per_trial: int


@dataclass(frozen=True)
class AnalysisInput:
    """The partitions that passed their gates, by model: Experiment 1 structured answers, Experiment 2 wide tables,
    and how each model's Experiment 1 answers were sampled (unknown for a model missing from `exp1_sampling`)."""

    study: Study
    exp1: dict[str, pd.DataFrame]
    exp2: dict[str, pd.DataFrame]
    exp1_sampling: dict[str, Sampling] = field(default_factory=dict)


@dataclass
class Analysis:
    table: pd.DataFrame  # one row per model × trial × sample, for R
    comparisons: dict[str, pd.DataFrame]  # name -> table comparing models with the human results
    figures: dict[str, bytes]  # name -> PNG
    metadata: dict[str, Any] = field(default_factory=dict)  # headline numbers


def option_slug(option: str) -> str:
    """An answer option as part of a column name: "It wasn't bad" -> "it_wasn_t_bad", "40%" -> "40"."""
    return re.sub(r"[^a-z0-9]+", "_", option.lower()).strip("_")


def user(text: str) -> Messages:
    return [{"role": "user", "content": text}]


def value(trial: Trial, column: str, default: str) -> str:
    """A trial's optional column, or `default` where the input file does not have it (or the cell is empty)."""
    found = getattr(trial, column, None)
    return default if found is None or pd.isna(found) else str(found)
