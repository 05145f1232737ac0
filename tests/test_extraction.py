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
from tests.judge_labels import NOT_ANSWERED, load_labels

STUDY1, STUDY2 = STUDIES["study1"], STUDIES["study2"]


TURNS = {turn.key: turn for study in STUDIES.values() for turn in study.exp1_turns}


def read(turn_key, text, finish_reason="stop"):
    turn = TURNS[turn_key]
    return extraction.read_answer(turn.answer, turn.parse, text, finish_reason)


@pytest.mark.parametrize(
    ("turn", "text", "expected"),
    [
        ("prior", "2", {"Prior_A": 2}),
        ("prior", "Two.", {"Prior_A": 2}),
        ("prior", "**Prior:** 2 of the 3 seeds", {"Prior_A": 2}),
        ("prior", "None of them.", {"Prior_A": 0}),
        ("bets", "0: 10, 1: 20, 2: 50, 3: 20", {"Bet_0": 10, "Bet_1": 20, "Bet_2": 50, "Bet_3": 20}),
        ("bets", "**Bets:** 0: $10, 1: $20, 2: $50, 3: $20", {"Bet_0": 10, "Bet_1": 20, "Bet_2": 50, "Bet_3": 20}),
        ("knowledge", "No.", {"Knowledge_A": "no"}),
        ("knowledge", "No, he doesn't know exactly.", {"Knowledge_A": "no"}),
        ("knowledge", "Yes, he knows exactly how many.", {"Knowledge_A": "yes"}),
        ("knowledge", "No, the speaker doesn't know exactly.", {"Knowledge_A": "no"}),
        # Real replies of the local models.
        ("knowledge", "No, Omar doesn't actually know how many of the 3 bulbs have bloomed.", {"Knowledge_A": "no"}),
        ("knowledge", "No, I don't think Priya does.", {"Knowledge_A": "no"}),
        ("knowledge", "No, I don't think so.", {"Knowledge_A": "no"}),
        (
            "bets",
            "Here are my bets:\n0: $5\n1: $10\n2: $60\n3: $25\nTotal: $100",
            {"Bet_0": 5, "Bet_1": 10, "Bet_2": 60, "Bet_3": 25},
        ),
    ],
)
def test_study1_turn_parsers_read_the_requested_formats(turn, text, expected):
    found = read(turn, text)
    assert found.method == "parser" and found.values == expected


@pytest.mark.parametrize(
    ("turn", "text"),
    [
        ("prior", "I think there are probably 2 of them."),  # the number is not the reply's answer
        ("prior", "2, or maybe 3"),  # two answers
        ("bets", "Mostly on 2, some on 3."),  # no bets in the format
        ("bets", "0: 10, 0: 20, 1: 20, 2: 50, 3: 20"),  # two bets on one state
        ("bets", "0: <dollars>, 1: <dollars>, 2: <dollars>, 3: <dollars>"),  # the template echoed
        ("knowledge", "Yes and no."),
        ("knowledge", "I can't tell."),
        # A reason after the answer: it rarely changes the answer, but the parser cannot tell when it does.
        ("prior", "Two. Seeds usually sprout when they are watered."),
        ("prior", "3\n\nScratch that."),
        ("bets", "0:0, 1:0, 2:100, 3:0 - he said two."),
        ("bets", "0: 10, 1: 20, 2: 50, 3: 20 (in hundreds)"),
        ("knowledge", "Yes, he looked at all of them."),
        ("knowledge", "Yes, he lacks information."),
        ("knowledge", "No, he's fully informed."),
        ("knowledge", "No, he doesn't know how many but he knows it's two"),
        # An answer's word that does not give the answer, or an answer the rest of the reply qualifies or takes back.
        ("prior", "One can't know."),
        ("prior", "None of us can know."),
        ("prior", "2 or more"),
        ("prior", "2+"),
        ("prior", "Two, or maybe all."),
        ("prior", "3 is unlikely."),
        ("prior", "2, but I'm really not sure."),
        ("prior", "1. Seeds usually sprout when watered.\nSo probably most of them."),  # a numbered list
        ("prior", "2. Actually no, fewer."),
        ("bets", "0: 10-20, 1: 20, 2: 50, 3: 20"),
        ("bets", "0: 10 (maybe 15), 1: 20, 2: 50, 3: 20"),
        ("bets", "I can't bet. An example of the format would be 0: 25, 1: 25, 2: 25, 3: 25."),
        ("bets", "0: 10, 1: 20, 2: 50, 3: 20 - wait, that's wrong, let me redo it."),
        ("bets", "0: 10%, 1: 20%, 2: 50%, 3: 20%"),
        ("knowledge", "No, I cannot provide a number directly. You can ask for help."),  # a local model's refusal
        ("knowledge", "No, I don't think I know."),
        ("knowledge", "No idea."),
        ("knowledge", "No doubt he knows."),
        ("knowledge", "No, he knows exactly."),
        ("knowledge", "No. I can't tell."),
        ("knowledge", "Yes. Actually, he doesn't know exactly."),
        ("knowledge", "Yes, unless he lied."),
        ("knowledge", "Yes.\n\nNote: she only looked at 2, so she can't know exactly."),
    ],
)
def test_study1_unreadable_or_ambiguous_replies_go_to_the_judge(turn, text):
    assert read(turn, text) is None


@pytest.mark.parametrize(
    ("turn", "text", "reason"),
    [
        ("bets", "0: 140, 1: 0, 2: 0, 3: 0", "Bet_0: Input should be less than or equal to 100"),
        ("bets", "0: 10, 1: 20, 2: 40, 3: 20", "add up to 90"),
        ("prior", "7", "Prior_A: Input should be less than or equal to 3"),
        ("prior", "2.5", "Prior_A: Input should be a valid integer"),
    ],
)
def test_study1_replies_outside_the_schema_fail_with_the_reason_and_never_reach_the_judge(turn, text, reason):
    found = read(turn, text)
    assert found.method == "failed" and reason in found.reason and found.values is None


JUDGE = "judge"
# The study 2 parser reads a reply only where the utterance is unambiguous; everything else goes to the judge.
POLARITY_TABLE = [
    ("It wasn't bad.", "It wasn't bad"),
    ("It was not bad", "It wasn't bad"),
    ("It wasn’t terrible", "It wasn't terrible"),  # curly apostrophe
    ("“It was amazing!”", "It was amazing"),  # curly quotes around the whole reply
    ("**It wasn't terrible.** Ann wants to be kind.", "It wasn't terrible"),
    ("Answer: It was bad", "It was bad"),
    ("It was good.\nShe wants to be encouraging.", "It was good"),
    ('Ann would say "It wasn\'t bad."', "It wasn't bad"),
    ('She would probably say: "It was good." to be nice', "It was good"),
    ("Ann would say “It wasn’t amazing”.", "It wasn't amazing"),
    ("I wouldn't say it was amazing", JUDGE),  # negated
    ("It would be rude to say it was terrible", JUDGE),  # embedded
    ('Instead of "it was bad", something gentler', JUDGE),  # quoted, but as what not to say
    ('Ann wouldn\'t say "It was amazing."', JUDGE),
    ("It was good, but not amazing", JUDGE),  # hedged
    ("It was good, I guess.", JUDGE),
    ("It was very good.", JUDGE),  # extra words inside the utterance
    ("It was good. Actually, it wasn't good.", JUDGE),  # several utterances
    ('She could say "It was bad" or "It wasn\'t good".', JUDGE),  # two quoted spans
    ("Either it was bad or it wasn't terrible.", JUDGE),
    ("Ann would praise the poem.", JUDGE),  # no utterance at all
    ("She would tell him it was amazing.", JUDGE),  # reported, not the reply's own answer
    ("If I were Ann: it wasn't bad.", JUDGE),
    ("It was amazing! No - she'd never say that.", JUDGE),  # taken back after the utterance
    ("It was good. Or rather, bad.", JUDGE),
    ("It was amazing. Just kidding. Terrible.", JUDGE),
    ("It was amazing. NOT.", JUDGE),
    ("It was good. Probably.", JUDGE),
    ("It was good*\n*if she is being kind; otherwise terrible.", JUDGE),  # a footnote
    ("It was not.", JUDGE),  # incomplete, not an answer outside the set
    ('Ann would refuse to say "It was amazing."', JUDGE),  # quoted as what is not said
    ('Ann is too honest to say "It was amazing."', JUDGE),
    ('It would be cruel to say "It was terrible."', JUDGE),
    ('Nobody would say "It was terrible."', JUDGE),
    ('Ann would say "It was good" if she wanted to be nice, but she would not.', JUDGE),
    ('Ann would reply "It was good", or maybe amazing.', JUDGE),
    ("It was good. Nah.", JUDGE),
    ("It was good. I take it back.", JUDGE),
    ('Don\'t say "It was terrible." That would hurt Ann.', JUDGE),
    ('Never say "It was good."', JUDGE),
    ('I\'d say "It was good."', "It was good"),
]


def test_study2_parser_reads_only_unambiguous_utterances_and_never_flips_polarity():
    flips, wrong = [], []
    for text, expected in POLARITY_TABLE:
        found = read("utterance", text)
        got = JUDGE if found is None else found.values["utterance"]
        if got != expected:
            wrong.append((text, expected, got))
        if JUDGE not in (got, expected) and ("wasn't" in got) != ("wasn't" in expected):
            flips.append(text)
    assert len(POLARITY_TABLE) >= 20 and not flips and not wrong


def test_study2_words_outside_the_answer_set_fail_with_the_word_named():
    fantastic = read("utterance", "It was fantastic!")
    assert fantastic.method == "failed" and "'fantastic'" in fantastic.reason


def test_truncated_and_empty_answers_are_failures_not_partial_answers():
    cut = read("utterance", "It was good and", finish_reason="length")
    assert cut.method == "failed" and "max_tokens" in cut.reason
    assert read("utterance", "   ").reason == "empty answer"


def test_a_trial_fails_when_one_turn_fails_and_the_reason_names_the_turn():
    prior, bets, knowledge = read("prior", "2"), read("bets", "0: 10, 1: 20, 2: 40, 3: 20"), read("knowledge", "No")
    found, detail = extraction.combine(STUDY1.answer, {"prior": prior, "bets": bets, "knowledge": knowledge})
    assert found.method == "failed" and found.reason.startswith("bets: the answer is outside the schema")
    assert detail == "prior: parser, bets: failed, knowledge: parser" and found.values is None
    whole, _ = extraction.combine(
        STUDY1.answer, {"prior": prior, "bets": read("bets", "0: 0, 1: 0, 2: 60, 3: 40"), "knowledge": knowledge}
    )
    assert whole.method == "parser" and whole.values["Bet_2"] == 60 and whole.values["Prior_A"] == 2


def test_judge_schema_offers_the_answer_or_an_explicit_not_answered():
    answered, not_answered = extraction.judge_schema(STUDY1.exp1_turns[1].answer)["anyOf"]
    assert answered["properties"]["answered"] == {"const": True} and answered["additionalProperties"] is False
    assert answered["properties"]["Bet_2"]["maximum"] == 100
    assert set(answered["required"]) == {"answered", "Bet_0", "Bet_1", "Bet_2", "Bet_3"}
    assert not_answered["properties"]["answered"] == {"const": False} and not_answered["required"] == [
        "answered",
        "reason",
    ]


def test_judge_readings_not_answered_and_outside_the_schema_are_failures_never_repaired():
    bets = STUDY1.exp1_turns[1].answer
    abstained, problem = extraction._reading(bets, '{"answered": false, "reason": "the reply gives no bets"}')
    assert problem is None and abstained.method == "failed"
    assert abstained.reason == "not answered (judge: the reply gives no bets)"
    ninety = '{"answered": true, "Bet_0": 10, "Bet_1": 20, "Bet_2": 40, "Bet_3": 20}'
    found, problem = extraction._reading(bets, ninety)
    assert problem is None and found.method == "failed" and "add up to 90" in found.reason
    # The parser path fails the same reading the same way.
    assert "add up to 90" in read("bets", "0: 10, 1: 20, 2: 40, 3: 20").reason
    _, malformed = extraction._reading(bets, '{"answered": true, "Bet_0": 10}')
    assert "missing fields" in malformed  # only a malformed reply is asked again


@pytest.mark.slow
def test_judge_on_the_real_embedded_model_returns_a_valid_reading_or_a_reasoned_failure(servers):
    """SmolLM2 as the local judge, through the real server's json_schema decoding and pydantic validation."""
    server = servers("smollm2-135m")
    cases = [
        (TURNS["utterance"], "What would Ann say?", "Well, Ann would tell him that it wasn't bad at all."),
        (TURNS["utterance"], "What would Ann say?", "I'd rather not answer that."),
        (TURNS["bets"], "Bet on 0, 1, 2, 3.", "Mostly 2, some 3."),
        (TURNS["prior"], "How many of the 3?", "I'd guess two of them."),
    ]

    async def ask():
        async with LLMClient(server.base_url, "SmolLM2-135M-Instruct") as client:
            return [
                (turn, await extraction.judge(client, turn.answer, turn.task, question, reply, 3, seed=1))
                for turn, question, reply in cases
            ]

    for turn, found in asyncio.run(ask()):
        assert 1 <= found.attempts <= 3
        if found.method == "judge":
            given = {name: found.values[name] for name in turn.answer.model_fields}
            assert extraction.validate(turn.answer, given)[0] == found.values
        else:
            assert found.method == "failed" and found.values is None and found.reason


def _check_context(study, **settings):
    return CheckContext(pd.DataFrame(), ExperimentSettings(**settings), study)


def _structured(rows: list[dict], study) -> pd.DataFrame:
    """A structured table with the asset's columns and dtypes (Int64 and string, with NA)."""
    columns = [*study.answer_dtypes, "extraction", "extraction_detail", "failure_reason", "judge_audit"]
    responses = [f"response_{turn.key}" for turn in study.exp1_turns]
    table = pd.DataFrame(rows).reindex(columns=["trial_id", *columns, *responses])
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


def test_hand_labelled_judge_fixture_is_real_hard_replies_with_valid_labels():
    """The fixture behind the judge's reported accuracy (benchmarks/bench_judge_accuracy.py): at least 40 replies of
    the local models that the parser cannot read, each label a valid reading of its turn or "not answered"."""
    labelled = load_labels()
    assert len(labelled) >= 40 and {row.model for row in labelled} == {"smollm2-135m", "gemma3-270m"}
    for row in labelled:
        assert row.turn.parse(row.reply) is None, f"{row.id}: the parser reads it; the fixture is for the judge"
        if row.label != NOT_ANSWERED:
            assert extraction.validate(row.turn.answer, row.label)[1] is None, row.id
    answered = [row for row in labelled if row.label != NOT_ANSWERED]
    assert 10 <= len(answered) < len(labelled)
