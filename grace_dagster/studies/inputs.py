"""Reading and validating a study's input CSV.

A study declares its columns (`Column`); this module turns a file into a typed table or into one `InputError` that
lists every problem with its file, row, column and what was expected. Nothing downstream ever sees a bad file, so
no model is asked anything and no earlier output is overwritten.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

MAX_PROBLEMS_LISTED = 25


@dataclass(frozen=True)
class Problem:
    row: int | None  # 1-based data row (the header is row 0); None for the whole file
    column: str | None
    message: str
    line: int | None = None  # 1-based line in the file, for editors

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append("header" if self.row == 0 else f"row {self.row}")
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.column is not None:
            where.append(f"column {self.column!r}")
        return f"{', '.join(where)}: {self.message}" if where else self.message


class InputError(ValueError):
    """A study input file is unusable. Carries every problem found, each with row and column."""

    def __init__(self, path: Path, problems: list[Problem], what: str = "study input"):
        self.path = path
        self.problems = problems
        shown = "\n".join(f"  {p}" for p in problems[:MAX_PROBLEMS_LISTED])
        more = len(problems) - MAX_PROBLEMS_LISTED
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(
            f"{path}: {len(problems)} problem(s) in the {what}; fix the file and rerun "
            f"(nothing was written and no model was asked):\n{shown}{tail}"
        )


@dataclass(frozen=True)
class Column:
    """One column a study knows about.

    `parse` turns the cell text into a value or raises ValueError whose text says what was expected.
    A `required` column must be in the file; an optional one is `derive`d from the row's other cells (and its trial
    id, given or made from the row's position) when absent
    (returning None when the row does not say), so the research group's files with only the Grace columns load.
    """

    name: str
    parse: Callable[[str], Any]
    dtype: str
    required: bool = False
    derive: Callable[[dict[str, str]], Any] | None = None
    prose: bool = False  # vignette text for the prompts, as opposed to a design factor the analysis groups by


# A check over one row's parsed values: None, or (the column to blame, what is wrong and what was expected).
RowCheck = Callable[[dict[str, Any]], tuple[str, str] | None]


def text(value: str) -> str:
    stripped = value.strip()
    if not stripped:
        raise ValueError("expected non-empty text; the cell is blank")
    return stripped


def int_in_range(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value.strip())
        except ValueError:
            raise ValueError(f"expected a whole number from {low} to {high}; got {value!r}") from None
        if not low <= number <= high:
            raise ValueError(f"expected a whole number from {low} to {high}; got {number}")
        return number

    return parse


def one_of(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        normalized = value.strip().lower()
        if normalized not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}; got {value!r}")
        return normalized

    return parse


def decode_csv(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # Locate the bad byte as row and column so the user can find it in a spreadsheet.
        before = raw[: e.start].decode("utf-8", errors="replace")
        line = before.count("\n") + 1
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8", errors="replace"))))
        header = rows[0] if rows else []
        problem = Problem(None, None, f"byte 0x{raw[e.start]:02x} at offset {e.start} is not UTF-8", line=line)
        for row_number, row in enumerate(rows):
            for col, cell in enumerate(row):
                if "\ufffd" in cell:
                    column = header[col] if col < len(header) else f"#{col + 1}"
                    problem = Problem(
                        row_number,
                        column,
                        f"expected UTF-8 text; byte 0x{raw[e.start]:02x} at offset {e.start} is not UTF-8 "
                        "(re-save the file as UTF-8)",
                        line=line,
                    )
                    raise InputError(path, [problem]) from None
        raise InputError(path, [problem]) from None


def edit_distance(a: str, b: str) -> int:
    """Edits (insert, delete, replace, or swap two neighbouring characters) that turn `a` into `b`."""
    d = [[i + j if i == 0 or j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def closest_name(name: str, candidates: list[str]) -> str | None:
    """The candidate that `name` most likely misspells: equal ignoring case, or one letter off (a typo or two letters
    swapped) from a name of 5 letters or more. A name that only adds to or cuts a column's name at its end ('items',
    'access2', 'Knowledge') is taken for the group's own column and passes through."""
    folded = name.casefold()
    for candidate in candidates:
        other = candidate.casefold()
        if folded == other:
            return candidate
        if len(other) >= 5 and not (folded.startswith(other) or other.startswith(folded)):
            if edit_distance(folded, other) == 1:
                return candidate
    return None


def read_study_csv(
    path: Path, columns: tuple[Column, ...], id_column: str, id_prefix: str, row_checks: tuple[RowCheck, ...] = ()
) -> pd.DataFrame:
    """Validate the CSV at `path` against `columns` and return it as a typed table.

    The table has the id column first, then every declared column (read or derived), then the file's other
    columns unchanged (they are passed through to the outputs), then `source_row`.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(
            path, [Problem(None, None, "the file does not exist; put the study CSV there or set GRACE_INPUT_DIR")]
        ) from None
    required = [c.name for c in columns if c.required]
    if not raw.strip():
        raise InputError(
            path, [Problem(None, None, f"the file is empty; expected a header row with {', '.join(required)}")]
        )

    reader = csv.reader(io.StringIO(decode_csv(path, raw), newline=""))
    header = [name.strip() for name in next(reader)]
    problems: list[Problem] = []

    # A spreadsheet saved with another delimiter reads as one column; naming each missing column would mislead.
    delimiter = max((";", "\t"), key=lambda d: sum(name.count(d) for name in header))
    if any(delimiter in name for name in header) and (len(header) == 1 or all(name not in header for name in required)):
        shown = "';'" if delimiter == ";" else "tabs"
        raise InputError(
            path,
            [
                Problem(
                    0,
                    None,
                    f"the file appears to use {shown} as the delimiter; expected a comma-separated file "
                    "(save or export it as CSV with commas)",
                )
            ],
        )

    seen_names: set[str] = set()
    for name in header:
        if name in seen_names:
            problems.append(Problem(0, name, "the column name appears twice in the header"))
        seen_names.add(name)
    # Other columns are the research group's and pass through, but one that looks like a column the file lacks is
    # a misspelling: passed through, it would leave that column derived from the text or reported as missing.
    known = [id_column, *(c.name for c in columns)]
    absent = [name for name in known if name not in header]
    misspelt: set[str] = set()
    for name in header:
        if name not in known:
            meant = closest_name(name, absent)
            if meant is not None:
                problems.append(Problem(0, name, f"not a column of this study; did you mean {meant!r}?"))
                misspelt.add(meant)
    for col in columns:
        if col.required and col.name not in header and col.name not in misspelt:
            problems.append(
                Problem(0, col.name, f"required column is missing; the header has {', '.join(header) or 'nothing'}")
            )
    if problems:
        raise InputError(path, problems)

    records: list[dict[str, str]] = []
    lines: list[int] = []
    line = reader.line_num
    for row in reader:
        row_number = len(records) + 1
        if not any(cell.strip() for cell in row):
            line = reader.line_num
            continue  # blank lines at the end of spreadsheet exports are harmless
        if len(row) != len(header):
            problems.append(
                Problem(
                    row_number,
                    None,
                    f"expected {len(header)} fields as in the header; found {len(row)}",
                    line=line + 1,
                )
            )
        records.append(dict(zip(header, row, strict=False)))
        lines.append(line + 1)
        line = reader.line_num
    if not records:
        raise InputError(path, [Problem(None, None, "the file has a header but no rows; expected one row per trial")])

    extra_columns = [name for name in header if name not in known]
    out: dict[str, list[Any]] = {id_column: []}
    out.update({c.name: [] for c in columns})
    out.update({name: [] for name in extra_columns})
    ids_seen: dict[str, int] = {}

    for index, (record, line_number) in enumerate(zip(records, lines, strict=True)):
        row_number = index + 1
        if id_column in header:
            trial_id = record.get(id_column, "").strip()
            if not trial_id:
                problems.append(Problem(row_number, id_column, "expected a trial id; the cell is blank", line_number))
            elif trial_id in ids_seen:
                problems.append(
                    Problem(
                        row_number,
                        id_column,
                        f"duplicate id {trial_id!r} (first used in row {ids_seen[trial_id]}); ids must be unique",
                        line_number,
                    )
                )
            else:
                ids_seen[trial_id] = row_number
        else:
            # Stable for a given file: the position of the row in it.
            trial_id = f"{id_prefix}-{row_number:04d}"
        out[id_column].append(trial_id)

        values: dict[str, Any] = {}
        cell_problems = len(problems)
        for col in columns:
            if col.name in header:
                try:
                    value = col.parse(record.get(col.name, ""))
                except ValueError as e:
                    problems.append(Problem(row_number, col.name, str(e), line_number))
                    value = None
            else:
                value = col.derive({**record, id_column: trial_id}) if col.derive else None
            values[col.name] = value
            out[col.name].append(value)
        if len(problems) == cell_problems:  # a row whose cells are wrong is reported by its cells alone
            for check in row_checks:
                found = check(values)
                if found is not None:
                    problems.append(Problem(row_number, found[0], found[1], line_number))
        for name in extra_columns:
            out[name].append(record.get(name, ""))

    if problems:
        raise InputError(path, problems)

    table = pd.DataFrame(out)
    for col in columns:
        table[col.name] = table[col.name].astype(col.dtype)
    table[id_column] = table[id_column].astype("string")
    table["source_row"] = pd.array(range(1, len(table) + 1), dtype="Int64")
    return table
