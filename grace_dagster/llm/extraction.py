"""Structured extraction: a free-text reply turned into the fields of a study's answer schema.

A deterministic parser reads replies that give the answer unambiguously. Only what it cannot read goes to a judge
model, which answers in JSON constrained by a schema (`response_format: json_schema`) with two shapes: the answer's
fields, or an explicit "not answered" with its reason, so a refusal or a partial reply is never forced into a
made-up answer. A reading that breaks the answer schema (bets adding up to 90, a bet of 140) is a failed extraction
on both paths, never repaired: the participant did not give a valid answer. The judge is asked again, with the
problem, only when its output is malformed (cut off, not JSON, neither shape).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ValidationError

from grace_dagster.llm.client import LLMClient

# human: a researcher's reading from the review file (grace_dagster/studies/review.py), overriding the machine's.
StructuredOutput = Literal["json_schema", "json_object"]
Method = Literal["parser", "judge", "human", "failed"]
JUDGE_MAX_TOKENS = 200  # a schema's JSON is short; a judge running past this is rambling, and that is a failure
NOT_ANSWERED = "not answered"  # how a failure reason starts when no answer was found in the reply
JUDGE_NOT_ANSWERED = f"{NOT_ANSWERED} (judge"
REASON_MAX_LENGTH = 160


@dataclass(frozen=True)
class Extraction:
    method: Method
    values: dict | None  # the answer's fields (computed ones included) when extracted
    reason: str | None = None  # why it failed, or what the judge got wrong before it succeeded
    attempts: int = 0  # judge requests made

    def record(self) -> dict:
        return {"method": self.method, "values": self.values, "reason": self.reason, "attempts": self.attempts}

    @classmethod
    def from_record(cls, record: dict) -> Extraction:
        return cls(record["method"], record["values"], record["reason"], record["attempts"])


def describe_errors(error: ValidationError) -> str:
    """Validation errors as one line a person (or a judge being retried) can act on."""
    parts = []
    for item in error.errors(include_url=False):
        where = ".".join(str(p) for p in item["loc"]) or "answer"
        given = f" (got {item['input']!r})" if item["loc"] and not isinstance(item["input"], dict) else ""
        parts.append(f"{where}: {item['msg']}{given}")
    return "; ".join(parts)


def validate(schema: type[BaseModel], values: dict) -> tuple[dict | None, str | None]:
    """(the validated answer with computed fields, None) or (None, what is wrong)."""
    try:
        return schema.model_validate(values).model_dump(mode="json"), None
    except ValidationError as error:
        return None, describe_errors(error)


def read_answer(
    schema: type[BaseModel], parse: Callable[[str], dict | None], text: str | None, finish_reason: str | None
) -> Extraction | None:
    """The parser's reading of a reply, or None when only a judge could read it.

    A reply cut off at the token limit is a failure, never a partial answer. A reply the parser reads but the schema
    refuses (a bet of 140, an unknown word) is a failure too: the participant answered outside the answer set, and
    a judge asked to fit it into the schema would only invent a valid answer.
    """
    if finish_reason == "length":
        return Extraction("failed", None, "the answer was cut off at max_tokens (finish_reason 'length')")
    if not isinstance(text, str) or not text.strip():
        return Extraction("failed", None, "empty answer")
    parsed = parse(text)
    if parsed is None:
        return None
    values, problem = validate(schema, parsed)
    if problem:
        return Extraction("failed", None, f"the answer is outside the schema: {problem}")
    return Extraction("parser", values)


def combine(schema: type[BaseModel], turns: dict[str, Extraction]) -> tuple[Extraction, str]:
    """One trial's answer from its turns' extractions, and a line saying how each turn was read.

    The trial is failed when any turn failed (its reason names the turn); otherwise the turns' fields together must
    satisfy the whole answer schema. It was read by the judge when any turn was.
    """
    detail = ", ".join(f"{key}: {e.method}" for key, e in turns.items())
    attempts = sum(e.attempts for e in turns.values())
    failed = {key: e for key, e in turns.items() if e.method == "failed"}
    if failed:
        reason = "; ".join(f"{key}: {e.reason}" for key, e in failed.items())
        return Extraction("failed", None, reason, attempts), detail
    given = {k: v for e in turns.values() for k, v in (e.values or {}).items() if k in schema.model_fields}
    values, problem = validate(schema, given)
    if problem:
        return Extraction("failed", None, f"the answer is outside the schema: {problem}", attempts), detail
    method = "judge" if any(e.method == "judge" for e in turns.values()) else "parser"
    reasons = "; ".join(f"{key}: {e.reason}" for key, e in turns.items() if e.reason)
    return Extraction(method, values, reasons or None, attempts), detail


def judge_schema(answer: type[BaseModel]) -> dict:
    """The judge's two possible replies: {"answered": true, <the answer's fields>} or {"answered": false, "reason"}."""
    fields = answer.model_json_schema()
    answered = {
        "type": "object",
        "properties": {"answered": {"const": True}, **fields["properties"]},
        "required": ["answered", *fields.get("required", [])],
        "additionalProperties": False,
    }
    not_answered = {
        "type": "object",
        "properties": {"answered": {"const": False}, "reason": {"type": "string", "maxLength": REASON_MAX_LENGTH}},
        "required": ["answered", "reason"],
        "additionalProperties": False,
    }
    return {"anyOf": [answered, not_answered]}


def judge_messages(
    answer: type[BaseModel], task: str, question: str, reply: str, shape: StructuredOutput = "json_schema"
) -> list[dict[str, str]]:
    fields = "\n".join(
        f"- {name}: {field.description or field.annotation}" for name, field in answer.model_fields.items()
    )
    # A server that enforces only "some JSON" is shown the schema to follow; one that enforces the schema is not.
    schema = (
        f"\nThe JSON must follow this JSON schema:\n{json.dumps(judge_schema(answer))}"
        if shape == "json_object"
        else ""
    )
    return [
        {
            "role": "user",
            "content": (
                f"{task}\n\nThe question the participant was asked:\n<<<\n{question.strip()}\n>>>\n\n"
                f"The participant's reply:\n<<<\n{reply.strip()}\n>>>\n\n"
                'If the reply gives the answer, write it as JSON: {"answered": true, ...} with these fields:\n'
                f"{fields}\n"
                "If the reply does not give the answer (it refuses, asks back, answers something else, gives several "
                'answers without choosing one, or gives only part of it), write {"answered": false, "reason": "<why, '
                'in a few words>"}.\n'
                "Use only what the reply says: never guess, complete or correct an answer. Reply with the JSON only."
                f"{schema}"
            ),
        }
    ]


def response_format(schema: dict, name: str, shape: StructuredOutput = "json_schema") -> dict:
    if shape == "json_object":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def _reading(answer: type[BaseModel], content: str) -> tuple[Extraction | None, str | None]:
    """The judge's output as an extraction, or (None, what is malformed) to ask again."""
    try:
        found = json.loads(content)
    except json.JSONDecodeError as error:
        return None, f"not JSON ({error.msg})"
    if not isinstance(found, dict) or not isinstance(found.get("answered"), bool):
        return None, 'expected an object with "answered": true or false'
    if found["answered"] is False:
        reason = str(found.get("reason") or "no reason given")[:REASON_MAX_LENGTH]
        return Extraction("failed", None, f"{JUDGE_NOT_ANSWERED}: {reason})"), None
    fields = {key: value for key, value in found.items() if key != "answered"}
    missing = [name for name in answer.model_fields if name not in fields]
    if missing:
        return None, f"missing fields {missing}"
    values, problem = validate(answer, fields)
    if problem:
        return Extraction("failed", None, f"the judge's reading is outside the schema: {problem}"), None
    return Extraction("judge", values), None


async def judge(
    client: LLMClient,
    answer: type[BaseModel],
    task: str,
    question: str,
    reply: str,
    max_attempts: int,
    seed: int,
    shape: StructuredOutput = "json_schema",
) -> Extraction:
    """Ask the judge (an instruct model) to read `reply`; ask again, with the problem, only if its output is
    malformed. `shape` is what the judge's server enforces (json_schema, or only json_object); the reply is
    validated with pydantic either way."""
    messages = judge_messages(answer, task, question, reply, shape)
    schema = judge_schema(answer)
    problems = []
    for attempt in range(1, max_attempts + 1):
        response = await client.chat(
            messages,
            response_format=response_format(schema, answer.__name__, shape),
            max_tokens=JUDGE_MAX_TOKENS,
            temperature=0.0,
            seed=seed + attempt,
        )
        choice = response.choices[0]
        content = choice.message.content or ""
        if choice.finish_reason == "length":
            found, problem = None, f"the JSON was cut off at {JUDGE_MAX_TOKENS} tokens"
        else:
            found, problem = _reading(answer, content)
        if found is not None:
            reason = "; ".join(problems)
            if found.method == "failed":
                reason = "; ".join(filter(None, [found.reason, reason]))
            return Extraction(found.method, found.values, reason or None, attempt)
        problems.append(f"attempt {attempt}: {problem}")
        messages = [
            *messages,
            {"role": "assistant", "content": content},
            {"role": "user", "content": f"That is not valid: {problem}. Reply with corrected JSON only."},
        ]
    return Extraction(
        "failed",
        None,
        f"the judge gave no valid answer in {max_attempts} attempts: " + " | ".join(problems),
        max_attempts,
    )
