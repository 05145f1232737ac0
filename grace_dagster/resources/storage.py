"""Where inputs are read from and outputs written to.

Every output is written atomically (temporary file in the same directory, fsync, rename), so a killed run leaves
either the previous good file or the new complete one, never half a table.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from dagster import ConfigurableResource
from pydantic import Field

from grace_dagster.files import atomic_write
from grace_dagster.studies import Study

__all__ = ["Storage", "atomic_write"]


class Storage(ConfigurableResource):
    """The data directory (outputs) and the directory of study inputs."""

    data_dir: str = Field(default="data", description="Root of all outputs (the shared CephFS volume on the NRP).")
    input_dir: str | None = Field(
        default=None,
        description="Directory with study1.csv, study2.csv; default: the sample inputs shipped with the package.",
    )

    def input_path(self, study: Study) -> Path:
        return Path(self.input_dir) / f"{study.name}.csv" if self.input_dir else study.sample_path

    def path(self, *parts: str) -> Path:
        return Path(self.data_dir).joinpath(*parts)

    def write_table(
        self, table: pd.DataFrame, parquet: Path, csv: Path | None = None, csv_names: dict[str, str] | None = None
    ) -> list[Path]:
        """Write the canonical Parquet copy and, for the R scripts, a CSV; both atomically. `csv_names` renames
        columns for R (the research group's names, put first; R reads them with check.names = FALSE)."""
        written = [atomic_write(parquet, lambda tmp: table.to_parquet(tmp, index=False))]
        if csv is not None:
            for_r = table
            if csv_names:
                first = [c for c in csv_names if c in table]
                for_r = table[[*first, *[c for c in table if c not in csv_names]]].rename(columns=csv_names)
            written.append(atomic_write(csv, lambda tmp: for_r.to_csv(tmp, index=False)))
        return written

    def read_table(self, parquet: Path) -> pd.DataFrame:
        if not parquet.exists():
            raise FileNotFoundError(f"{parquet} does not exist: materialize the upstream asset first")
        return pd.read_parquet(parquet)

    def trials_path(self, study: Study) -> Path:
        return self.path("trials", f"{study.name}.parquet")
