"""Experiment 1: every model's free-text answer to every trial (raw responses), checkpointed and resumable."""

import pandas as pd
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from grace_dagster.assets import common
from grace_dagster.assets.batches import model_request_key, run_checkpointed
from grace_dagster.assets.checks import CheckContext, CheckOutcome, table_check
from grace_dagster.assets.partitions import model_study_partitions
from grace_dagster.llm import prompting
from grace_dagster.resources import LLMEndpoints, Storage
from grace_dagster.resources.settings import ExperimentSettings
from grace_dagster.studies import ID_COLUMN

RESPONSE_COLUMNS = ["response", "finish_reason", "prompt_tokens", "completion_tokens", "seed"]


def responses_path(storage: Storage, part: common.Partition):
    return storage.path("exp1", "responses", part.model, f"{part.study.name}.parquet")


CODE_VERSION = common.code_version(prompting)


@asset(
    key=["exp1", "responses"],
    partitions_def=model_study_partitions,
    pool=common.ENDPOINT_POOL,
    deps=[common.TRIALS_DEP],
    group_name="exp1",
    kinds={"python", "parquet"},
    code_version=CODE_VERSION,
)
def exp1_responses(
    context: AssetExecutionContext, storage: Storage, llm: LLMEndpoints, settings: ExperimentSettings
) -> MaterializeResult:
    """Each trial sent as a prompt; the model's free-text answer kept verbatim (temperature 0.7, a seed per trial).

    Finished requests are checkpointed, so a killed run resumes where it stopped and a finished partition is
    rebuilt without asking the model again. Writes `{model}_{study}_raw_responses.csv` for R.
    """
    part = common.partition(context)
    model = llm.registry().get(part.model)
    trials = common.load_trials(storage, settings, part.study)

    jobs = {}
    for trial in trials.itertuples(index=False):
        trial_id = getattr(trial, ID_COLUMN)
        messages = part.study.exp1_messages(trial)
        params = dict(
            max_tokens=settings.max_tokens,
            temperature=settings.temperature,
            seed=common.trial_seed(settings.seed, trial_id),
        )
        jobs[model_request_key("exp1", CODE_VERSION, model, messages, params)] = (trial_id, messages, params)

    def make_ask(client):
        async def ask(job):
            trial_id, messages, params = job
            answer = await prompting.generate_answer(client, model.kind, messages, **params)
            return {
                ID_COLUMN: trial_id,
                "response": answer.text,
                "finish_reason": answer.finish_reason,
                "prompt_tokens": answer.prompt_tokens,
                "completion_tokens": answer.completion_tokens,
                "seed": params["seed"],
            }

        return ask

    outcome = run_checkpointed(context, storage, llm, "exp1", part, model, jobs, make_ask)
    answers = pd.DataFrame(list(outcome.records.values()), columns=[ID_COLUMN, *RESPONSE_COLUMNS])
    table = trials.merge(answers, on=ID_COLUMN, how="left", validate="one_to_one")
    csv = storage.path("csv", f"{part.model}_{part.study.name}_raw_responses.csv")
    parquet, _ = storage.write_table(table, responses_path(storage, part), csv)
    return MaterializeResult(
        metadata={
            **outcome.metadata(),
            "study": part.study.name,
            "rows": len(table),
            "trial_limit": settings.trial_limit if settings.trial_limit is not None else "all",
            "temperature": settings.temperature,
            "max_tokens": settings.max_tokens,
            "base_seed": settings.seed,
            "prompts_sha256": common.digest([job[1] for job in jobs.values()]),
            "prompt_tokens": int(table["prompt_tokens"].sum()),
            "completion_tokens": int(table["completion_tokens"].sum()),
            "csv": MetadataValue.path(str(csv)),
            "parquet": MetadataValue.path(str(parquet)),
            "preview": MetadataValue.md(table[[ID_COLUMN, "response"]].head(5).to_markdown(index=False)),
        }
    )


def every_trial_answered(table: pd.DataFrame, check: CheckContext) -> CheckOutcome:
    counts = table[ID_COLUMN].value_counts()
    expected = set(check.trials[ID_COLUMN])
    answered = table.loc[table["finish_reason"].notna(), ID_COLUMN]
    missing = sorted(expected - set(answered))
    duplicated = sorted(counts[counts > 1].index)
    unexpected = sorted(set(table[ID_COLUMN]) - expected)
    return CheckOutcome(
        passed=not (missing or duplicated or unexpected),
        metadata={
            "expected_trials": len(expected),
            "rows": len(table),
            "missing": len(missing),
            "duplicated": len(duplicated),
            "unexpected": len(unexpected),
            "examples": MetadataValue.json((missing + duplicated + unexpected)[:20]),
        },
    )


def responses_non_empty(table: pd.DataFrame, _: CheckContext) -> CheckOutcome:
    empty = table[table["response"].fillna("").str.strip() == ""]
    return CheckOutcome(
        passed=empty.empty,
        metadata={"empty_responses": len(empty), "rows": len(table)},
        worst=empty[[ID_COLUMN, "finish_reason", "completion_tokens"]],
    )


def answers_not_truncated(table: pd.DataFrame, check: CheckContext) -> CheckOutcome:
    truncated = table[table["finish_reason"] == "length"]
    return CheckOutcome(
        passed=truncated.empty,
        metadata={
            "truncated": len(truncated),
            "truncated_rate": round(len(truncated) / max(len(table), 1), 4),
            "max_tokens": check.settings.max_tokens,
        },
        worst=truncated[[ID_COLUMN, "completion_tokens", "response"]],
    )


EXP1_CHECKS = [
    table_check(
        exp1_responses.key,
        "every_trial_answered",
        "Every trial of the study (or of the quick-profile subset) has exactly one response.",
        responses_path,
        every_trial_answered,
        blocking=True,
    ),
    table_check(
        exp1_responses.key,
        "responses_non_empty",
        "No response is empty (an empty answer is kept and counts as a failed extraction downstream).",
        responses_path,
        responses_non_empty,
        blocking=False,
    ),
    table_check(
        exp1_responses.key,
        "answers_not_truncated",
        "Answers that hit max_tokens (finish_reason 'length') are counted and listed; they count as failed "
        "extractions downstream, never as partial answers.",
        responses_path,
        answers_not_truncated,
        blocking=False,
    ),
]
