"""Experiment 1, structured: each free-text answer in the study's answer schema, with how it was read.

Meant to be materialized in the same run as the raw responses (the runner and the onboarding sensor select both),
so the responses' blocking checks stop it there; in a later run it asks the gate (`assets/gate.py`) itself. Its own
blocking checks stop the analysis in the same run, and the analysis's gate refuses a failed partition in any later
run.
"""

import hashlib
import json
import re
import sys
from dataclasses import dataclass

import pandas as pd
from dagster import AssetExecutionContext, Failure, MaterializeResult, MetadataValue, asset

from grace_dagster.assets import common, gate
from grace_dagster.assets.batches import model_request_key, run_checkpointed
from grace_dagster.assets.checks import CheckContext, CheckOutcome, table_check
from grace_dagster.assets.exp1 import EXP1_CHECKS, exp1_responses, responses_path
from grace_dagster.assets.partitions import model_study_partitions
from grace_dagster.assets.review import review_readings, reviewed_path
from grace_dagster.files import atomic_write
from grace_dagster.llm import extraction
from grace_dagster.resources import LLMEndpoints, Storage
from grace_dagster.resources.settings import ExperimentSettings
from grace_dagster.studies import ID_COLUMN, STUDIES, Study
from grace_dagster.studies import review as review_queue
from grace_dagster.studies.base import Turn

CODE_VERSION = common.code_version(extraction, sys.modules[__name__])
# Bump when how the judge is asked changes in a way its messages do not show (it keys the judge's checkpoint).
JUDGE_METHOD = "exp1-judge/abstaining-v1"
RESPONSES_BLOCKING = gate.blocking_check_names(exp1_responses.key, EXP1_CHECKS)
ROW = [ID_COLUMN, "sample"]  # one structured row per trial × sample


TEXT_COLUMNS = [
    "extraction",
    "extraction_detail",
    "failure_reason",
    "judge_audit",
    "judge_reading",
    "machine_extraction",
    "machine_reading",
    "machine_reason",
    "reviewer",
    "review_note",
]


def structured_path(storage: Storage, part: common.Partition):
    return storage.path("exp1", "structured", part.model, f"{part.study.name}.parquet")


def queue_path(storage: Storage, part: common.Partition):
    """The partition's review queue, written by the asset; the researcher hands it back as `reviewed_path`."""
    return storage.path("review", f"{part.model}_{part.study.name}_queue.csv")


@dataclass(frozen=True)
class ExtractionCounts:
    """How a structured table's answers were read: what the asset reports and its checks judge."""

    rows: int
    extracted: int
    parser: int
    judge: int
    human: int
    failed: int
    judge_abstained: int
    audited: int
    agreed: int

    @classmethod
    def of(cls, table: pd.DataFrame) -> "ExtractionCounts":
        counts = table["extraction"].value_counts()
        audit = table["judge_audit"].dropna()
        reasons = table["failure_reason"].fillna("")
        return cls(
            rows=len(table),
            extracted=int((table["extraction"] != "failed").sum()),
            parser=int(counts.get("parser", 0)),
            judge=int(counts.get("judge", 0)),
            human=int(counts.get("human", 0)),
            failed=int(counts.get("failed", 0)),
            judge_abstained=int(reasons.str.contains(extraction.JUDGE_NOT_ANSWERED, regex=False).sum()),
            audited=len(audit),
            agreed=int((audit == "agree").sum()),
        )

    @property
    def rate(self) -> float:
        return self.extracted / max(self.rows, 1)

    @property
    def judge_accuracy(self) -> float | None:
        """The share of audited rows the judge read as the parser did; None when none was audited."""
        return self.agreed / self.audited if self.audited else None


def audit_sample(row_ids: list[tuple[str, int]], size: int, seed: int) -> list[tuple[str, int]]:
    """A fixed pseudo-random sample, so a rerun audits the same rows (and finds them in the checkpoint)."""
    return sorted(row_ids, key=lambda r: hashlib.sha256(f"{seed}:{r[0]}:{r[1]}".encode()).hexdigest())[:size]


@dataclass(frozen=True)
class JudgeTask:
    """One turn's reply for the judge to read, with the question it answers."""

    turn: Turn
    question: str
    reply: str
    seed: int


@asset(
    key=["exp1", "structured"],
    partitions_def=model_study_partitions,
    pool=common.ENDPOINT_POOL,
    deps=[exp1_responses, review_readings],
    group_name="exp1",
    kinds={"python", "parquet"},
    code_version=CODE_VERSION,
)
def exp1_structured(
    context: AssetExecutionContext, storage: Storage, llm: LLMEndpoints, settings: ExperimentSettings
) -> MaterializeResult:
    """Each trial's answers in the study's answer schema, one row per trial: every turn's reply read by a
    deterministic parser where it gives the answer unambiguously, otherwise by a judge model that answers in
    schema-constrained JSON or says "not answered" (recorded as a failed extraction with its reason). A reading
    outside the schema fails on both paths and is never repaired. A sample of parser-read rows is also given to the
    judge, to estimate how often the judge is right. Writes `{model}_{study}_structured.csv` for R, with the
    research group's column names first.
    """
    part = common.partition(context)
    study = part.study
    # The gate holds for this asset too when it is materialized in a later run than the responses.
    verdict = gate.verdict(context.instance, exp1_responses.key, context.partition_key, RESPONSES_BLOCKING)
    if not verdict.usable:
        raise Failure(f"exp1/responses {part.label} is not usable: {verdict.status}")
    responses = storage.read_table(responses_path(storage, part))
    # A person's readings are checked whole before anything is asked or written: a bad file changes nothing.
    reviewed_csv = reviewed_path(storage, part.model, study.name)
    review = review_queue.read_reviewed(study, reviewed_csv, responses)
    judge_model = llm.registry().get(settings.judge_model)
    if judge_model.kind != "instruct":
        raise ValueError(
            f"the judge model {judge_model.slug!r} is a base model; set settings.judge_model (or GRACE_JUDGE_MODEL) "
            "to an instruct model of the registry (see `grace models`)"
        )

    rows = {(getattr(r, ID_COLUMN), int(r.sample)): r for r in responses.itertuples(index=False)}
    readings = {row_id: _parser_readings(study, row) for row_id, row in rows.items()}
    parsed = [row_id for row_id, turns in readings.items() if all(e and e.method == "parser" for e in turns.values())]
    audited = audit_sample(parsed, settings.judge_audit_size, settings.seed)

    jobs, key_of = {}, {}
    for row_id, turns in readings.items():
        wanted = [key for key, e in turns.items() if e is None or row_id in audited]
        prompts = dict(zip([t.key for t in study.exp1_turns], study.exp1_prompts(rows[row_id])))
        for turn in study.exp1_turns:
            if turn.key in wanted:
                seed = common.trial_seed(settings.seed, f"{row_id[0]}/{row_id[1]}/{turn.key}")
                task = JudgeTask(turn, prompts[turn.key], getattr(rows[row_id], f"response_{turn.key}"), seed)
                messages = extraction.judge_messages(
                    turn.answer, turn.task, task.question, task.reply, judge_model.structured_output
                )
                key = model_request_key(JUDGE_METHOD, judge_model, messages, settings.judge_max_attempts, task.seed)
                jobs[key], key_of[(row_id, turn.key)] = task, key

    def make_ask(client, _checkpoint):
        async def ask(task: JudgeTask):
            turn = task.turn
            found = await extraction.judge(
                client,
                turn.answer,
                turn.task,
                task.question,
                task.reply,
                settings.judge_max_attempts,
                task.seed,
                judge_model.structured_output,
            )
            return found.record()

        return ask

    outcome = run_checkpointed(context, storage, llm, "exp1-judge", part, judge_model, jobs, make_ask)

    def judged(row_id, turn_key) -> extraction.Extraction:
        return extraction.Extraction.from_record(outcome.records[key_of[(row_id, turn_key)]])

    columns = study.answer_dtypes
    fields = list(study.answer.model_fields)
    table_rows = []
    for row_id, turns in readings.items():
        final, detail = extraction.combine(
            study.answer, {key: e if e is not None else judged(row_id, key) for key, e in turns.items()}
        )
        judge_reading, audit = None, None
        if row_id in audited:
            audit_reading, _ = extraction.combine(study.answer, {key: judged(row_id, key) for key in turns})
            audit, judge_reading = _audit_verdict(audit_reading, final), _judge_reading(audit_reading, fields)
        elif any(e is None for e in turns.values()):
            judge_reading = _judge_reading(final, fields)
        human = review.readings.get(row_id)
        reading = final if human is None else _human_extraction(human)
        table_rows.append(
            {
                ID_COLUMN: row_id[0],
                "sample": row_id[1],
                **{c: (reading.values or {}).get(c) for c in columns},
                "extraction": reading.method,
                "extraction_detail": detail,
                "failure_reason": reading.reason if reading.method == "failed" else None,
                "judge_attempts": final.attempts,
                "judge_audit": audit,
                "judge_reading": judge_reading,
                "machine_extraction": final.method,
                "machine_reading": review_queue.format_reading(study, final.values),
                "machine_reason": final.reason if final.method == "failed" else None,
                "reviewer": human.reviewer if human else None,
                "review_note": human.note if human else None,
            }
        )
    turn_columns = [f"{kind}_{t.key}" for t in study.exp1_turns for kind in ("response", "finish_reason")]
    keep = [*ROW, *[c for c in study.factor_columns if c in responses], *turn_columns]
    table = responses[keep].merge(pd.DataFrame(table_rows), on=ROW, how="left", validate="one_to_one")
    table = table.astype({**columns, **{c: "string" for c in TEXT_COLUMNS}})
    prompts = {(getattr(r, ID_COLUMN), int(r.sample)): study.exp1_prompts(r) for r in responses.itertuples(index=False)}
    queue = review_queue.queue(study, table, prompts, review)
    queue_csv = queue_path(storage, part)
    atomic_write(queue_csv, lambda tmp: queue.to_csv(tmp, index=False))

    csv = storage.path("csv", f"{part.model}_{study.name}_structured.csv")
    parquet, _ = storage.write_table(table, structured_path(storage, part), csv, csv_names=study.csv_names)
    counts = ExtractionCounts.of(table)
    n = max(counts.rows, 1)
    accuracy = counts.judge_accuracy
    context.log.info(
        f"structured {part.label}: {counts.parser} parser, {counts.judge} judge, {counts.human} human, "
        f"{counts.failed} failed ({counts.judge_abstained} of them 'not answered' by the judge) of {counts.rows}; "
        f"review queue: {len(queue)} rows in {queue_csv}"
    )
    return MaterializeResult(
        metadata={
            **outcome.metadata(prefix="judge_"),
            "study": study.name,
            "rows": len(table),
            "extraction_rate": round(counts.rate, 4),
            "parser_share": round(counts.parser / n, 4),
            "judge_share": round(counts.judge / n, 4),
            "failed": counts.failed,
            "judge_not_answered": counts.judge_abstained,
            "judge_audited": counts.audited,
            "judge_accuracy": round(accuracy, 4) if accuracy is not None else "n/a (no row to audit)",
            "human_share": round(counts.human / n, 4),
            "review_queue": MetadataValue.path(str(queue_csv)),
            "review_queue_rows": len(queue),
            "review_queue_unreviewed": int((queue[review_queue.REVIEWER] == "").sum()),
            "reviewed_file": MetadataValue.path(str(reviewed_csv)) if review.sha256 else "none",
            "reviewed_file_sha256": review.sha256 or "none",
            "reviewed_rows": len(review.readings),
            "reviewers": MetadataValue.json(review.reviewers),
            "csv": MetadataValue.path(str(csv)),
            "csv_columns_for_r": MetadataValue.json(list(study.csv_names.values())),
            "parquet": MetadataValue.path(str(parquet)),
            "preview": MetadataValue.md(
                table[[ID_COLUMN, *columns, "extraction", "failure_reason"]].head(5).to_markdown(index=False)
            ),
        }
    )


def _parser_readings(study: Study, row) -> dict[str, extraction.Extraction | None]:
    """Each turn's reply as the parser reads it (None: only the judge can)."""
    return {
        turn.key: extraction.read_answer(
            turn.answer, turn.parse, getattr(row, f"response_{turn.key}"), getattr(row, f"finish_reason_{turn.key}")
        )
        for turn in study.exp1_turns
    }


def _judge_reading(found: extraction.Extraction, fields: list[str]) -> str:
    """What the judge read, to compare with a person's reading: the answer's fields as JSON, or why there is none."""
    if found.method != "failed":
        return json.dumps({f: found.values[f] for f in fields}, sort_keys=True)
    return extraction.NOT_ANSWERED if extraction.NOT_ANSWERED in (found.reason or "") else "failed"


def _human_extraction(human: review_queue.HumanReading) -> extraction.Extraction:
    if human.values is None:
        note = f": {human.note}" if human.note else ""
        return extraction.Extraction("failed", None, f"{extraction.NOT_ANSWERED} (reviewer {human.reviewer}{note})")
    return extraction.Extraction("human", human.values)


def _audit_verdict(audit: extraction.Extraction, parser: extraction.Extraction) -> str:
    """How the judge read a row the parser read: agree, disagree, not answered (it abstained), or failed."""
    if audit.method == "failed":
        return "not answered" if extraction.NOT_ANSWERED in (audit.reason or "") else "failed"
    return "agree" if audit.values == parser.values else "disagree"


def answers_comply_with_schema(table: pd.DataFrame, check: CheckContext) -> CheckOutcome:
    """Re-validates every stored answer against the study's schema, independently of how it was extracted, and its
    derived columns (study 2's utterance) against the fields they derive from."""
    fields = list(check.study.answer.model_fields)
    problems = []
    for row in table.itertuples(index=False):
        method = row.extraction
        values = {f: _plain(getattr(row, f)) for f in fields}
        if method in ("parser", "judge", "human"):
            valid, problem = extraction.validate(check.study.answer, values)
            computed = {f: _plain(getattr(row, f)) for f in check.study.answer.model_computed_fields}
            if valid is not None and any(valid[f] != v for f, v in computed.items()):
                problem = f"stored {computed} disagree with the answer's fields"
        elif method == "failed":
            stored = fields + list(check.study.answer.model_computed_fields)
            given = [f for f in stored if _plain(getattr(row, f)) is not None]
            problem = f"a failed row carries values in {given}" if given else None
            problem = problem or (None if _plain(row.failure_reason) else "a failed row without its reason")
        else:
            problem = f"unknown extraction method {method!r}"
        if problem:
            problems.append({ID_COLUMN: getattr(row, ID_COLUMN), "extraction": method, "problem": problem, **values})
    return CheckOutcome(
        passed=not problems,
        metadata={"rows": len(table), "violations": len(problems), "schema": check.study.answer.__name__},
        worst=pd.DataFrame(problems),
    )


def extraction_rate(table: pd.DataFrame, check: CheckContext) -> CheckOutcome:
    threshold = check.settings.min_extraction_rate
    counts = ExtractionCounts.of(table)
    reasons = table.loc[table["extraction"] == "failed", "failure_reason"].map(failure_kinds).explode().value_counts()
    return CheckOutcome(
        passed=counts.rows > 0 and counts.rate >= threshold,
        metadata={
            "extraction_rate": round(counts.rate, 4),
            "threshold": threshold,
            "rows": counts.rows,
            "by_parser": counts.parser,
            "by_judge": counts.judge,
            "failed": counts.failed,
            "failure_reasons": MetadataValue.json({str(k): int(v) for k, v in reasons.items()}),
        },
    )


def failure_kinds(reason: str) -> list[str]:
    """A failure reason's kinds without their details, to count them: "bets: the answer is outside the schema: Bet_0
    ... ; knowledge: not answered (judge: ...)" -> ["bets: the answer is outside the schema", "knowledge: not
    answered"]."""
    kinds = []
    for part in str(reason).split("; "):
        if part.startswith(extraction.NOT_ANSWERED):  # a reviewer's "no answer": counted by reviewer
            kinds.append(part.split(":")[0].rstrip(")") + ")")
            continue
        turn, _, rest = part.partition(": ")
        kinds.append(f"{turn}: {re.split(r'[:(]', rest, maxsplit=1)[0].strip()}" if rest else turn)
    return kinds


def judged_and_failed_rows(table: pd.DataFrame, _: CheckContext) -> CheckOutcome:
    listed = table[table["extraction"].isin(["judge", "failed"])]
    return CheckOutcome(
        passed=listed.empty,
        metadata={
            "judge": int((listed["extraction"] == "judge").sum()),
            "failed": int((listed["extraction"] == "failed").sum()),
        },
        worst=listed[[ID_COLUMN, "extraction", "extraction_detail", "failure_reason", *_responses(listed)]],
    )


def judge_agrees_with_parser(table: pd.DataFrame, check: CheckContext) -> CheckOutcome:
    """Schema-valid is not correct: on rows the parser read, how often does the judge read the same answer?"""
    threshold = check.settings.min_judge_accuracy
    counts = ExtractionCounts.of(table)
    accuracy = counts.judge_accuracy
    audit = table.dropna(subset=["judge_audit"])
    # Without audited rows the accuracy is unknown: fine when the judge decided nothing, a warning when it did.
    passed = counts.judge == 0 if accuracy is None else accuracy >= threshold
    return CheckOutcome(
        passed=passed,
        metadata={
            "judge_accuracy": round(accuracy, 4) if accuracy is not None else "unknown (no parser-read row audited)",
            "audited": counts.audited,
            "threshold": threshold,
            "rows_decided_by_judge": counts.judge,
        },
        worst=audit.loc[audit["judge_audit"] != "agree", [ID_COLUMN, "judge_audit", *_responses(audit)]],
    )


def judge_agrees_with_people(table: pd.DataFrame, check: CheckContext) -> CheckOutcome:
    """Where a researcher reviewed a row the judge also read, the judge's reading against the person's: the judge's
    accuracy on real labels, for this partition and for the model's partitions of every study. Once enough rows are
    reviewed, a judge below settings.min_judge_accuracy may not decide rows unreviewed: the partition is blocked
    until the rest of its judge-decided rows are reviewed (or the judge is replaced)."""
    threshold, minimum = check.settings.min_judge_accuracy, check.settings.min_reviewed_for_judge_accuracy
    fields = list(check.study.answer.model_fields)
    here = _judge_against_people(table, fields)
    everywhere = pd.concat(
        [_judge_against_people(t, list(STUDIES[s].answer.model_fields)) for s, t in check.model_tables.items()]
    )
    accuracy = here["agrees"].mean() if len(here) else None
    unreviewed = int(((table["machine_extraction"] == "judge") & table["reviewer"].isna()).sum())
    trusted = accuracy is None or len(here) < minimum or accuracy >= threshold
    return CheckOutcome(
        passed=trusted or unreviewed == 0,
        metadata={
            "compared_rows": len(here),
            "judge_accuracy_vs_people": round(float(accuracy), 4) if accuracy is not None else "n/a (none reviewed)",
            "model_compared_rows": len(everywhere),
            "model_judge_accuracy_vs_people": round(float(everywhere["agrees"].mean()), 4)
            if len(everywhere)
            else "n/a",
            "min_reviewed_rows": minimum,
            "threshold": threshold,
            "judge_decided_rows_unreviewed": unreviewed,
        },
        worst=here.loc[~here["agrees"], [ID_COLUMN, "judge_reading", "human_reading", "reviewer"]],
    )


def _judge_against_people(table: pd.DataFrame, fields: list[str]) -> pd.DataFrame:
    """Rows a person reviewed and the judge read, with the person's reading and whether the judge agrees."""
    rows = table[table["reviewer"].notna() & table["judge_reading"].notna()]
    human = [
        {f: _plain(getattr(r, f)) for f in fields} if r.extraction == "human" else None
        for r in rows.itertuples(index=False)
    ]
    judge = [None if j in (extraction.NOT_ANSWERED, "failed") else json.loads(j) for j in rows["judge_reading"]]
    return rows.assign(
        human_reading=[json.dumps(h, sort_keys=True) if h else extraction.NOT_ANSWERED for h in human],
        agrees=pd.Series([j == h for j, h in zip(judge, human)], index=rows.index, dtype=bool),
    )


def _responses(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c.startswith("response_")]


def _plain(value):
    """A table cell as the schema sees it: None for missing, Python ints for integers."""
    if value is None or value is pd.NA or (isinstance(value, float) and pd.isna(value)):
        return None
    return value.item() if hasattr(value, "item") else value


STRUCTURED_CHECKS = [
    table_check(
        exp1_structured.key,
        "answers_comply_with_schema",
        "Every extracted answer complies with the study's answer schema (ranges, allowed words, bets adding up to "
        "100); every failed row says why and carries no values.",
        structured_path,
        answers_comply_with_schema,
        blocking=True,
    ),
    table_check(
        exp1_structured.key,
        "extraction_rate_at_least_threshold",
        "The share of answers extracted (by parser or judge) is at least settings.min_extraction_rate.",
        structured_path,
        extraction_rate,
        blocking=True,
    ),
    table_check(
        exp1_structured.key,
        "judge_agrees_with_people",
        "Where a researcher reviewed a row the judge read, the judge's reading matches theirs at least "
        "settings.min_judge_accuracy of the time (once settings.min_reviewed_for_judge_accuracy rows are "
        "reviewed); a judge below that does not decide rows unreviewed.",
        structured_path,
        judge_agrees_with_people,
        blocking=True,
    ),
    table_check(
        exp1_structured.key,
        "judged_and_failed_rows",
        "Lists the answers that only the judge could read and those that failed, with the reasons.",
        structured_path,
        judged_and_failed_rows,
        blocking=False,
    ),
    table_check(
        exp1_structured.key,
        "judge_agrees_with_parser",
        "On a sample of answers the parser read, the judge read the same answer at least "
        "settings.min_judge_accuracy of the time (constrained decoding makes a weak judge valid, not right).",
        structured_path,
        judge_agrees_with_parser,
        blocking=False,
    ),
]
