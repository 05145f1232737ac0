"""Experiment 2: exact probability distributions over each question's allowed answers, from log-probabilities."""

import math

import numpy as np
import pandas as pd
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from grace_dagster.assets import common
from grace_dagster.assets.batches import model_request_key, run_checkpointed
from grace_dagster.assets.checks import CheckContext, CheckOutcome, table_check
from grace_dagster.assets.partitions import model_study_partitions
from grace_dagster.llm import prompting, scoring
from grace_dagster.registry import Model
from grace_dagster.resources import LLMEndpoints, Storage
from grace_dagster.resources.settings import ExperimentSettings
from grace_dagster.studies import ID_COLUMN, Study
from grace_dagster.studies.base import Question, option_slug

SUM_TOLERANCE = 1e-6


def probabilities_path(storage: Storage, part: common.Partition):
    return storage.path("exp2", "probabilities", part.model, f"{part.study.name}.parquet")


def wide_path(storage: Storage, part: common.Partition):
    return storage.path("exp2", "wide", part.model, f"{part.study.name}.parquet")


def long_table(records: list[dict]) -> pd.DataFrame:
    """One row per trial × question × option × surface form: the form's log-probability and tokens, and the
    option's merged log-probability, renormalized probability and the question's captured mass (log-probabilities
    in nats)."""
    rows = [
        {
            ID_COLUMN: r[ID_COLUMN],
            "question": r["question"],
            "option_index": i,
            "option": option,
            "variant": variant,
            "variant_logprob": variant_logprob,
            "variant_n_tokens": n_tokens,
            "logprob": logprob,
            "probability": probability,
            "captured_mass": r["captured_mass"],
        }
        for r in records
        for i, (option, forms, form_logprobs, form_tokens, logprob, probability) in enumerate(
            zip(
                r["options"],
                r["variants"],
                r["variant_logprobs"],
                r["variant_tokens"],
                r["logprobs"],
                r["probabilities"],
            )
        )
        for variant, variant_logprob, n_tokens in zip(forms, form_logprobs, form_tokens)
    ]
    return pd.DataFrame(rows).astype(
        {"variant_logprob": "float64", "logprob": "float64", "probability": "float64", "captured_mass": "float64"}
    )


def _captured_mass_of_written_forms(long: pd.DataFrame) -> pd.Series:
    """Per trial × question, the mass the options hold in the form the prompt wrote them (no other case, no
    period): what the captured mass would be without scoring the surface forms."""
    written = long[long["variant"] == long["option"]]
    return np.exp(written["variant_logprob"]).groupby([written[ID_COLUMN], written["question"]]).sum()


def options_of(long: pd.DataFrame) -> pd.DataFrame:
    """The long table with one row per option (its surface forms folded away): what distributions are made of."""
    return long.drop_duplicates([ID_COLUMN, "question", "option_index"])


def summaries(question: Question, probabilities: np.ndarray) -> dict[str, float]:
    """Per-question summaries of a distribution: entropy, and mean and sd where options have numeric values."""
    p = probabilities[probabilities > 0]
    out = {"entropy_bits": float(-(p * np.log2(p)).sum()) if len(p) else math.nan}
    if question.values is not None:
        values = np.array(question.values)
        mean = float((probabilities * values).sum())
        out["mean"] = mean
        out["sd"] = float(math.sqrt(max((probabilities * (values - mean) ** 2).sum(), 0.0)))
    for name, indices in question.sums.items():
        out[f"p_{name}"] = float(probabilities[list(indices)].sum())
    return out


def wide_table(study: Study, trials: pd.DataFrame, long: pd.DataFrame) -> pd.DataFrame:
    """The R-facing table: one row per trial with every option's probability and each question's summaries."""
    prose = {c.name for c in study.columns if c.prose}
    keep = [c for c in trials.columns if c not in prose and c != "source_row"]
    options = options_of(long)
    scored = {key: group.sort_values("option_index") for key, group in options.groupby([ID_COLUMN, "question"])}
    rows = []
    for trial in trials.itertuples(index=False):
        row = {c: getattr(trial, c) for c in keep}
        for question in study.exp2_questions(trial):
            group = scored.get((getattr(trial, ID_COLUMN), question.key))
            # A question missing from the table stays visible as NaN here; the blocking checks refuse it.
            probabilities = np.full(len(question.options), np.nan) if group is None else group["probability"].to_numpy()
            for option, p in zip(question.options, probabilities):
                row[f"{question.key}_p_{option_slug(option)}"] = p
            row[f"{question.key}_captured_mass"] = math.nan if group is None else group["captured_mass"].iloc[0]
            row.update({f"{question.key}_{k}": v for k, v in summaries(question, probabilities).items()})
        rows.append(row)
    return pd.DataFrame(rows)


CODE_VERSION = common.code_version(prompting, scoring)
# Bump when how a question is scored changes in a way its messages and answer forms do not show (it keys the
# checkpoint: every finished question is scored again).
EXP2_METHOD = "exp2/option-scoring-v1"


def question_jobs(
    study: Study, trials: pd.DataFrame, model: Model
) -> tuple[dict[str, Question], list[tuple[str, str]]]:
    """The questions of a partition by checkpoint key, and (trial id, key) for every trial's questions in order.
    Trials whose question is word for word the same share one request (scoring is deterministic)."""
    jobs: dict[str, Question] = {}
    asked: list[tuple[str, str]] = []
    for trial in trials.itertuples(index=False):
        for question in study.exp2_questions(trial):
            key = model_request_key(EXP2_METHOD, model, question.messages, question.variants)
            jobs[key] = question
            asked.append((getattr(trial, ID_COLUMN), key))
    return jobs, asked


@asset(
    key=["exp2", "probabilities"],
    partitions_def=model_study_partitions,
    pool=common.ENDPOINT_POOL,
    deps=[common.TRIALS_DEP],
    group_name="exp2",
    kinds={"python", "parquet"},
    code_version=CODE_VERSION,
)
def exp2_probabilities(
    context: AssetExecutionContext, storage: Storage, llm: LLMEndpoints, settings: ExperimentSettings
) -> MaterializeResult:
    """For every trial and question, the model's probability of each allowed answer (no sampling).

    Each option is scored in each of its surface forms ("yes", "Yes", "yes.", "Yes."): a form's log-probability is
    summed over all its tokens in context (exact over the closed answer set), an option's is the log of its forms'
    summed probability. All forms of a question go in one request; the raw log-probabilities (nats) and the captured
    mass are kept next to the renormalized distribution. Trials whose question is word for word the same share one
    request (scoring is deterministic). Writes a long Parquet table and the wide
    `{model}_{study}_probabilities.csv` (entropies in bits).
    """
    part = common.partition(context)
    model = llm.registry().get(part.model)
    trials = common.load_trials(storage, settings, part.study)

    jobs, asked = question_jobs(part.study, trials, model)

    def make_ask(client, _checkpoint):
        scorer = prompting.OptionScorer(client, model.kind, prefix_cache=model.serving.backend == "vllm")

        async def ask(question: Question):
            scores = await scorer.score_answers(question.messages, question.variants)
            return {
                "question": question.key,
                "options": list(question.options),
                "variants": scores.variants,
                "variant_logprobs": scores.variant_logprobs,
                "variant_tokens": scores.variant_tokens,
                "logprobs": scores.logprobs,
                "captured_mass": scores.captured_mass,
                "probabilities": scores.probabilities,
            }

        return ask

    outcome = run_checkpointed(context, storage, llm, "exp2", part, model, jobs, make_ask)
    long = long_table([{ID_COLUMN: trial_id, **outcome.records[key]} for trial_id, key in asked])
    wide = wide_table(part.study, trials, long)
    (parquet,) = storage.write_table(long, probabilities_path(storage, part))
    csv = storage.path("csv", f"{part.model}_{part.study.name}_probabilities.csv")
    storage.write_table(wide, wide_path(storage, part), csv)
    mass = long.groupby([ID_COLUMN, "question"])["captured_mass"].first()
    written = _captured_mass_of_written_forms(long)
    return MaterializeResult(
        metadata={
            **outcome.metadata(),
            "study": part.study.name,
            "trials": len(trials),
            "questions": len(asked),
            "distinct_questions": len(jobs),
            "trial_limit": settings.trial_limit if settings.trial_limit is not None else "all",
            "prompts_sha256": common.digest([(q.messages, q.variants) for q in jobs.values()]),
            "captured_mass_median": float(mass.median()),
            "captured_mass_min": float(mass.min()),
            "captured_mass_written_forms_median": float(written.median()),
            "wide_columns": len(wide.columns),
            "csv": MetadataValue.path(str(csv)),
            "parquet": MetadataValue.path(str(parquet)),
            "preview": MetadataValue.md(wide.head(5).to_markdown(index=False)),
        }
    )


def probabilities_sum_to_one(table: pd.DataFrame, _: CheckContext) -> CheckOutcome:
    table = options_of(table)
    # A NaN makes the sum NaN (skipna=False), and NaN > tolerance is False: count it as an infinite deviation.
    sums = table.groupby([ID_COLUMN, "question"])["probability"].sum(skipna=False)
    nan_groups = sums.index[sums.isna()]
    deviation = (sums - 1.0).abs().fillna(math.inf)
    bad = deviation[deviation > SUM_TOLERANCE].sort_values(ascending=False)
    worst = (
        bad.rename("abs_deviation").reset_index().merge(sums.rename("sum").reset_index(), on=[ID_COLUMN, "question"])
    )
    return CheckOutcome(
        passed=bad.empty,
        metadata={
            "distributions": len(sums),
            "off_by_more_than_1e-6": len(bad),
            "max_abs_deviation": float(deviation.replace(math.inf, math.nan).max()) if len(deviation) else 0.0,
            "with_nan": len(nan_groups),
        },
        worst=worst,
    )


def probabilities_within_unit_interval(table: pd.DataFrame, _: CheckContext) -> CheckOutcome:
    """Probabilities and captured mass in [0, 1]. The options are mutually exclusive continuations, so a captured
    mass above 1 can only come from misaligned option spans. Every surface variant's rows, not only the answer set's."""
    p, mass = table["probability"], table["captured_mass"]
    outside = p.isna() | (p < 0) | (p > 1)
    mass_outside = mass.isna() | (mass < 0) | (mass > 1 + SUM_TOLERANCE)
    bad = table[outside | mass_outside]
    return CheckOutcome(
        passed=bad.empty,
        metadata={
            "values": len(table),
            "nan": int(p.isna().sum()),
            "outside_0_1": int((outside & p.notna()).sum()),
            "captured_mass_outside_0_1": int(mass_outside.sum()),
        },
        worst=bad[[ID_COLUMN, "question", "option", "probability", "captured_mass"]],
    )


def every_trial_and_question_scored(table: pd.DataFrame, check: CheckContext) -> CheckOutcome:
    present = options_of(table).groupby([ID_COLUMN, "question"])["option"].apply(list).to_dict()
    missing, incomplete = [], []
    for trial in check.trials.itertuples(index=False):
        for question in check.study.exp2_questions(trial):
            got = present.pop((getattr(trial, ID_COLUMN), question.key), None)
            if got is None:
                missing.append(f"{getattr(trial, ID_COLUMN)}/{question.key}")
            elif sorted(got) != sorted(question.options):
                incomplete.append(f"{getattr(trial, ID_COLUMN)}/{question.key}")
    unexpected = [f"{t}/{q}" for t, q in present]
    return CheckOutcome(
        passed=not (missing or incomplete or unexpected),
        metadata={
            "trials": len(check.trials),
            "missing": len(missing),
            "incomplete_option_sets": len(incomplete),
            "unexpected": len(unexpected),
            "examples": MetadataValue.json((missing + incomplete + unexpected)[:20]),
        },
    )


def captured_mass_reported(table: pd.DataFrame, check: CheckContext) -> CheckOutcome:
    threshold = check.settings.min_captured_mass
    mass = table.groupby([ID_COLUMN, "question"])["captured_mass"].first().rename("captured_mass").reset_index()
    low = mass[mass["captured_mass"] < threshold].sort_values("captured_mass")
    return CheckOutcome(
        passed=low.empty,
        metadata={
            "threshold": threshold,
            "below_threshold": len(low),
            "median": float(mass["captured_mass"].median()),
            "min": float(mass["captured_mass"].min()),
        },
        worst=low,
    )


EXP2_CHECKS = [
    table_check(
        exp2_probabilities.key,
        "probabilities_sum_to_one",
        f"Every distribution (trial × question) sums to 1 within {SUM_TOLERANCE:g}; a NaN fails it.",
        probabilities_path,
        probabilities_sum_to_one,
        blocking=True,
    ),
    table_check(
        exp2_probabilities.key,
        "probabilities_within_unit_interval",
        "Every probability, and every question's captured mass, is a number in [0, 1].",
        probabilities_path,
        probabilities_within_unit_interval,
        blocking=True,
    ),
    table_check(
        exp2_probabilities.key,
        "every_trial_and_question_scored",
        "Every trial has every question of the study (for study 1 every state and the knowledge question), "
        "each with its full option set.",
        probabilities_path,
        every_trial_and_question_scored,
        blocking=True,
    ),
    table_check(
        exp2_probabilities.key,
        "captured_mass_reported",
        "How much of the model's probability the answer options hold; WARN below the configured threshold, "
        "listing the lowest trials (the distribution is renormalized over the options either way).",
        probabilities_path,
        captured_mass_reported,
        blocking=False,
    ),
]
