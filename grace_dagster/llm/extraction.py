"""Structured extraction: a free-text answer turned into a study's answer schema.

A deterministic parser reads answers that follow the requested format. Only what it cannot read goes to a judge
model, which must answer in the schema's JSON (constrained decoding with `response_format: json_schema`); its JSON is
validated with pydantic and, when invalid, asked again with the validation error, at most a few times. What still
fails is recorded as a failed extraction with its reason, never guessed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ValidationError

from grace_dagster.llm.client import LLMClient

Method = Literal["parser", "judge", "failed"]
JUDGE_MAX_TOKENS = 200  # a schema's JSON is short; a judge running past this is rambling, and that is a failure


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
    """The parser's reading of an answer, or None when only a judge could read it.

    An answer cut off at the token limit is a failure, never a partial answer. An answer the parser reads but the
    schema refuses (a bet of 140, an unknown word) is a failure too: the participant answered outside the answer
    set, and a judge asked to fit it into the schema would only invent a valid answer.
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


def judge_messages(schema: type[BaseModel], task: str, text: str) -> list[dict[str, str]]:
    fields = "\n".join(
        f"- {name}: {field.description or field.annotation}" for name, field in schema.model_fields.items()
    )
    return [
        {
            "role": "user",
            "content": (
                f"{task}\n\nHere is the participant's reply:\n<<<\n{text.strip()}\n>>>\n\n"
                f"Extract the participant's answer as JSON with these fields:\n{fields}\n"
                "Use only what the reply says. Reply with the JSON object only."
            ),
        }
    ]


def response_format(schema: type[BaseModel]) -> dict:
    return {
        "type": "json_schema",
        "json_schema": {"name": schema.__name__, "schema": schema.model_json_schema(), "strict": True},
    }


async def judge(
    client: LLMClient, schema: type[BaseModel], task: str, text: str, max_attempts: int, seed: int
) -> Extraction:
    """Ask the judge (an instruct model) for the schema's JSON; retry with the validation error."""
    messages = judge_messages(schema, task, text)
    problems = []
    for attempt in range(1, max_attempts + 1):
        response = await client.chat(
            messages,
            response_format=response_format(schema),
            max_tokens=JUDGE_MAX_TOKENS,
            temperature=0.0,
            seed=seed + attempt,
        )
        choice = response.choices[0]
        content = choice.message.content or ""
        if choice.finish_reason == "length":
            problem = f"the JSON was cut off at {JUDGE_MAX_TOKENS} tokens"
        else:
            try:
                values, problem = validate(schema, json.loads(content))
            except json.JSONDecodeError as error:
                values, problem = None, f"not JSON ({error.msg})"
            if values is not None:
                return Extraction("judge", values, "; ".join(problems) or None, attempt)
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
