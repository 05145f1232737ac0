"""Human review of structured answers: the queue a researcher reads, and the readings they hand back.

A machine reading is a proposal; a person's reading is data. Each structured partition writes a queue of the rows
that need a person (failed extractions, every judge-decided row, the parser-read rows sampled for the judge audit)
as a CSV that opens in a spreadsheet and in R. The researcher fills in the reading columns (the research group's
schema names), their name in `reviewer`, and saves the file, or any subset of its rows, as the partition's reviewed
file. A row counts as reviewed when `reviewer` is filled: with the reading columns filled it is the person's
answer; with them all empty it says the reply gives no answer.

The reviewed file is checked whole before anything is written (every problem with its row, line and column): a
value outside the schema, a trial that is not in the partition, two readings for one row, or a reply that differs
from the one the model gave (a reading is only data about the reply it read).
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from grace_dagster.llm.extraction import validate
from grace_dagster.studies.base import ID_COLUMN, Study
from grace_dagster.studies.inputs import InputError, Problem, decode_csv

REVIEWER, NOTE = "reviewer", "note"
ROW = [ID_COLUMN, "sample"]
# Why a row is in the queue.
FAILED, JUDGE_DECIDED, JUDGE_AUDIT = "failed extraction", "decided by the judge", "parser reading audited by the judge"


@dataclass(frozen=True)
class HumanReading:
    values: dict | None  # the answer in the schema's field names; None: the reviewer found no answer in the reply
    reviewer: str
    note: str


@dataclass(frozen=True)
class Review:
    """The readings of a partition's reviewed file, by (trial id, sample)."""

    readings: dict[tuple[str, int], HumanReading]
    sha256: str | None  # of the reviewed file; None when there is none

    @property
    def reviewers(self) -> list[str]:
        return sorted({reading.reviewer for reading in self.readings.values()})


NO_REVIEW = Review({}, None)


def reading_columns(study: Study) -> dict[str, str]:
    """The answer schema's fields and the research group's column name for each, in the schema's order."""
    return {field: study.csv_names.get(field, field) for field in study.answer.model_fields}


def format_reading(study: Study, values: dict | None) -> str:
    """A reading in the group's names, for a person: "Prior_A=2; 0=10; ...". Empty when there is none."""
    if not values:
        return ""
    return "; ".join(f"{name}={values.get(field)}" for field, name in reading_columns(study).items())


def queue(
    study: Study, structured: pd.DataFrame, prompts: dict[tuple[str, int], list[str]], review: Review
) -> pd.DataFrame:
    """The rows that need a person, with what they need to decide: the trial's factors, each turn's question and
    verbatim reply, the machine's reading with its method and reason, and the reading columns to fill (prefilled
    where the reviewed file already has a reading, so the queue is also the working copy)."""
    why = _why(structured)
    rows = structured[why.notna()]
    columns = reading_columns(study)
    factors = [c for c in study.factor_columns if c in rows]
    out = []
    for row, reason in zip(rows.itertuples(index=False), why[why.notna()]):
        row_id = (getattr(row, ID_COLUMN), int(row.sample))
        record = {ID_COLUMN: row_id[0], "sample": row_id[1], "why_review": reason}
        record |= {factor: getattr(row, factor) for factor in factors}
        for turn, question in zip(study.exp1_turns, prompts[row_id]):
            record[f"question_{turn.key}"] = question
            record[f"response_{turn.key}"] = getattr(row, f"response_{turn.key}")
        machine = {field: _plain(getattr(row, field)) for field in study.answer.model_fields}
        record["machine_method"] = row.machine_extraction
        record["machine_reading"] = format_reading(study, machine if row.machine_extraction != "failed" else None)
        record["machine_reason"] = _plain(row.machine_reason) or ""
        human = review.readings.get(row_id)
        for field, name in columns.items():
            record[name] = (human.values or {}).get(field, "") if human else ""
        record[REVIEWER] = human.reviewer if human else ""
        record[NOTE] = human.note if human else ""
        out.append(record)
    return pd.DataFrame(out, columns=_queue_columns(study, factors))


def _queue_columns(study: Study, factors: list[str]) -> list[str]:
    turns = [f"{kind}_{turn.key}" for turn in study.exp1_turns for kind in ("question", "response")]
    machine = ["machine_method", "machine_reading", "machine_reason"]
    return [*ROW, "why_review", *factors, *turns, *machine, *reading_columns(study).values(), REVIEWER, NOTE]


def _why(structured: pd.DataFrame) -> pd.Series:
    """Why each row needs a person (None: it does not): failed, decided by the judge, or in the judge audit."""
    method = structured["machine_extraction"]
    why = pd.Series(None, index=structured.index, dtype="object")
    why[structured["judge_audit"].notna()] = JUDGE_AUDIT
    why[method == "judge"] = JUDGE_DECIDED
    why[method == "failed"] = FAILED
    return why


def read_reviewed(study: Study, path: Path, responses: pd.DataFrame) -> Review:
    """The readings in a reviewed file, checked against the schema and the partition's replies; InputError with
    every problem otherwise. No file: no readings."""
    if not path.exists():
        return NO_REVIEW
    raw = path.read_bytes()
    rows, lines = _rows(path, raw)
    columns = reading_columns(study)
    turns = [f"response_{turn.key}" for turn in study.exp1_turns]
    header = list(rows[0]) if rows else []
    missing = [c for c in [*ROW, REVIEWER, *columns.values(), *turns] if c not in header]
    if missing:
        raise InputError(
            path, [Problem(0, c, "required column is missing; start from the review queue") for c in missing]
        )
    replies = {
        (getattr(r, ID_COLUMN), int(r.sample)): {t: getattr(r, t) for t in turns}
        for r in responses.itertuples(index=False)
    }
    readings: dict[tuple[str, int], HumanReading] = {}
    first_row: dict[tuple[str, int], int] = {}
    problems: list[Problem] = []
    for number, (row, line) in enumerate(zip(rows, lines), start=1):
        found = _reading(study, row, number, line, replies, first_row)
        if isinstance(found, list):
            problems += found
        elif found is not None:
            row_id, reading = found
            readings[row_id] = reading
            first_row[row_id] = number
    if problems:
        raise InputError(path, problems, what="review file")
    return Review(readings, hashlib.sha256(raw).hexdigest())


def _rows(path: Path, raw: bytes) -> tuple[list[dict[str, str]], list[int]]:
    reader = csv.DictReader(io.StringIO(decode_csv(path, raw), newline=""))
    reader.fieldnames  # noqa: B018 (reads the header, so line numbers count from the first data row)
    rows, lines, line = [], [], reader.line_num
    for row in reader:
        rows.append({(k or "").strip(): (v or "") for k, v in row.items()})
        lines.append(line + 1)
        line = reader.line_num
    return rows, lines


def _reading(study, row, number, line, replies, first_row) -> tuple[tuple[str, int], HumanReading] | list | None:
    """One reviewed row: (its id, the reading), None when not reviewed, or its problems."""
    columns = reading_columns(study)
    given = {field: row[name].strip() for field, name in columns.items() if row[name].strip()}
    reviewer = row[REVIEWER].strip()
    if not reviewer:
        if given:
            return [Problem(number, REVIEWER, "a reading without a reviewer; expected the reviewer's name", line)]
        return None
    trial, sample = row[ID_COLUMN].strip(), row["sample"].strip()
    row_id = (trial, int(sample)) if sample.isdigit() else (trial, -1)
    if row_id not in replies:
        return [Problem(number, ID_COLUMN, f"trial {trial!r} sample {sample!r} is not in this partition", line)]
    if row_id in first_row:
        return [Problem(number, ID_COLUMN, f"a second reading for {trial!r} (first in row {first_row[row_id]})", line)]
    for column, reply in replies[row_id].items():
        if _same_text(row[column]) != _same_text(reply):
            return [
                Problem(
                    number,
                    column,
                    "the reply differs from the one the model gave; expected it unchanged "
                    "(a reading is of the reply as given: copy the row from the review queue)",
                    line,
                )
            ]
    if given and len(given) < len(columns):
        blank = [columns[f] for f in columns if f not in given]
        return [Problem(number, blank[0], f"expected all of {', '.join(columns.values())} filled, or none", line)]
    values = None
    if given:
        values, problem = validate(study.answer, {f: _cell(study, f, v) for f, v in given.items()})
        if problem:
            field = problem.split(":", 1)[0].strip()
            return [
                Problem(number, columns.get(field, None), f"expected a value in the answer schema: {problem}", line)
            ]
    return row_id, HumanReading(values, reviewer, row.get(NOTE, "").strip())


def _cell(study: Study, field: str, text: str):
    """A spreadsheet cell as the schema's type: integers (a spreadsheet may write "2.0"), words in lower case."""
    if study.answer.model_fields[field].annotation is int:
        try:
            number = float(text)
        except ValueError:
            return text
        return int(number) if number.is_integer() else text
    return text.lower().replace("’", "'").replace("was not", "wasn't")


def _same_text(text) -> str:
    """A reply as a spreadsheet may save it again: line endings and surrounding whitespace do not count."""
    return (
        "" if text is None or (isinstance(text, float) and pd.isna(text)) else str(text).replace("\r\n", "\n").strip()
    )


def _plain(value):
    if value is None or value is pd.NA or (isinstance(value, float) and pd.isna(value)):
        return None
    return value.item() if hasattr(value, "item") else value
