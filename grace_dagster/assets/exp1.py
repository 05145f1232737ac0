"""Experiment 1: every model's free-text answers to every trial's conversation (raw responses), checkpointed turn by
turn and resumable."""

import asyncio
from collections.abc import Callable
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
# Each turn samples with its own seed, derived from the sample's, so turns do not share random streams.
TURN_SEED_STRIDE = 7919
SEED_MODULUS = 2**31


@dataclass(frozen=True)
class Conversation:
    """One trial's Experiment 1 conversations: `samples` of them, each the trial's turns asked one after the other.

    Sample i is the conversation asked with the trial's seed + i, each turn seeded from that. Servers seed the i-th
    answer of a request with seed + i, so a sample comes out the same whether its first turn was asked together
    with the other samples (`n`) or alone; and each sample's turns are checkpointed under keys of their own, so
    raising `samples_per_trial` asks only for the new samples.
    """

    key: str  # checkpoint key of the trial's finished record (all its samples)
    trial_id: str
    prompts: tuple[str, ...]
    seed: int  # the trial's seed
    sample_keys: tuple[str, ...]  # sample i's key: its turns are recorded under "<key>/turn<t>"
    params: dict

    @property
    def samples(self) -> int:
        return len(self.sample_keys)

    def turn_seed(self, sample: int, turn: int) -> int:
        return (self.seed + sample + TURN_SEED_STRIDE * turn) % SEED_MODULUS

    def turn_key(self, sample: int, turn: int) -> str:
        return f"{self.sample_keys[sample]}/turn{turn}"


def conversation_jobs(
    study: Study, trials: pd.DataFrame, model: Model, settings: ExperimentSettings
) -> dict[str, Conversation]:
    """The conversations of a partition by checkpoint key. A sample's key holds what determines its answers (the
    model, the turns' prompts, sampling parameters and its seed), so sample 0's is the key of the trial's one
    conversation when a single sample is asked."""
    params = {"max_tokens": settings.max_tokens, "temperature": settings.temperature}
    jobs = {}
    for trial in trials.itertuples(index=False):
        trial_id = getattr(trial, ID_COLUMN)
        prompts = tuple(study.exp1_prompts(trial))
        seed = common.trial_seed(settings.seed, trial_id)
        samples = tuple(
            model_request_key(EXP1_METHOD, model, prompts, params, seed + i) for i in range(settings.samples_per_trial)
        )
        key = model_request_key(f"{EXP1_METHOD}/samples", model, prompts, params, seed, len(samples))
        jobs[key] = Conversation(key, trial_id, prompts, seed, samples, params)
    return jobs


def seeded_runs(samples: list[int], seed_of: Callable[[int], int]) -> list[list[int]]:
    """`samples` cut into runs whose seeds follow one another, so each run is one request with `n` = its length
    (the server seeds answer i with the first seed + i)."""
    runs: list[list[int]] = []
    for sample in samples:
        if runs and seed_of(sample) == seed_of(runs[-1][-1]) + 1:
            runs[-1].append(sample)
        else:
            runs.append([sample])
    return runs


def response_columns(study: Study) -> list[str]:
    """The raw table's columns beside the trial's: each turn's reply and finish reason, then totals."""
    per_turn = [f"{kind}_{turn.key}" for turn in study.exp1_turns for kind in ("response", "finish_reason")]
    return ["sample", "seed", *per_turn, "prompt_tokens", "completion_tokens"]


def _total(turns: list[dict], field: str):
    values = [turn[field] for turn in turns]
    return pd.NA if any(v is None for v in values) else sum(values)


def _rows(study: Study, record: dict) -> list[dict]:
    """One row per sample of a trial's record."""
    rows = []
    for conversation in record["conversations"]:
        row = {ID_COLUMN: record[ID_COLUMN], "sample": conversation["sample"], "seed": conversation["seed"]}
        for turn, answer in zip(study.exp1_turns, conversation["turns"], strict=True):
            row[f"response_{turn.key}"] = answer["text"]
            row[f"finish_reason_{turn.key}"] = answer["finish_reason"]
        row["prompt_tokens"] = _total(conversation["turns"], "prompt_tokens")
        row["completion_tokens"] = _total(conversation["turns"], "completion_tokens")
        rows.append(row)
    return rows


TURN_FIELDS = ("text", "finish_reason", "prompt_tokens", "completion_tokens")


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
    kept verbatim (temperature 0.7 by default, a seed per trial, sample and turn).

    `samples_per_trial` conversations per trial (the `sample` column): the first turn of all samples is one request
    with `n` samples, the later turns are asked per sample, since each sample's history is its own. Sample i is
    seeded with the trial's seed + i, so it is the same answer whether asked with the others or alone. Each finished
    turn of each sample is checkpointed, so a killed run resumes at the turn it was on, more samples ask only for
    the new ones, and a finished partition is rebuilt without asking the model again. Writes
    `{model}_{study}_raw_responses.csv` for R: one row per trial × sample, a `response_<turn>` and
    `finish_reason_<turn>` column per turn.
    """
    part = common.partition(context)
    model = llm.registry().get(part.model)
    trials = common.load_trials(storage, settings, part.study)
    jobs = conversation_jobs(part.study, trials, model, settings)

    generated = 0  # turn answers asked of the model in this run (the rest came from the checkpoint)

    def make_ask(client, checkpoint):
        async def answers(messages, seed, params, n) -> list[dict]:
            nonlocal generated
            found = await prompting.generate_answer(client, model.kind, messages, seed=seed, n=n, **params)
            generated += len(found)
            return [{field: getattr(answer, field) for field in TURN_FIELDS} for answer in found]

        async def first_turns(conversation: Conversation) -> None:
            """Every sample's first turn: one prompt, so the missing samples are asked together (`n`)."""
            missing = [s for s in range(conversation.samples) if conversation.turn_key(s, 0) not in checkpoint]
            messages = [{"role": "user", "content": conversation.prompts[0]}]

            async def ask_run(run: list[int]) -> None:
                seed = conversation.turn_seed(run[0], 0)
                for sample, answer in zip(run, await answers(messages, seed, conversation.params, len(run))):
                    checkpoint.add(conversation.turn_key(sample, 0), answer)

            await asyncio.gather(*map(ask_run, seeded_runs(missing, lambda s: conversation.turn_seed(s, 0))))

        async def later_turns(conversation: Conversation, sample: int) -> list[dict]:
            """One sample's conversation from its first answer on: each sample's history is its own."""
            messages, turns = [], []
            for turn, prompt in enumerate(conversation.prompts):
                messages = [*messages, {"role": "user", "content": prompt}]
                seed = conversation.turn_seed(sample, turn)
                answer = await checkpoint.once(
                    conversation.turn_key(sample, turn), partial(alone, messages, seed, conversation.params)
                )
                messages = [*messages, {"role": "assistant", "content": answer["text"]}]
                turns.append({field: answer[field] for field in TURN_FIELDS})
            return turns

        async def alone(messages, seed, params) -> dict:
            return (await answers(messages, seed, params, 1))[0]

        async def ask(conversation: Conversation):
            await first_turns(conversation)
            samples = await asyncio.gather(*(later_turns(conversation, s) for s in range(conversation.samples)))
            return {
                ID_COLUMN: conversation.trial_id,
                "seed": conversation.seed,
                "conversations": [
                    {"sample": s, "seed": conversation.seed + s, "key": conversation.sample_keys[s], "turns": turns}
                    for s, turns in enumerate(samples)
                ],
            }

        return ask

    outcome = run_checkpointed(context, storage, llm, "exp1", part, model, jobs, make_ask)
    rows = [row for record in outcome.records.values() for row in _rows(part.study, record)]
    answers = pd.DataFrame(rows, columns=[ID_COLUMN, *response_columns(part.study)])
    answers = answers.astype({"sample": "int64", "prompt_tokens": "Int64", "completion_tokens": "Int64"})
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
            "samples_per_trial": settings.samples_per_trial,
            "answers_generated": generated,
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
    """Every trial has exactly `samples_per_trial` conversations (samples 0, 1, ...), every turn of each answered."""
    samples = check.settings.samples_per_trial
    expected = {(trial, sample) for trial in check.trials[ID_COLUMN] for sample in range(samples)}
    answered = table[_turn_columns(table, "finish_reason").notna().all(axis=1)]
    counts = table[[ID_COLUMN, "sample"]].value_counts()
    found = {(trial, int(sample)) for trial, sample in zip(answered[ID_COLUMN], answered["sample"]) if pd.notna(sample)}
    missing = sorted(expected - found)
    duplicated = sorted((trial, int(sample)) for (trial, sample), n in counts.items() if n > 1)
    unexpected = sorted(found - expected)
    return CheckOutcome(
        passed=not (missing or duplicated or unexpected),
        metadata={
            "expected_trials": len(check.trials),
            "samples_per_trial": samples,
            "expected_conversations": len(expected),
            "rows": len(table),
            "missing": len(missing),
            "duplicated": len(duplicated),
            "unexpected": len(unexpected),
            "examples": MetadataValue.json([f"{t} sample {s}" for t, s in (missing + duplicated + unexpected)[:20]]),
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
        "Every trial of the study (or of the quick-profile subset) has exactly settings.samples_per_trial "
        "conversations (samples 0, 1, ...), each with an answer to every turn.",
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
