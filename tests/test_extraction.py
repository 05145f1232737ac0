"""Structured extraction: the studies' parsers and schemas, the judge against a real embedded model, and the
structured checks on stored tables."""

from __future__ import annotations

import asyncio

import pandas as pd
import pytest

from grace_dagster.assets.checks import CheckContext
from grace_dagster.assets.structured import answers_comply_with_schema, extraction_rate, judge_agrees_with_parser
from grace_dagster.llm import LLMClient, extraction
from grace_dagster.resources import ExperimentSettings
from grace_dagster.studies import STUDIES

STUDY1, STUDY2 = STUDIES["study1"], STUDIES["study2"]


def read(study, text, finish_reason="stop"):
    return extraction.read_answer(study.answer, study.parse_answer, text, finish_reason)


@pytest.mark.parametrize(
    "text",
    [
        "Prior: 2\nBets: 0: 10, 1: 20, 2: 50, 3: 20\nKnowledge: no",
        "**Prior:** 2\n**Bets:** 0: $10, 1: $20, 2: $50, 3: $20\n**Knowledge:** No.",
        "Sure! Prior = 2\nBets: 0:10, 1:20, 2:50, 3:20\nKnowledge: no\nI hope this helps.",
    ],
)
def test_study1_parser_reads_the_requested_format_and_its_variants(text):
    found = read(STUDY1, text)
    assert found.method == "parser"
    assert found.values == {"Prior_A": 2, "Bet_0": 10, "Bet_1": 20, "Bet_2": 50, "Bet_3": 20, "Knowledge_A": "no"}


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            "Prior: 2\nBets: 0: 140, 1: 0, 2: 0, 3: 0\nKnowledge: yes",
            "Bet_0: Input should be less than or equal to 100",
        ),
        ("Prior: 2\nBets: 0: 10, 1: 20, 2: 40, 3: 20\nKnowledge: yes", "add up to 90"),
        (
            "Prior: 7\nBets: 0: 25, 1: 25, 2: 25, 3: 25\nKnowledge: yes",
            "Prior_A: Input should be less than or equal to 3",
        ),
    ],
)
def test_study1_answers_outside_the_schema_fail_with_the_reason_and_never_reach_the_judge(text, reason):
    found = read(STUDY1, text)
    assert found.method == "failed" and reason in found.reason and found.values is None


@pytest.mark.parametrize(
    "text",
    [
        "I think there are 2 of them, and Jim probably doesn't know.",  # format not followed
        "Prior: 1\nPrior: 2\nBets: 0: 25, 1: 25, 2: 25, 3: 25\nKnowledge: yes",  # two different priors
        "Prior: <0-3>\nBets: 0: <dollars>, 1: <dollars>, 2: <dollars>, 3: <dollars>\nKnowledge: <yes or no>",
    ],
)
def test_study1_unreadable_or_ambiguous_answers_go_to_the_judge(text):
    assert read(STUDY1, text) is None


def test_study2_parser_normalizes_negation_and_refuses_words_outside_the_answer_set():
    assert read(STUDY2, "She would say: It wasn't bad.").values == {
        "polarity": "wasn't",
        "assessment": "bad",
        "utterance": "It wasn't bad",
    }
    assert read(STUDY2, "It was not very good, honestly.").values["utterance"] == "It wasn't good"
    assert read(STUDY2, "It’s a cake. It wasn’t terrible").values["utterance"] == "It wasn't terrible"
    fantastic = read(STUDY2, "It was fantastic!")
    assert fantastic.method == "failed" and "'fantastic'" in fantastic.reason
    assert read(STUDY2, "It was good. Well, it wasn't amazing.") is None  # two different utterances
    assert read(STUDY2, "Ann would praise the poem.") is None


def test_truncated_and_empty_answers_are_failures_not_partial_answers():
    cut = read(STUDY2, "It was good and", finish_reason="length")
    assert cut.method == "failed" and "max_tokens" in cut.reason
    assert read(STUDY2, "   ").reason == "empty answer"


def test_judge_schema_is_strict_json_schema_with_the_study_bounds():
    schema = extraction.response_format(STUDY1.answer)["json_schema"]["schema"]
    assert schema["properties"]["Bet_2"]["maximum"] == 100 and schema["additionalProperties"] is False
    assert set(schema["required"]) == set(STUDY1.answer.model_fields)
    assert extraction.response_format(STUDY2.answer)["json_schema"]["schema"]["properties"]["assessment"]["enum"] == [
        "terrible",
        "bad",
        "good",
        "amazing",
    ]


@pytest.mark.slow
def test_judge_on_the_real_embedded_model_returns_schema_valid_answers_or_a_reasoned_failure(servers):
    """SmolLM2 as the local judge, through the real server's json_schema decoding and pydantic validation."""
    server = servers("smollm2-135m")
    answers = {
        STUDY2: ["Well, Ann would tell him that it wasn't bad at all.", "Bob's poem? She'd call it amazing."],
        STUDY1: ["I'd guess two of them sprouted before the call. After it, mostly 2, some 3. He doesn't know."],
    }

    async def ask():
        async with LLMClient(server.base_url, "SmolLM2-135M-Instruct") as client:
            return [
                (study, await extraction.judge(client, study.answer, study.answer_task, text, 3, seed=1))
                for study, texts in answers.items()
                for text in texts
            ]

    for study, found in asyncio.run(ask()):
        assert 1 <= found.attempts <= 3
        if found.method == "judge":
            given = {name: found.values[name] for name in study.answer.model_fields}
            assert extraction.validate(study.answer, given)[0] == found.values
        else:
            assert found.method == "failed" and "attempt 1:" in found.reason and found.values is None


def _check_context(study, **settings):
    return CheckContext(pd.DataFrame(), ExperimentSettings(**settings), study)


def _structured(rows: list[dict], study) -> pd.DataFrame:
    """A structured table with the asset's columns and dtypes (Int64 and string, with NA)."""
    columns = [*study.answer_dtypes, "extraction", "failure_reason", "judge_audit", "judge_audit_answer"]
    table = pd.DataFrame(rows).reindex(columns=["trial_id", *columns, "response"])
    return table.astype(
        {**study.answer_dtypes, **{c: "string" for c in ("extraction", "failure_reason", "judge_audit")}}
    )


def test_schema_check_refuses_stored_answers_that_violate_the_schema():
    good = {"Prior_A": 1, "Bet_0": 25, "Bet_1": 25, "Bet_2": 25, "Bet_3": 25, "Knowledge_A": "yes"}
    rows = [
        {"trial_id": "t1", **good, "extraction": "parser"},
        {"trial_id": "t2", **good, "Bet_0": 140, "Bet_1": 0, "Bet_2": 0, "Bet_3": 0, "extraction": "judge"},
        {"trial_id": "t3", **good, "Bet_3": 15, "extraction": "parser"},
        {"trial_id": "t4", "extraction": "failed"},
    ]
    outcome = answers_comply_with_schema(_structured(rows, STUDY1), _check_context(STUDY1))
    assert not outcome.passed and outcome.metadata["violations"] == 3
    problems = dict(zip(outcome.worst["trial_id"], outcome.worst["problem"]))
    assert "less than or equal to 100" in problems["t2"] and "add up to 90" in problems["t3"]
    assert "without its reason" in problems["t4"]

    words = [
        {
            "trial_id": "t1",
            "polarity": "was",
            "assessment": "fantastic",
            "utterance": "It was fantastic",
            "extraction": "judge",
        },
        {
            "trial_id": "t2",
            "polarity": "was",
            "assessment": "good",
            "utterance": "It wasn't terrible",
            "extraction": "parser",
        },
        {"trial_id": "t3", "utterance": "It was good", "extraction": "failed", "failure_reason": "empty answer"},
        {
            "trial_id": "t4",
            "polarity": "wasn't",
            "assessment": "bad",
            "utterance": "It wasn't bad",
            "extraction": "parser",
        },
    ]
    outcome = answers_comply_with_schema(_structured(words, STUDY2), _check_context(STUDY2))
    problems = dict(zip(outcome.worst["trial_id"], outcome.worst["problem"]))
    assert not outcome.passed and set(problems) == {"t1", "t2", "t3"}
    assert "assessment" in problems["t1"] and "disagree" in problems["t2"] and "utterance" in problems["t3"]


def test_extraction_rate_check_uses_the_configured_threshold():
    rows = [{"trial_id": f"t{i}", "extraction": "parser" if i < 9 else "failed"} for i in range(10)]
    table = _structured(rows, STUDY2).assign(failure_reason=["" if i < 9 else "empty answer" for i in range(10)])
    assert not extraction_rate(table, _check_context(STUDY2)).passed  # 90% < the default 95%
    outcome = extraction_rate(table, _check_context(STUDY2, min_extraction_rate=0.9))
    assert outcome.passed and outcome.metadata["extraction_rate"] == 0.9


def test_judge_accuracy_warns_below_threshold_and_when_it_cannot_be_estimated():
    audited = [
        {"trial_id": f"t{i}", "extraction": "parser", "judge_audit": "agree" if i < 7 else "disagree"}
        for i in range(10)
    ]
    outcome = judge_agrees_with_parser(_structured(audited, STUDY2), _check_context(STUDY2))
    assert not outcome.passed and outcome.metadata["judge_accuracy"] == 0.7 and len(outcome.worst) == 3
    assert judge_agrees_with_parser(_structured(audited, STUDY2), _check_context(STUDY2, min_judge_accuracy=0.7)).passed
    unaudited = [{"trial_id": "t1", "extraction": "judge"}]
    assert not judge_agrees_with_parser(_structured(unaudited, STUDY2), _check_context(STUDY2)).passed
