"""Study 1: knowledge and implicature (Goodman & Stuhlmüller 2013).

A speaker has looked at some of three objects and reports what they saw, with a number ("Two of the ...", the
original experiment 2) or a quantifier ("Some of the ...", experiment 1). The participant says how many of the three
have the property before the utterance (prior), bets on each number after it (posterior), and says whether the
speaker knows exactly. As in the original experiment, the prior is asked before the utterance is shown: Experiment 1
is a conversation of three turns, each answered before the next is asked.
"""

from __future__ import annotations

import re
from typing import Literal

import matplotlib.pyplot as plt
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from grace_dagster.studies import analysis
from grace_dagster.studies.base import Analysis, AnalysisInput, Question, Study, Trial, Turn, user
from grace_dagster.studies.inputs import Column, int_in_range, one_of, text
from grace_dagster.studies.text import NAME, first_name_match, number_value, plain_reply

# --- Reading the trial: who speaks, what they looked at, what they report --------------------------------------------

_NUMBER_WORD = r"(?:zero|none|one|two|three|[0-3])"
_ACCESS = re.compile(rf"looked at ({_NUMBER_WORD}|all) of the\b", re.IGNORECASE)
# What the speaker reports: "Two of the seeds have sprouted", "Some of the seeds sprouted", "None of them has".
_REPORT = re.compile(r"\b(some|all|none|no|zero|one|two|three|[0-3])\s+of\s+(?:the|them|those|these)\b", re.IGNORECASE)
QUANTIFIERS = {"some": "some", "all": "all", "none": "none", "no": "none"}
_SPEECH_VERB = (
    r"(?:\w+ly\s+)?(?:says|said|tells?|tell's|told|calls|called|writes|wrote|texts|texted|reports|reported|"
    r"explains|replies|answers|adds|emails|phones|messages|mentions|shouts)\b"
)
_SPEAKER = re.compile(rf"(?=(?P<name>{NAME})\s+{_SPEECH_VERB})")
_QUOTE = re.compile(r"[\"“”«»]")
# "Now how many of the 3 seeds do you think have sprouted?" -> "how many of the 3 seeds" + "have sprouted"
_REFERENT = re.compile(r"how many\s+(.+?)\s+do you think\s+(.+?)\s*\?", re.IGNORECASE)


def _lead_in(speech: str) -> str:
    """The narration before the speaker's quoted words (all of it when nothing is quoted)."""
    return _QUOTE.split(speech, maxsplit=1)[0]


def _reported(speech: str) -> str | None:
    """The word the speaker reports with, lower case: a number word or digit, or a quantifier; None if none."""
    words = _REPORT.findall(_ACCESS.sub("", speech))
    return words[-1].lower() if words else None


def access_from_speech(row: dict[str, str]) -> int | None:
    """How many objects the speaker looked at ("I have looked at 2 of the 3 ..."); None when the text does not say."""
    match = _ACCESS.search(row.get("speech", ""))
    if not match:
        return None
    word = match.group(1).lower()
    return 3 if word == "all" else number_value(word)


def observed_from_speech(row: dict[str, str]) -> int | None:
    """The number the speaker reports ("Two of the jars have ..."); None for a quantifier or other wording."""
    word = _reported(row.get("speech", ""))
    value = number_value(word) if word and word not in QUANTIFIERS else None
    return value if isinstance(value, int) else None


def quantifier_from_speech(row: dict[str, str]) -> str | None:
    """The quantifier the speaker reports with (some, all, none); None for a number or other wording."""
    return QUANTIFIERS.get(_reported(row.get("speech", "")) or "")


def speaker_name(row: dict[str, str]) -> str | None:
    """The speaker's name as the narration gives it ("Jim tell's you on the phone: ..."); None when it gives none."""
    found = first_name_match(_SPEAKER, _lead_in(row.get("speech", "")), "name")
    return found[0] if found else None


def _referent(row: dict[str, str]) -> str | None:
    for question in (row.get("speechQ", ""), row.get("priorQ", "")):
        match = _REFERENT.search(question)
        if match:
            return f"how many {match.group(1)} {match.group(2)}"
    return None


def knowledge_question(row: dict[str, str]) -> str:
    """The knowledge question as the original experiment asked it ("Do you think Jim knows exactly how many of the 3
    seeds have sprouted?"), built from the speaker's name and the question's referent when the file has none."""
    who = speaker_name(row) or "the speaker"
    return f"Do you think {who} knows exactly {_referent(row) or 'how many there are'}?"


def knowledge_question_source(row: dict[str, str]) -> str:
    """Which wording a trial's knowledge question got: from the file, derived from its text, or generic."""
    if row.get("knowledgeQ", "").strip():
        return "file"
    return "derived" if speaker_name(row) else "generic"


# --- Experiment 1: three turns -----------------------------------------------------------------------------------

STATES = (0, 1, 2, 3)
BETS_FORMAT = "0: <dollars>, 1: <dollars>, 2: <dollars>, 3: <dollars>"


class PriorAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    Prior_A: int = Field(ge=0, le=3, description="before the utterance: how many of the 3 (0 to 3)")


class BetsAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    Bet_0: int = Field(ge=0, le=100, description="dollars bet on exactly 0 after the utterance")
    Bet_1: int = Field(ge=0, le=100, description="dollars bet on exactly 1 after the utterance")
    Bet_2: int = Field(ge=0, le=100, description="dollars bet on exactly 2 after the utterance")
    Bet_3: int = Field(ge=0, le=100, description="dollars bet on exactly 3 after the utterance")

    @model_validator(mode="after")
    def bets_sum_to_100(self) -> BetsAnswer:
        total = self.Bet_0 + self.Bet_1 + self.Bet_2 + self.Bet_3
        if total != 100:
            raise ValueError(f"the four bets must add up to 100 dollars; they add up to {total}")
        return self


class KnowledgeAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    Knowledge_A: Literal["yes", "no"] = Field(description="does the speaker know exactly how many (yes or no)")


class Answer(KnowledgeAnswer, BetsAnswer, PriorAnswer):
    """A structured Experiment 1 answer: the three turns' fields together (bases listed last-first: pydantic orders
    inherited fields from the last base)."""


def _first_answer(text: str, label: str, value: str) -> re.Match[str] | None:
    """The reply's leading answer, after an optional label such as "Prior:" or "Answer:"."""
    return re.match(rf"(?:(?:answer|{label})\s*[:=-]\s*)?(?P<value>{value})\b", plain_reply(text), re.IGNORECASE)


_TOTAL = re.compile(r"\b(?:out\s+)?of\s+(?:the\s+)?(?:3|three)\b", re.IGNORECASE)
_ANY_NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?|zero|none|one|two|three)\b", re.IGNORECASE)


def parse_prior(text: str) -> dict | None:
    """A reply that opens with the number ("2", "Two.", "Prior: 2 of the 3 seeds") and names no other number."""
    match = _first_answer(text, "prior", r"\d+(?:\.\d+)?|zero|none|one|two|three")
    if not match:
        return None
    value = number_value(match.group("value"))
    rest = _TOTAL.sub("", plain_reply(text)[match.end() :])
    if any(number_value(other) != value for other in _ANY_NUMBER.findall(rest)):
        return None  # "2, or maybe 3": the participant did not settle on one
    return {"Prior_A": value}


_BET = re.compile(r"(?<![\d.])(\d+)\s*[:=]\s*\$?\s*(\d+(?:\.\d+)?)")


def parse_bets(text: str) -> dict | None:
    """Bets given as "0: 10, 1: 20, 2: 50, 3: 20" (with or without $), each state once. Values are returned as
    read, even out of range or not adding up to 100, so the schema refuses them with the reason."""
    pairs = _BET.findall(plain_reply(text))
    bets: dict[str, str] = {}
    for state, dollars in pairs:
        if bets.setdefault(state, dollars) != dollars:
            return None  # two different bets on one state
    if set(bets) != {str(k) for k in STATES}:
        return None
    return {f"Bet_{k}": number_value(bets[str(k)]) for k in STATES}


def parse_knowledge(text: str) -> dict | None:
    """A reply that opens with yes or no and does not also say the other."""
    match = _first_answer(text, "knowledge", "yes|no")
    said = {word.lower() for word in re.findall(r"\b(yes|no)\b", plain_reply(text), re.IGNORECASE)}
    return {"Knowledge_A": match.group("value").lower()} if match and len(said) == 1 else None


TURNS = (
    Turn(
        "prior",
        PriorAnswer,
        parse_prior,
        "The participant read a story and was asked, before hearing from the speaker, how many of the 3 objects "
        "have the property: one number from 0 to 3.",
    ),
    Turn(
        "bets",
        BetsAnswer,
        parse_bets,
        "After the speaker's message the participant was asked to bet 100 dollars across the possible answers 0, "
        f"1, 2 and 3 (how many of the 3 objects have the property), in whole dollars, as '{BETS_FORMAT}'.",
    ),
    Turn(
        "knowledge",
        KnowledgeAnswer,
        parse_knowledge,
        "The participant was asked whether the speaker knows exactly how many of the objects have the property: "
        "yes or no.",
    ),
)


def _prior_prompt(trial: Trial) -> str:
    return f"{trial.story_setup}\n{trial.priorQ} Answer with one number from 0 to 3."


def exp1_prompts(trial: Trial) -> list[str]:
    """The three turns: the setup and the prior question; the utterance and the bets; the knowledge question."""
    return [
        _prior_prompt(trial),
        f"{trial.speech}\n{trial.speechQ} Bet $100 across the possible answers 0, 1, 2 and 3, in whole dollars "
        f"that add up to 100. Reply in exactly this format: {BETS_FORMAT}",
        f"{trial.knowledgeQ} Answer yes or no.",
    ]


# --- Experiment 2 --------------------------------------------------------------------------------------------------

PERCENTAGES = tuple(f"{p}%" for p in range(0, 101, 10))


def exp2_questions(trial: Trial) -> list[Question]:
    """The prior from the setup alone; each state's chance after the utterance; the knowledge question."""
    story = f"{trial.story_setup}\n{trial.speech}"
    percentages = ", ".join(PERCENTAGES)
    prior = Question(
        key="prior",
        messages=user(_prior_prompt(trial)),
        options=tuple(str(k) for k in STATES),
        values=tuple(float(k) for k in STATES),
    )
    states = [
        Question(
            key=f"state{k}",
            messages=user(
                f"{story}\n{trial.speechQ} How likely is it that the answer is exactly {k}? "
                f"Reply with one of {percentages}."
            ),
            options=PERCENTAGES,
            values=tuple(float(p) for p in range(0, 101, 10)),
        )
        for k in STATES
    ]
    knowledge = Question(
        key="knowledge", messages=user(f"{story}\n{trial.knowledgeQ} Reply with yes or no."), options=("yes", "no")
    )
    return [prior, *states, knowledge]


# --- Analysis ------------------------------------------------------------------------------------------------------

# The paper's tests of its two experiments: in the condition (access, said), do people bet more on `state_a` than on
# `state_b`? With full access "some" is read as "not all", and a number as "exactly": people bet more on the
# reported number than on the next. With partial access the implicature disappears.
IMPLICATURE_TESTS = (
    # (access, said, state_a, state_b, people bet more on state_a, the paper's wording)
    (3, "some", 2, 3, True, "some, full access: 'not all' (more on 2 than on 3)"),
    (1, "some", 2, 3, False, "some, access 1: implicature canceled (not more on 2 than on 3)"),
    (2, "some", 2, 3, False, "some, access 2: implicature canceled (not more on 2 than on 3)"),
    (3, "2", 2, 3, True, "two, full access: upper-bounded"),
    (2, "2", 2, 3, False, "two, partial access: not upper-bounded"),
    (3, "1", 1, 2, True, "one, full access: upper-bounded"),
    (3, "1", 1, 3, True, "one, full access: upper-bounded"),
    (1, "1", 1, 2, False, "one, access 1: not upper-bounded"),
    (1, "1", 1, 3, False, "one, access 1: not upper-bounded"),
    (2, "1", 1, 3, True, "one, access 2: partial (state 1 > state 3)"),
    (2, "1", 1, 2, False, "one, access 2: not greater"),
)
EXP1_COLUMNS = [*Answer.model_fields, analysis.EXTRACTION_COLUMN]
EXP2_COLUMNS = ["prior_mean", *[f"state{k}_mean" for k in STATES], "knowledge_p_yes"]
CONDITION = ["access", "said"]


def _said(table: pd.DataFrame) -> pd.Series:
    """What the speaker said, as one column: the quantifier, or the number as text."""
    return table["quantifier"].fillna(table["observed"].astype("string")).astype("string")


def not_placed(trials: pd.DataFrame) -> dict[str, int]:
    """Trials the condition analysis cannot place, counted by reason (each trial once, whatever the models)."""
    unique = trials.drop_duplicates(analysis.ID_COLUMN)
    reasons = {
        "speaker access not stated in `speech` (expected 'looked at N of the ...')": unique["access"].isna(),
        "the utterance reports no number or quantifier (expected e.g. 'Two of the ...' or 'Some of the ...')": (
            unique["said"].isna()
        ),
    }
    return {reason: int(mask.sum()) for reason, mask in reasons.items() if mask.any()}


def _bets_by_condition(table: pd.DataFrame) -> pd.DataFrame:
    """Mean bets on each state and on "knows exactly", per model × source × (access, said) condition."""
    rows = []
    exp1 = analysis.usable_exp1(table)
    sources = {
        "exp1": (exp1, [f"exp1_Bet_{k}" for k in STATES], exp1["exp1_Knowledge_A"].map({"yes": 100.0, "no": 0.0})),
        "exp2": (table, [f"exp2_bet_{k}" for k in STATES], table["exp2_knowledge_p_yes"] * 100.0),
    }
    for source, (frame, bet_columns, knows) in sources.items():
        frame = frame.assign(knows=pd.Series(knows, index=frame.index, dtype="float64"))
        frame = frame.dropna(subset=[bet_columns[0], *CONDITION])
        for (model, access, said), group in frame.groupby(["model", *CONDITION]):
            rows.append(
                {
                    "model": model,
                    "source": source,
                    "access": int(access),
                    "said": said,
                    "n_trials": len(group),
                    **{f"bet_{k}": float(group[c].astype("float64").mean()) for k, c in zip(STATES, bet_columns)},
                    "bet_knows_exactly": float(group["knows"].mean()),
                }
            )
    columns = ["model", "source", "access", "said", "n_trials", *[f"bet_{k}" for k in STATES], "bet_knows_exactly"]
    return pd.DataFrame(rows, columns=columns).astype({"access": "Int64", "said": "string"})


FINDING_COLUMNS = ["model", "source", "access", "said", "comparison", "people", "model_difference"]


def _knowledge_references(human: dict) -> list[tuple[str, list[int], bool, float]]:
    """(said, accesses, numbers?, people's mean bet that the speaker knows exactly) for each reported condition."""
    some = human["exp1_knowledge_bets_by_access"]
    numbers = human["exp2_knowledge_bets"]
    return [
        *[("some", [int(access)], False, some[access]["mean"]) for access in ("1", "2", "3")],
        ("a number", [1, 2], True, numbers["partial_access_mean"]),
        ("a number", [3], True, numbers["complete_access_mean"]),
    ]


def _findings(bets: pd.DataFrame, human: dict) -> pd.DataFrame:
    rows = []
    cells = {(r.model, r.source, r.access, r.said): r for r in bets.itertuples(index=False)}
    for model, source in sorted({(m, s) for m, s, _, _ in cells}):
        for access, said, a, b, people_more_on_a, wording in IMPLICATURE_TESTS:
            cell = cells.get((model, source, access, said))
            difference = getattr(cell, f"bet_{a}") - getattr(cell, f"bet_{b}") if cell else float("nan")
            rows.append(
                {
                    "model": model,
                    "source": source,
                    "access": access,
                    "said": said,
                    "comparison": f"bet on {a} minus bet on {b}",
                    "people": wording,
                    "model_difference": difference,
                    "agrees_with_people": (difference > 0) == people_more_on_a if cell else pd.NA,
                }
            )
        mine = bets[(bets.model == model) & (bets.source == source)]
        for said, accesses, numbers, people in _knowledge_references(human):
            said_matches = ~mine.said.isin(QUANTIFIERS.values()) if numbers else mine.said == said
            chosen = mine[mine.access.isin(accesses) & said_matches]
            weights = chosen.n_trials.sum()
            mean = (chosen.bet_knows_exactly * chosen.n_trials).sum() / weights if weights else float("nan")
            rows.append(
                {
                    "model": model,
                    "source": source,
                    "access": accesses[0] if len(accesses) == 1 else pd.NA,
                    "said": said,
                    "comparison": f"bet that the speaker knows exactly, access {'/'.join(map(str, accesses))}",
                    "people": f"mean bet {people}",
                    "model_difference": float(mean - people),
                    "agrees_with_people": pd.NA,
                }
            )
    return pd.DataFrame(rows, columns=[*FINDING_COLUMNS, "agrees_with_people"]).astype(
        {"access": "Int64", "said": "string", "model_difference": "float64", "agrees_with_people": "boolean"}
    )


def _plot(bets: pd.DataFrame) -> bytes:
    conditions = sorted({(int(a), str(s)) for a, s in zip(bets.access, bets.said)})
    figure, axes = plt.subplots(1, max(len(conditions), 1), figsize=(3 * max(len(conditions), 1), 3), sharey=True)
    axes = [axes] if len(conditions) <= 1 else axes
    for axis, (access, said) in zip(axes, conditions):
        cell = bets[(bets.access == access) & (bets.said == said)]
        for row in cell.itertuples(index=False):
            axis.plot(STATES, [getattr(row, f"bet_{k}") for k in STATES], marker="o", label=f"{row.model} {row.source}")
        axis.set_title(f"looked at {access}, said '{said}'", fontsize=9)
        axis.set_xticks(STATES)
        axis.set_xlabel("state (how many)")
    return analysis.finish(figure, "mean bet ($)", "Study 1: bets on each state after the utterance, by speaker access")


def analyze(inp: AnalysisInput) -> Analysis:
    table = analysis.model_trial_table(inp, EXP1_COLUMNS, EXP2_COLUMNS)
    table.insert(table.columns.get_loc("quantifier") + 1, "said", _said(table))
    # Experiment 2 reads each state's chance separately; rescaled to 100 dollars they compare with the bets.
    means = table[[f"exp2_state{k}_mean" for k in STATES]].astype("float64")
    for k in STATES:
        table[f"exp2_bet_{k}"] = 100.0 * means[f"exp2_state{k}_mean"] / means.sum(axis=1, min_count=len(STATES))
    bets = _bets_by_condition(table)
    findings = _findings(bets, analysis.reference_json("gs2013_reported_stats.json"))
    tests = findings.dropna(subset=["agrees_with_people"])
    agreement = {
        f"{m} {s}": f"{int(g.agrees_with_people.sum())}/{len(g)}" for (m, s), g in tests.groupby(["model", "source"])
    }
    return Analysis(
        table=table,
        comparisons={"bets_by_condition": bets, "findings": findings},
        figures={"bets_by_condition": _plot(bets)} if len(bets) else {},
        metadata={"implicature_tests_agreeing_with_people": agreement, "trials_not_placed": not_placed(table)},
    )


STUDY = Study(
    name="study1",
    title="Knowledge and implicature",
    citation=(
        "Goodman, N. D. & Stuhlmüller, A. (2013). Knowledge and implicature: Modeling language understanding as "
        "social cognition. Topics in Cognitive Science 5(1):173-184. doi:10.1111/tops.12007"
    ),
    columns=(
        Column("story_setup", text, "string", required=True, prose=True),
        Column("priorQ", text, "string", required=True, prose=True),
        Column("speech", text, "string", required=True, prose=True),
        Column("speechQ", text, "string", required=True, prose=True),
        Column("knowledgeQ", text, "string", prose=True, derive=knowledge_question),
        Column("participant", int_in_range(1, 10**6), "Int64"),
        Column("story", text, "string"),
        Column("access", int_in_range(1, 3), "Int64", derive=access_from_speech),
        Column("observed", int_in_range(0, 3), "Int64", derive=observed_from_speech),
        Column("quantifier", one_of(*sorted(set(QUANTIFIERS.values()))), "string", derive=quantifier_from_speech),
        Column("knowledgeQ_source", one_of("file", "derived", "generic"), "string", derive=knowledge_question_source),
    ),
    full_size=300,
    exp1_turns=TURNS,
    exp1_prompts=exp1_prompts,
    answer=Answer,
    csv_names={
        "Prior_A": "Prior_A",
        **{f"Bet_{k}": str(k) for k in STATES},
        "Knowledge_A": "Knowledge_A",
    },
    exp2_questions=exp2_questions,
    analyze=analyze,
)
