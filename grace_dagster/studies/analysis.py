"""What the studies' analyses share: the model × trial table joining both experiments, fit statistics, plots."""

from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI; figures only become PNG bytes

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from grace_dagster.studies.base import ID_COLUMN, AnalysisInput  # noqa: E402

REFERENCE_DIR = Path(__file__).with_name("reference")
EXTRACTION_COLUMN = "extraction"  # parser | judge | human | failed, in the structured table
EXTRACTED = ["parser", "judge", "human"]


def reference_csv(name: str) -> pd.DataFrame:
    return pd.read_csv(REFERENCE_DIR / name)


def reference_json(name: str) -> dict:
    return json.loads((REFERENCE_DIR / name).read_text())


def model_trial_table(inp: AnalysisInput, exp1_columns: list[str], exp2_columns: list[str]) -> pd.DataFrame:
    """One row per model × trial: the design factors, `exp1_*` structured answers, `exp2_*` distribution summaries.

    A model whose partition of one experiment was refused (or never run) keeps its rows with that experiment's
    columns empty, so R sees missing values, never numbers from data that failed its checks.
    """
    factors = [ID_COLUMN, *inp.study.factor_columns]
    frames = []
    for model in sorted(set(inp.exp1) | set(inp.exp2)):
        parts = []
        if model in inp.exp1:
            exp1 = inp.exp1[model]
            parts.append(exp1[[c for c in factors if c in exp1]].join(exp1[exp1_columns].add_prefix("exp1_")))
        if model in inp.exp2:
            exp2 = inp.exp2[model]
            parts.append(exp2[[c for c in factors if c in exp2]].join(exp2[exp2_columns].add_prefix("exp2_")))
        joined = parts[0]
        for part in parts[1:]:
            # Joined on the trial id alone: the factors come from the same validated trials, but optional ones that
            # an input lacks are typed differently by each experiment's table.
            part = part.drop(columns=[c for c in factors if c != ID_COLUMN and c in joined])
            joined = joined.merge(part, on=ID_COLUMN, how="outer", validate="one_to_one")
        joined.insert(0, "model", model)
        frames.append(joined)
    table = pd.concat(frames, ignore_index=True)
    exp1_dtypes = inp.study.answer_dtypes | {EXTRACTION_COLUMN: "string"}
    dtypes = {
        "model": "string",
        ID_COLUMN: "string",
        **{c: t for c, t in inp.study.factor_dtypes.items() if c in table},
        **{f"exp1_{c}": exp1_dtypes[c] for c in exp1_columns},
        **{f"exp2_{c}": "float64" for c in exp2_columns},
    }
    for column, dtype in dtypes.items():
        if column not in table:  # an experiment no model passed: the documented column is still there, empty
            table[column] = pd.Series(index=table.index, dtype=dtype)
    return table.astype(dtypes)


def usable_exp1(table: pd.DataFrame) -> pd.DataFrame:
    """Rows whose Experiment 1 answer was extracted (failed extractions are not answers)."""
    column = f"exp1_{EXTRACTION_COLUMN}"
    return table[table[column].isin(EXTRACTED)] if column in table else table.iloc[0:0]


def fit(model_values: pd.Series, human_values: pd.Series) -> dict[str, float]:
    """Pearson r and RMSE between paired values (NaN where fewer than 3 pairs or no variance)."""
    pairs = pd.DataFrame({"m": model_values, "h": human_values}).dropna()
    rmse = float(np.sqrt(((pairs["m"] - pairs["h"]) ** 2).mean())) if len(pairs) else float("nan")
    r = float("nan")
    if len(pairs) >= 3 and pairs["m"].std() > 0 and pairs["h"].std() > 0:
        r = float(np.corrcoef(pairs["m"], pairs["h"])[0, 1])
    return {"n": len(pairs), "r": r, "rmse": rmse}


def legend(figure: plt.Figure) -> None:
    """One legend for all panels, beside them (a panel may lack some lines)."""
    entries = {}
    for axis in figure.axes:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    figure.legend(entries.values(), entries.keys(), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))


def finish(figure: plt.Figure, ylabel: str, title: str) -> bytes:
    """Label the first panel, add the shared legend and the title, and render the figure as PNG."""
    figure.axes[0].set_ylabel(ylabel)
    legend(figure)
    figure.suptitle(title, fontsize=10, y=1.03)
    return png(figure)


def png(figure: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()
