"""What every study provides. The assets only use this interface, so a third study is a new module, not new code
paths in the assets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from grace_dagster.studies.inputs import Column, read_study_csv

DATA_DIR = Path(__file__).with_name("data")
ID_COLUMN = "trial_id"


@dataclass(frozen=True)
class Study:
    name: str  # partition key and file-name stem, e.g. "study1"
    title: str
    citation: str
    columns: tuple[Column, ...]
    full_size: int  # trials in the research group's full input

    @property
    def sample_path(self) -> Path:
        return DATA_DIR / f"{self.name}.csv"

    @property
    def text_columns(self) -> list[str]:
        """The Grace columns: the ones the research group's files must have."""
        return [c.name for c in self.columns if c.required]

    @property
    def factor_columns(self) -> list[str]:
        return [c.name for c in self.columns if not c.required]

    def load(self, path: Path | None = None) -> pd.DataFrame:
        """Read and validate an input file (default: the shipped sample); raises InputError."""
        return read_study_csv(path or self.sample_path, self.columns, ID_COLUMN, id_prefix=self.name)
