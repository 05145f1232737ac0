"""What the studies' analyses share: the model × trial × sample table joining both experiments, fit statistics,
uncertainty by resampling items, and plots."""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI; figures only become PNG bytes

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from grace_dagster.studies.base import ID_COLUMN, AnalysisInput, Study  # noqa: E402

REFERENCE_DIR = Path(__file__).with_name("reference")
EXTRACTION_COLUMN = "extraction"  # parser | judge | human | failed, in the structured table
EXTRACTED = ["parser", "judge", "human"]
SAMPLE_COLUMN = "sample"
# Experiment 2 reads the model's own next-token distribution: what sampling at temperature 1 would draw from.
EXP2_TEMPERATURE = 1.0


def reference_csv(name: str) -> pd.DataFrame:
    return pd.read_csv(REFERENCE_DIR / name)


def reference_json(name: str) -> dict:
    return json.loads((REFERENCE_DIR / name).read_text())


# --- The analysis table ------------------------------------------------------------------------------------------


def model_trial_table(inp: AnalysisInput, exp1_columns: list[str], exp2_columns: list[str]) -> pd.DataFrame:
    """One row per model × trial × sample: the design factors, the `sample` and its `exp1_*` structured answers,
    and the trial's `exp2_*` distribution summaries. Experiment 2 has one distribution per trial: it repeats on the
    rows of the trial's samples, and a model without Experiment 1 rows has one row per trial with `sample` empty.

    A model whose partition of one experiment was refused (or never run) keeps its rows with that experiment's
    columns empty, so R sees missing values, never numbers from data that failed its checks.
    """
    factors = [ID_COLUMN, *inp.study.factor_columns]
    frames = []
    for model in sorted(set(inp.exp1) | set(inp.exp2)):
        parts = []
        if model in inp.exp1:
            exp1 = inp.exp1[model]
            if SAMPLE_COLUMN not in exp1:  # a structured table from before samples: its one answer per trial
                exp1 = exp1.assign(**{SAMPLE_COLUMN: 0})
            keys = [c for c in factors if c in exp1] + [SAMPLE_COLUMN]
            parts.append(exp1[keys].join(exp1[exp1_columns].add_prefix("exp1_")))
        if model in inp.exp2:
            exp2 = inp.exp2[model]
            parts.append(exp2[[c for c in factors if c in exp2]].join(exp2[exp2_columns].add_prefix("exp2_")))
        joined = parts[0]
        for part in parts[1:]:
            # Joined on the trial id alone: the factors come from the same validated trials, but optional ones that
            # an input lacks are typed differently by each experiment's table.
            part = part.drop(columns=[c for c in factors if c != ID_COLUMN and c in joined])
            joined = joined.merge(part, on=ID_COLUMN, how="outer", validate="many_to_one", sort=False)
        joined.insert(0, "model", model)
        frames.append(joined)
    table = pd.concat(frames, ignore_index=True)
    exp1_dtypes = inp.study.answer_dtypes | {EXTRACTION_COLUMN: "string"}
    dtypes = {
        "model": "string",
        ID_COLUMN: "string",
        **{c: t for c, t in inp.study.factor_dtypes.items() if c in table},
        SAMPLE_COLUMN: "Int64",
        **{f"exp1_{c}": exp1_dtypes[c] for c in exp1_columns},
        **{f"exp2_{c}": "float64" for c in exp2_columns},
    }
    for column, dtype in dtypes.items():
        if column not in table:  # an experiment no model passed: the documented column is still there, empty
            table[column] = pd.Series(index=table.index, dtype=dtype)
    return table.astype(dtypes)


def usable_exp1(table: pd.DataFrame) -> pd.DataFrame:
    """Rows whose Experiment 1 answer was extracted (failed extractions are not answers): one per trial × sample."""
    column = f"exp1_{EXTRACTION_COLUMN}"
    return table[table[column].isin(EXTRACTED)] if column in table else table.iloc[0:0]


def exp2_rows(table: pd.DataFrame, column: str) -> pd.DataFrame:
    """One row per model × trial with Experiment 2 values (the table repeats them on every sample's row)."""
    return table.dropna(subset=[column]).drop_duplicates(["model", ID_COLUMN])


def item_labels(table: pd.DataFrame, study: Study) -> tuple[pd.Series, str]:
    """Each row's item (the unit the intervals resample) and what that unit is: the study's item column, or the
    trial where the input lacks it (a trial's samples then still move together)."""
    column = study.item_column
    if column and column in table and table[column].notna().all():
        return table[column].astype(str), column
    return table[ID_COLUMN].astype(str), "trial (the input has no item column)"


# --- Statistics ---------------------------------------------------------------------------------------------------


def total_variation(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Total variation distance between distributions along the last axis: half the summed absolute difference,
    a proportion from 0 (identical) to 1 (disjoint)."""
    return 0.5 * np.abs(np.asarray(p, dtype=float) - np.asarray(q, dtype=float)).sum(axis=-1)


def fit_rows(model_values: np.ndarray, human_values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs, Pearson r and RMSE of each row of `model_values` (rows × values) against `human_values`, over the
    pairs where both are known; r is NaN below 3 pairs or without variance on either side."""
    model_values = np.atleast_2d(np.asarray(model_values, float))
    human_values = np.broadcast_to(np.asarray(human_values, float), model_values.shape)
    known = ~(np.isnan(model_values) | np.isnan(human_values))
    pairs = known.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        m_mean = np.where(known, model_values, 0).sum(axis=1) / pairs
        h_mean = np.where(known, human_values, 0).sum(axis=1) / pairs
        dm = np.where(known, model_values - m_mean[:, None], 0)
        dh = np.where(known, human_values - h_mean[:, None], 0)
        spread = (dm**2).sum(axis=1) * (dh**2).sum(axis=1)
        r = np.where((pairs >= 3) & (spread > 0), (dm * dh).sum(axis=1) / np.sqrt(spread), np.nan)
        rmse = np.sqrt(np.where(known, (model_values - human_values) ** 2, 0).sum(axis=1) / pairs)
    return pairs, r, rmse


def fit_arrays(model_values: np.ndarray, human_values: np.ndarray) -> tuple[int, float, float]:
    """(pairs, Pearson r, RMSE) over the pairs where both are known; r is NaN below 3 pairs or without variance."""
    pairs, r, rmse = fit_rows(np.asarray(model_values, float)[None, :], human_values)
    return int(pairs[0]), float(r[0]), float(rmse[0])


def fit(model_values: pd.Series, human_values: pd.Series) -> dict[str, float]:
    """Pearson r and RMSE between paired values (NaN where fewer than 3 pairs or no variance)."""
    n, r, rmse = fit_arrays(model_values.to_numpy(dtype=float), human_values.to_numpy(dtype=float))
    return {"n": n, "r": r, "rmse": rmse}


def wilson_interval(successes: np.ndarray, n: np.ndarray, z: float = 1.959964) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score 95% interval of a proportion (the human tables' intervals)."""
    successes, n = np.asarray(successes, float), np.asarray(n, float)
    p = successes / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    return centre - half, centre + half


# --- Uncertainty: resampling items --------------------------------------------------------------------------------

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 20261122
INTERVAL_PERCENTILES = (2.5, 97.5)  # a 95% percentile interval
ITEM = "_item"  # the bootstrap unit of a row, while an analysis runs


def percentile_interval(replicates: np.ndarray, n_items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 95% percentile interval of a statistic over resamples (axis 0), NaN where fewer than 2 items carry it:
    resampling a single item only ever gives its own value back, which would read as certainty."""
    if replicates.size == 0:
        empty = np.full(replicates.shape[1:], np.nan)
        return empty, empty.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells: no resample contained them
        low, high = np.nanpercentile(replicates, INTERVAL_PERCENTILES, axis=0)
    enough = np.asarray(n_items) >= 2
    enough = enough.reshape(enough.shape + (1,) * (low.ndim - enough.ndim))
    return np.where(enough, low, np.nan), np.where(enough, high, np.nan)


@dataclass(frozen=True)
class CellMeans:
    """Means of some values per cell, on the data and on each resample of items."""

    index: pd.Index  # the cells
    values: list[str]
    point: np.ndarray  # cells × values
    replicates: np.ndarray  # resamples × cells × values
    n_items: np.ndarray  # per cell: items with rows in it
    n_rows: np.ndarray  # per cell

    def reindex(self, index: pd.Index) -> CellMeans:
        """The same statistics on `index` (NaN and zero counts for cells without rows)."""
        position = self.index.get_indexer(index)
        found = position >= 0

        def take(array: np.ndarray, axis: int, fill) -> np.ndarray:
            shape = list(array.shape)
            shape[axis] = len(index)
            taken = np.full(shape, fill, dtype=float)
            into = [slice(None)] * len(shape)
            into[axis] = np.flatnonzero(found)
            taken[tuple(into)] = np.take(array, position[found], axis=axis)
            return taken

        return CellMeans(
            index,
            self.values,
            take(self.point, 0, np.nan),
            take(self.replicates, 1, np.nan),
            take(self.n_items, 0, 0),
            take(self.n_rows, 0, 0),
        )

    def interval(self) -> tuple[np.ndarray, np.ndarray]:
        return percentile_interval(self.replicates, self.n_items)

    def frame(self, names: dict[str, str] | None = None) -> pd.DataFrame:
        """Per cell: each value's mean and its interval (`<name>`, `<name>_ci_low`, `<name>_ci_high`)."""
        low, high = self.interval()
        columns = {}
        for j, value in enumerate(self.values):
            name = (names or {}).get(value, value)
            columns |= {name: self.point[:, j], f"{name}_ci_low": low[:, j], f"{name}_ci_high": high[:, j]}
        return pd.DataFrame(columns, index=self.index)


@dataclass(frozen=True)
class Bootstrap:
    """Resamples of the items, with replacement; every interval of an analysis comes from the same resamples, so
    differences between related numbers (Experiment 1 against Experiment 2 on one cell) are resampled together."""

    items: pd.Index
    weights: np.ndarray  # resamples × items: how often each item is drawn into each resample
    unit: str

    @classmethod
    def over(
        cls, labels: pd.Series, unit: str, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
    ) -> Bootstrap:
        items = pd.Index(sorted(set(labels.dropna())))
        rng = np.random.default_rng(seed)
        weights = rng.multinomial(len(items), np.full(len(items), 1 / len(items)), size=resamples)
        return cls(items, weights, unit)

    @property
    def resamples(self) -> int:
        return len(self.weights)

    def describe(self) -> str:
        return (
            f"95% percentile intervals from {self.resamples} resamples of the {len(self.items)} items "
            f"(unit: {self.unit}; seed {BOOTSTRAP_SEED}); empty where a cell has fewer than 2 items"
        )

    def means(self, frame: pd.DataFrame, cells: list[str], values: list[str]) -> CellMeans:
        """The mean of each of `values` per cell of `cells`, over the rows of `frame` (which carries ITEM), on the
        data and on every resample: a resample counts each item's rows as often as it drew the item."""
        grouped = frame.groupby([ITEM, *cells], observed=True, sort=True)
        sums = grouped[values].sum()
        counts = grouped.size()
        cell_of = sums.index.droplevel(0)
        index = cell_of.unique()
        if isinstance(index, pd.MultiIndex):
            index = index.sort_values()
        item_position = self.items.get_indexer(sums.index.get_level_values(0))
        cell_position = index.get_indexer(cell_of)
        item_sums = np.zeros((len(self.items), len(index), len(values)))
        item_rows = np.zeros((len(self.items), len(index)))
        np.add.at(item_sums, (item_position, cell_position), sums.to_numpy(dtype=float))
        np.add.at(item_rows, (item_position, cell_position), counts.to_numpy(dtype=float))
        with np.errstate(invalid="ignore", divide="ignore"):
            point = item_sums.sum(axis=0) / item_rows.sum(axis=0)[:, None]
            resampled_sums = np.einsum("bi,icv->bcv", self.weights, item_sums)
            resampled_rows = np.einsum("bi,ic->bc", self.weights, item_rows)
            replicates = resampled_sums / resampled_rows[..., None]
        return CellMeans(index, list(values), point, replicates, (item_rows > 0).sum(axis=0), item_rows.sum(axis=0))


def fit_with_interval(
    points: np.ndarray, replicates: np.ndarray, human: np.ndarray, n_items: int, prefix: str
) -> dict[str, float]:
    """r and RMSE of a model's values (`points`, and per resample `replicates`, resamples × values) against
    people's, each with its 95% interval over the resamples of items."""
    pairs, r, rmse = fit_arrays(points, human)
    _, resampled_r, resampled_rmse = fit_rows(replicates, human)
    resampled = np.column_stack([resampled_r, resampled_rmse])
    (r_low, rmse_low), (r_high, rmse_high) = percentile_interval(resampled, np.array(n_items))
    return {
        f"{prefix}_values": pairs,
        f"{prefix}_r": r,
        f"{prefix}_r_ci_low": r_low,
        f"{prefix}_r_ci_high": r_high,
        f"{prefix}_rmse": rmse,
        f"{prefix}_rmse_ci_low": rmse_low,
        f"{prefix}_rmse_ci_high": rmse_high,
    }


# --- Experiment 2's captured mass ---------------------------------------------------------------------------------


def captured_mass(inp: AnalysisInput, question_set: Callable[[str], str] = lambda key: key) -> pd.DataFrame:
    """Every Experiment 2 question's captured mass (the probability the answer options hold, before they are
    renormalized), one row per model × trial × question, with the question's set (`question_set` groups keys)."""
    rows = []
    for model, wide in sorted(inp.exp2.items()):
        for column in [c for c in wide.columns if c.endswith("_captured_mass")]:
            key = column.removesuffix("_captured_mass")
            masses = wide[[ID_COLUMN, column]].dropna()
            rows += [
                {"model": model, ID_COLUMN: t, "question": key, "question_set": question_set(key), "captured_mass": m}
                for t, m in zip(masses[ID_COLUMN], masses[column])
            ]
    columns = ["model", ID_COLUMN, "question", "question_set", "captured_mass"]
    return pd.DataFrame(rows, columns=columns).astype({"captured_mass": "float64"})


def captured_mass_summary(masses: pd.DataFrame) -> pd.DataFrame:
    """Per model × question set: how many questions, and the captured mass's minimum, 10th percentile and median."""
    grouped = masses.groupby(["model", "question_set"])["captured_mass"]
    summary = grouped.agg(
        questions="size",
        captured_mass_min="min",
        captured_mass_p10=lambda m: m.quantile(0.1),
        captured_mass_median="median",
    )
    return summary.reset_index()


# --- Notes that travel with the numbers ---------------------------------------------------------------------------


def temperature_note(inp: AnalysisInput) -> str:
    """What the two experiments' numbers are draws from, said wherever they appear side by side."""
    exp1 = sorted({s.temperature for s in inp.exp1_sampling.values()})
    exp2 = f"Experiment 2 reads the model's own distribution, which is temperature {EXP2_TEMPERATURE:g}."
    if not inp.exp1:
        return f"No Experiment 1 answers were read (refused by their checks or not run). {exp2}"
    said = ", ".join(f"{t:g}" for t in exp1) or "unknown"
    note = f"Experiment 1 answers are sampled at temperature {said}; {exp2}"
    if exp1 != [EXP2_TEMPERATURE]:
        note += " The two differ by design (the research plan); set settings.temperature to 1 for a like-for-like run."
    return note


def sampling_columns(inp: AnalysisInput, models: pd.Series) -> pd.DataFrame:
    """`exp1_temperature`, `exp1_samples_per_trial` and `exp2_temperature` for each row's model."""
    known = inp.exp1_sampling
    return pd.DataFrame(
        {
            "exp1_temperature": [known[m].temperature if m in known else np.nan for m in models],
            "exp1_samples_per_trial": pd.array(
                [known[m].samples_per_trial if m in known else None for m in models], dtype="Int64"
            ),
            "exp2_temperature": EXP2_TEMPERATURE,
        },
        index=models.index,
    )


# --- Plots --------------------------------------------------------------------------------------------------------

PEOPLE_STYLE = {"color": "black", "marker": "s", "linewidth": 2}


def legend(figure: plt.Figure) -> None:
    """One legend for all panels, beside them (a panel may lack some lines)."""
    entries = {}
    for axis in figure.axes:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        figure.legend(entries.values(), entries.keys(), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))


def finish(figure: plt.Figure, ylabel: str, title: str) -> bytes:
    """Label the first panel, add the shared legend and the title, and render the figure as PNG."""
    figure.axes[0].set_ylabel(ylabel)
    legend(figure)
    figure.suptitle(title, fontsize=10, y=1.02 + 0.03 * title.count("\n"))
    return png(figure)


def png(figure: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def error_bars(point, low, high) -> np.ndarray:
    """matplotlib's yerr from an interval (zero-length where the interval is unknown)."""
    point, low, high = (np.asarray(x, dtype=float) for x in (point, low, high))
    return np.nan_to_num(np.vstack([point - low, high - point]), nan=0.0)


def captured_mass_figure(masses: pd.DataFrame, title: str) -> bytes:
    """Histograms of the captured mass, one panel per question set, one colour per model, on a log scale."""
    sets = sorted(masses["question_set"].unique())
    figure, axes = plt.subplots(1, len(sets), figsize=(3.2 * len(sets), 3), sharey=True, squeeze=False)
    positive = masses["captured_mass"].clip(lower=1e-12)
    bins = np.linspace(np.floor(np.log10(positive.min())), 0, 25)
    for axis, question_set in zip(axes[0], sets):
        chosen = masses[masses["question_set"] == question_set]
        for model, group in chosen.groupby("model"):
            axis.hist(np.log10(group["captured_mass"].clip(lower=1e-12)), bins=bins, alpha=0.6, label=model)
        axis.set_title(f"{question_set}: {len(chosen)} questions, all models", fontsize=9)
        axis.set_xlabel("captured mass (log10 of probability)")
        axis.axvline(0, color="grey", linewidth=0.8)
    return finish(
        figure,
        "questions (count)",
        f"{title}: how much of the model's probability the answer options hold (1 = all of it, at 0 on this scale)",
    )
