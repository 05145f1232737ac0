"""Experiment 1: every model's free-text answers to every trial's conversation (raw responses), checkpointed turn by
turn and resumable."""

from dataclasses import dataclass
from functools import partial

import pandas as pd
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from grace_dagster.assets import common, review
from grace_dagster.assets.batches import model_request_key, run_checkpointed
from grace_dagster.assets.checks import CheckContext, CheckOutcome, table_check
from grace_dagster.assets.partitions import model_study_partitions
from grace_dagster.llm import prompting
from grace_dagster.registry import Model
from grace_dagster.resources import LLMEndpoints, Storage
from grace_dagster.resources.settings import ExperimentSettings
from grace_dagster.studies import ID_COLUMN, Study


def responses_path(storage: Storage, part: common.Partition):
    return storage.path("exp1", "responses", part.model, f"{part.study.name}.parquet")


# Bump when the way a conversation is asked changes in a way its prompts and parameters do not show (it keys the
# checkpoint: every finished conversation is asked again).
EXP1_METHOD = "exp1/conversation-v1"
# Each turn samples with its own seed, derived from the trial's, so turns do not share random streams.
TURN_SEED_STRIDE = 7919


@dataclass(frozen=True)
class Conversation:
    """One trial's Experiment 1 conversation: its turns' prompts, asked one after the other."""

    key: str
    trial_id: str
    sample: int
    prompts: tuple[str, ...]
    seed: int
    params: dict

    def turn_seed(self, turn: int) -> int:
        return (self.seed + TURN_SEED_STRIDE * turn) % 2**31


def conversation_jobs(
    study: Study, trials: pd.DataFrame, model: Model, settings: ExperimentSettings
) -> dict[str, Conversation]:
    """The conversations of a partition, by checkpoint key (the model, the turns' prompts, sampling, seed)."""
    params = {"max_tokens": settings.max_tokens, "temperature": settings.temperature}
    jobs = {}
    for trial in trials.itertuples(index=False):
        trial_id = getattr(trial, ID_COLUMN)
        prompts = tuple(study.exp1_prompts(trial))
        seed = common.trial_seed(settings.seed, trial_id)
        key = model_request_key(EXP1_METHOD, model, prompts, params, seed)
        jobs[key] = Conversation(key, trial_id, 0, prompts, seed, params)
    return jobs


def response_columns(study: Study) -> list[str]:
    """The raw table's columns beside the trial's: each turn's reply and finish reason, then totals."""
    per_turn = [f"{kind}_{turn.key}" for turn in study.exp1_turns for kind in ("response", "finish_reason")]
    return ["sample", "seed", *per_turn, "prompt_tokens", "completion_tokens"]


def _row(study: Study, record: dict) -> dict:
    row = {ID_COLUMN: record[ID_COLUMN], "sample": record["sample"], "seed": record["seed"]}
    for turn, answer in zip(study.exp1_turns, record["turns"], strict=True):
        row[f"response_{turn.key}"] = answer["text"]
        row[f"finish_reason_{turn.key}"] = answer["finish_reason"]
    row["prompt_tokens"] = sum(answer["prompt_tokens"] for answer in record["turns"])
    row["completion_tokens"] = sum(answer["completion_tokens"] for answer in record["turns"])
    return row


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
    """Each trial as a conversation, one turn per question (study 1: the prior before the utterance is shown, then
    the bets, then the knowledge question; study 2: the utterance); the model's free-text answer to each turn is
    kept verbatim (temperature 0.7 by default, a seed per trial and turn).

    Each finished turn is checkpointed, so a killed run resumes at the turn it was on and a finished partition is
    rebuilt without asking the model again. Writes `{model}_{study}_raw_responses.csv` for R: one row per trial, a
    `response_<turn>` and `finish_reason_<turn>` column per turn.
    """
    part = common.partition(context)
    model = llm.registry().get(part.model)
    trials = common.load_trials(storage, settings, part.study)
    jobs = conversation_jobs(part.study, trials, model, settings)

    def make_ask(client, checkpoint):
        async def turn_answer(messages, seed, params) -> dict:
            answer = await prompting.generate_answer(client, model.kind, messages, seed=seed, **params)
            return {
                "text": answer.text,
                "finish_reason": answer.finish_reason,
                "prompt_tokens": answer.prompt_tokens,
                "completion_tokens": answer.completion_tokens,
            }

        async def ask(conversation: Conversation):
            messages, turns = [], []
            for turn, prompt in enumerate(conversation.prompts):
                messages = [*messages, {"role": "user", "content": prompt}]
                answer = await checkpoint.once(
                    f"{conversation.key}/turn{turn}",
                    partial(turn_answer, messages, conversation.turn_seed(turn), conversation.params),
                )
                messages = [*messages, {"role": "assistant", "content": answer["text"]}]
                turns.append({k: answer[k] for k in ("text", "finish_reason", "prompt_tokens", "completion_tokens")})
            return {
                ID_COLUMN: conversation.trial_id,
                "sample": conversation.sample,
                "seed": conversation.seed,
                "turns": turns,
            }

        return ask

    outcome = run_checkpointed(context, storage, llm, "exp1", part, model, jobs, make_ask)
    answers = pd.DataFrame(
        [_row(part.study, record) for record in outcome.records.values()],
        columns=[ID_COLUMN, *response_columns(part.study)],
    )
    table = trials.merge(answers, on=ID_COLUMN, how="left", validate="one_to_many")
    csv = storage.path("csv", f"{part.model}_{part.study.name}_raw_responses.csv")
    parquet, _ = storage.write_table(table, responses_path(storage, part), csv)
    review.record_readings_version(context, storage, part.model, part.study.name)
    first_turn = f"response_{part.study.exp1_turns[0].key}"
    return MaterializeResult(
        metadata={
            **outcome.metadata(),
            "study": part.study.name,
            "rows": len(table),
            "turns": MetadataValue.json([turn.key for turn in part.study.exp1_turns]),
            "trial_limit": settings.trial_limit if settings.trial_limit is not None else "all",
            "temperature": settings.temperature,
            "max_tokens": settings.max_tokens,
            "base_seed": settings.seed,
            "prompts_sha256": common.digest([job.prompts for job in jobs.values()]),
            "prompt_tokens": int(table["prompt_tokens"].sum()),
            "completion_tokens": int(table["completion_tokens"].sum()),
            "csv": MetadataValue.path(str(csv)),
            "parquet": MetadataValue.path(str(parquet)),
            "preview": MetadataValue.md(table[[ID_COLUMN, first_turn]].head(5).to_markdown(index=False)),
        }
    )


def _turn_columns(table: pd.DataFrame, kind: str) -> pd.DataFrame:
    return table[[c for c in table.columns if c.startswith(f"{kind}_")]]


def every_trial_answered(table: pd.DataFrame, check: CheckContext) -> CheckOutcome:
    """Every trial has exactly one conversation (per sample), and every turn of it an answer."""
    counts = table[[ID_COLUMN, "sample"]].value_counts()
    expected = set(check.trials[ID_COLUMN])
    complete = _turn_columns(table, "finish_reason").notna().all(axis=1)
    missing = sorted(expected - set(table.loc[complete, ID_COLUMN]))
    duplicated = sorted({trial for (trial, _), n in counts.items() if n > 1})
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
    empty = (_turn_columns(table, "response").fillna("").apply(lambda column: column.str.strip()) == "").any(axis=1)
    return CheckOutcome(
        passed=not empty.any(),
        metadata={"empty_responses": int(empty.sum()), "rows": len(table)},
        worst=table.loc[empty, [ID_COLUMN, *_turn_columns(table, "finish_reason").columns, "completion_tokens"]],
    )


def answers_not_truncated(table: pd.DataFrame, check: CheckContext) -> CheckOutcome:
    truncated = (_turn_columns(table, "finish_reason") == "length").any(axis=1)
    return CheckOutcome(
        passed=not truncated.any(),
        metadata={
            "truncated": int(truncated.sum()),
            "truncated_rate": round(int(truncated.sum()) / max(len(table), 1), 4),
            "max_tokens": check.settings.max_tokens,
        },
        worst=table.loc[truncated, [ID_COLUMN, "completion_tokens", *_turn_columns(table, "response").columns]],
    )


EXP1_CHECKS = [
    table_check(
        exp1_responses.key,
        "every_trial_answered",
        "Every trial of the study (or of the quick-profile subset) has exactly one conversation, with an answer "
        "to every turn.",
        responses_path,
        every_trial_answered,
        blocking=True,
    ),
    table_check(
        exp1_responses.key,
        "responses_non_empty",
        "No turn's answer is empty (an empty answer is kept and counts as a failed extraction downstream).",
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
