"""Experiment 1, structured: each free-text answer in the study's answer schema, with how it was read.

Meant to be materialized in the same run as the raw responses (the runner and the onboarding sensor select both),
so the responses' blocking checks stop it there; in a later run it asks the gate (`assets/gate.py`) itself. Its own
blocking checks stop the analysis in the same run, and the analysis's gate refuses a failed partition in any later
run.
"""

import hashlib
import sys
from dataclasses import dataclass

import pandas as pd
from dagster import AssetExecutionContext, Failure, MaterializeResult, MetadataValue, asset

from grace_dagster.assets import common, gate
from grace_dagster.assets.batches import model_request_key, run_checkpointed
from grace_dagster.assets.checks import CheckContext, CheckOutcome, table_check
from grace_dagster.assets.exp1 import EXP1_CHECKS, exp1_responses, responses_path
from grace_dagster.assets.partitions import model_study_partitions
from grace_dagster.llm import extraction
from grace_dagster.resources import LLMEndpoints, Storage
from grace_dagster.resources.settings import ExperimentSettings
from grace_dagster.studies import ID_COLUMN

CODE_VERSION = common.code_version(extraction, sys.modules[__name__])
RESPONSES_BLOCKING = gate.blocking_check_names(exp1_responses.key, EXP1_CHECKS)
METHOD_COLUMNS = ["extraction", "failure_reason", "judge_attempts", "judge_audit", "judge_audit_answer"]


def structured_path(storage: Storage, part: common.Partition):
    return storage.path("exp1", "structured", part.model, f"{part.study.name}.parquet")


@dataclass(frozen=True)
class ExtractionCounts:
    """How a structured table's answers were read: what the asset reports and its checks judge."""

    rows: int
    extracted: int
    parser: int
    judge: int
    failed: int
    audited: int
    agreed: int

    @classmethod
    def of(cls, table: pd.DataFrame) -> "ExtractionCounts":
        counts = table["extraction"].value_counts()
        audit = table["judge_audit"].dropna()
        return cls(
            rows=len(table),
            extracted=int((table["extraction"] != "failed").sum()),
            parser=int(counts.get("parser", 0)),
            judge=int(counts.get("judge", 0)),
            failed=int(counts.get("failed", 0)),
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


def audit_sample(trial_ids: list[str], size: int, seed: int) -> list[str]:
    """A fixed pseudo-random sample, so a rerun audits the same rows (and finds them in the checkpoint)."""
    return sorted(trial_ids, key=lambda t: hashlib.sha256(f"{seed}:{t}".encode()).hexdigest())[:size]


@asset(
    key=["exp1", "structured"],
    partitions_def=model_study_partitions,
    pool=common.ENDPOINT_POOL,
    deps=[exp1_responses],
    group_name="exp1",
    kinds={"python", "parquet"},
    code_version=CODE_VERSION,
)
def exp1_structured(
    context: AssetExecutionContext, storage: Storage, llm: LLMEndpoints, settings: ExperimentSettings
) -> MaterializeResult:
    """Each raw answer in the study's answer schema: read by a deterministic parser when it follows the requested
    format, otherwise by a judge model with JSON-schema-constrained decoding (validated, retried with the error),
    otherwise recorded as failed with its reason. A sample of parser-read rows is also given to the judge, to
    estimate how often the judge is right. Writes `{model}_{study}_structured.csv` for R.
    """
    part = common.partition(context)
    study = part.study
    # The gate holds for this asset too when it is materialized in a later run than the responses.
    verdict = gate.verdict(context.instance, exp1_responses.key, context.partition_key, RESPONSES_BLOCKING)
    if not verdict.usable:
        raise Failure(f"exp1/responses {part.label} is not usable: {verdict.status}")
    responses = storage.read_table(responses_path(storage, part))
    judge_model = llm.registry().get(settings.judge_model)
    if judge_model.kind != "instruct":
        raise ValueError(
            f"the judge model {judge_model.slug!r} is a base model; set settings.judge_model (or GRACE_JUDGE_MODEL) "
            "to an instruct model of the registry (see `grace models`)"
        )

    readings: dict[str, extraction.Extraction | None] = {
        getattr(row, ID_COLUMN): extraction.read_answer(
            study.answer, study.parse_answer, row.response, row.finish_reason
        )
        for row in responses.itertuples(index=False)
    }
    texts = dict(zip(responses[ID_COLUMN], responses["response"]))
    to_judge = [t for t, reading in readings.items() if reading is None]
    parsed = [t for t, reading in readings.items() if reading is not None and reading.method == "parser"]
    audited = audit_sample(parsed, settings.judge_audit_size, settings.seed)

    jobs, key_of = {}, {}
    for trial_id in to_judge + audited:
        payload = (texts[trial_id], common.trial_seed(settings.seed, trial_id))
        messages = extraction.judge_messages(study.answer, study.answer_task, payload[0])
        key = model_request_key(
            "exp1-judge", CODE_VERSION, judge_model, messages, settings.judge_max_attempts, payload[1]
        )
        jobs[key], key_of[trial_id] = payload, key

    def make_ask(client):
        async def ask(payload):
            text, seed = payload
            found = await extraction.judge(
                client, study.answer, study.answer_task, text, settings.judge_max_attempts, seed
            )
            return found.record()

        return ask

    outcome = run_checkpointed(context, storage, llm, "exp1-judge", part, judge_model, jobs, make_ask)
    judged = {t: extraction.Extraction.from_record(outcome.records[key_of[t]]) for t in key_of}

    columns = study.answer_dtypes
    rows = []
    for trial_id, reading in readings.items():
        final = judged[trial_id] if reading is None else reading
        audit = judged.get(trial_id) if reading is not None else None
        rows.append(
            {
                ID_COLUMN: trial_id,
                **{c: (final.values or {}).get(c) for c in columns},
                "extraction": final.method,
                "failure_reason": final.reason if final.method == "failed" else None,
                "judge_attempts": final.attempts,
                "judge_audit": None if audit is None else _audit_verdict(audit, reading),
                "judge_audit_answer": None if audit is None else str(audit.values or audit.reason),
            }
        )
    keep = [ID_COLUMN, *[c for c in study.factor_columns if c in responses], "response", "finish_reason"]
    table = responses[keep].merge(pd.DataFrame(rows), on=ID_COLUMN, how="left", validate="one_to_one")
    table = table.astype({**columns, "extraction": "string", "failure_reason": "string", "judge_audit": "string"})

    csv = storage.path("csv", f"{part.model}_{study.name}_structured.csv")
    parquet, _ = storage.write_table(table, structured_path(storage, part), csv)
    counts = ExtractionCounts.of(table)
    n = max(counts.rows, 1)
    accuracy = counts.judge_accuracy
    context.log.info(
        f"structured {part.label}: {counts.parser} parser, {counts.judge} judge, "
        f"{counts.failed} failed of {counts.rows}"
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
            "judge_audited": counts.audited,
            "judge_accuracy": round(accuracy, 4) if accuracy is not None else "n/a (no row to audit)",
            "csv": MetadataValue.path(str(csv)),
            "parquet": MetadataValue.path(str(parquet)),
            "preview": MetadataValue.md(
                table[[ID_COLUMN, *columns, "extraction", "failure_reason"]].head(5).to_markdown(index=False)
            ),
        }
    )


def _audit_verdict(audit: extraction.Extraction, parser: extraction.Extraction) -> str:
    if audit.method == "failed":
        return "failed"
    return "agree" if audit.values == parser.values else "disagree"


def answers_comply_with_schema(table: pd.DataFrame, check: CheckContext) -> CheckOutcome:
    """Re-validates every stored answer against the study's schema, independently of how it was extracted, and its
    derived columns (study 2's utterance) against the fields they derive from."""
    fields = list(check.study.answer.model_fields)
    problems = []
    for row in table.itertuples(index=False):
        method = row.extraction
        values = {f: _plain(getattr(row, f)) for f in fields}
        if method in ("parser", "judge"):
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
    reasons = table.loc[table["extraction"] == "failed", "failure_reason"].str.split(":").str[0].value_counts()
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


def judged_and_failed_rows(table: pd.DataFrame, _: CheckContext) -> CheckOutcome:
    listed = table[table["extraction"].isin(["judge", "failed"])]
    return CheckOutcome(
        passed=listed.empty,
        metadata={
            "judge": int((listed["extraction"] == "judge").sum()),
            "failed": int((listed["extraction"] == "failed").sum()),
        },
        worst=listed[[ID_COLUMN, "extraction", "failure_reason"]].assign(response=listed["response"].str.slice(0, 160)),
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
        worst=audit.loc[audit["judge_audit"] != "agree", [ID_COLUMN, "judge_audit", "judge_audit_answer", "response"]],
    )


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
