"""Study 1: knowledge and implicature (Goodman & Stuhlmüller 2013, experiment 2 design).

A speaker has looked at some of three objects and reports what they saw; the participant bets on how many of the
three have the property, before (prior) and after (posterior) the utterance, and on whether the speaker knows exactly.
"""

from __future__ import annotations

import re
from typing import Literal

import matplotlib.pyplot as plt
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from grace_dagster.studies import analysis
from grace_dagster.studies.base import Analysis, AnalysisInput, Messages, Question, Study, Trial, user, value
from grace_dagster.studies.inputs import Column, int_in_range, text

NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "1": 1, "2": 2, "3": 3}
_ACCESS = re.compile(r"looked at (\w+) of the", re.IGNORECASE)
_OBSERVED = re.compile(r"(\w+) of the \w+ (?:has|have)\b", re.IGNORECASE)


def access_from_speech(row: dict[str, str]) -> int | None:
    """How many objects the speaker looked at, read from `speech` ("I have looked at 2 of the 3 ...")."""
    match = _ACCESS.search(row.get("speech", ""))
    return NUMBER_WORDS.get(match.group(1).lower()) if match else None


def observed_from_speech(row: dict[str, str]) -> int | None:
    """The number the speaker reports ("Two of the jars have ..."); None for "Some" or other wording."""
    matches = _OBSERVED.findall(row.get("speech", ""))
    return NUMBER_WORDS.get(matches[-1].lower()) if matches else None


PERCENTAGES = tuple(f"{p}%" for p in range(0, 101, 10))
STATES = (0, 1, 2, 3)
GENERIC_KNOWLEDGE_Q = "Do you think the speaker knows exactly how many there are?"


def _story(trial: Trial) -> str:
    return f"{trial.story_setup}\n{trial.speech}"


def exp1_messages(trial: Trial) -> Messages:
    knowledge = value(trial, "knowledgeQ", GENERIC_KNOWLEDGE_Q)
    return user(
        f"{trial.story_setup}\n"
        f"First question, before you hear anything else: {trial.priorQ} Answer with one number from 0 to 3.\n"
        f"Then: {trial.speech}\n"
        f"Second question: {trial.speechQ} Bet $100 across the possible answers 0, 1, 2 and 3, in whole dollars "
        "that add up to 100.\n"
        f"Third question: {knowledge} Answer yes or no.\n\n"
        "Reply in exactly this format:\n"
        "Prior: <0-3>\n"
        "Bets: 0: <dollars>, 1: <dollars>, 2: <dollars>, 3: <dollars>\n"
        "Knowledge: <yes or no>"
    )


def exp2_questions(trial: Trial) -> list[Question]:
    percentages = ", ".join(PERCENTAGES)
    states = [
        Question(
            key=f"state{k}",
            messages=user(
                f"{_story(trial)}\n{trial.speechQ} How likely is it that the answer is exactly {k}? "
                f"Reply with one of {percentages}."
            ),
            options=PERCENTAGES,
            values=tuple(float(p) for p in range(0, 101, 10)),
        )
        for k in STATES
    ]
    knowledge = Question(
        key="knowledge",
        messages=user(f"{_story(trial)}\n{value(trial, 'knowledgeQ', GENERIC_KNOWLEDGE_Q)} Reply with yes or no."),
        options=("yes", "no"),
    )
    return [*states, knowledge]


class Answer(BaseModel):
    """A structured Experiment 1 answer, in the research plan's column names."""

    model_config = ConfigDict(extra="forbid")

    Prior_A: int = Field(ge=0, le=3, description="first question, before the utterance: how many of the 3 (0 to 3)")
    Bet_0: int = Field(ge=0, le=100, description="dollars bet on exactly 0 after the utterance")
    Bet_1: int = Field(ge=0, le=100, description="dollars bet on exactly 1 after the utterance")
    Bet_2: int = Field(ge=0, le=100, description="dollars bet on exactly 2 after the utterance")
    Bet_3: int = Field(ge=0, le=100, description="dollars bet on exactly 3 after the utterance")
    Knowledge_A: Literal["yes", "no"] = Field(description="third question: does the speaker know exactly (yes or no)")

    @model_validator(mode="after")
    def bets_sum_to_100(self) -> Answer:
        total = self.Bet_0 + self.Bet_1 + self.Bet_2 + self.Bet_3
        if total != 100:
            raise ValueError(f"the four bets must add up to 100 dollars; they add up to {total}")
        return self


ANSWER_TASK = (
    "The participant read a story and answered three questions: (1) before the speaker's message, how many of the 3 "
    "objects have the property (0 to 3); (2) after the message, a bet of 100 dollars across the answers 0, 1, 2 and "
    "3; (3) whether the speaker knows exactly how many (yes or no). They were asked to reply as "
    "'Prior: <0-3> / Bets: 0: <dollars>, 1: <dollars>, 2: <dollars>, 3: <dollars> / Knowledge: <yes or no>'."
)
# Numbers are captured with any decimals so that the schema, not the regex, refuses "2.5" or "10.5 dollars".
_PRIOR = re.compile(r"\bprior\s*[:=]\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
_BETS_LINE = re.compile(r"\bbets?\s*[:=](.*)", re.IGNORECASE)
_BET = re.compile(r"\b(\d+)\s*[:=]\s*\$?\s*(\d+(?:\.\d+)?)")
_KNOWLEDGE = re.compile(r"\bknowledge\s*[:=]\s*\**\s*(yes|no)\b", re.IGNORECASE)


def _single(values: list[str]) -> str | None:
    """The one value a field was given; None when it is absent or given twice with different values."""
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else None


def parse_answer(text: str) -> dict | None:
    """Read an answer in the requested format. Values are returned as read, even out of range, so the schema
    refuses them with a reason; None means the format was not followed (or not unambiguously) and the judge reads it.
    """
    prior = _single(_PRIOR.findall(text))
    knowledge = _single([k.lower() for k in _KNOWLEDGE.findall(text)])
    bet_lines = [dict(_BET.findall(line)) for line in _BETS_LINE.findall(text)]
    bet_lines = [bets for bets in bet_lines if set(bets) == {"0", "1", "2", "3"}]
    if prior is None or knowledge is None or len({tuple(sorted(b.items())) for b in bet_lines}) != 1:
        return None
    bets = bet_lines[0]
    return {"Prior_A": prior, **{f"Bet_{k}": bets[str(k)] for k in STATES}, "Knowledge_A": knowledge}


# The paper's implicature tests (its experiment 2, the design of these trials): in the condition (access, observed),
# do people bet more on `state_a` than on `state_b`? "Upper-bounded" readings bet more on the observed number.
IMPLICATURE_TESTS = (
    # (access, observed, state_a, state_b, people bet more on state_a, the paper's wording)
    (3, 2, 2, 3, True, "two, full access: upper-bounded"),
    (2, 2, 2, 3, False, "two, partial access: not upper-bounded"),
    (3, 1, 1, 2, True, "one, full access: upper-bounded"),
    (3, 1, 1, 3, True, "one, full access: upper-bounded"),
    (1, 1, 1, 2, False, "one, access 1: not upper-bounded"),
    (1, 1, 1, 3, False, "one, access 1: not upper-bounded"),
    (2, 1, 1, 3, True, "one, access 2: partial (state 1 > state 3)"),
    (2, 1, 1, 2, False, "one, access 2: not greater"),
)
EXP1_COLUMNS = [*Answer.model_fields, analysis.EXTRACTION_COLUMN]
EXP2_COLUMNS = [f"state{k}_mean" for k in STATES] + ["knowledge_p_yes"]


def _bets_by_condition(table: pd.DataFrame) -> pd.DataFrame:
    """Mean bets on each state and on "knows exactly", per model × source × (access, observed) condition."""
    rows = []
    exp1 = analysis.usable_exp1(table)
    sources = {
        "exp1": (exp1, [f"exp1_Bet_{k}" for k in STATES], exp1["exp1_Knowledge_A"].map({"yes": 100.0, "no": 0.0})),
        "exp2": (table, [f"exp2_bet_{k}" for k in STATES], table["exp2_knowledge_p_yes"] * 100.0),
    }
    for source, (frame, bet_columns, knows) in sources.items():
        frame = frame.assign(knows=pd.Series(knows, index=frame.index, dtype="float64"))
        frame = frame.dropna(subset=[bet_columns[0]])
        for (model, access, observed), group in frame.groupby(["model", "access", "observed"]):
            rows.append(
                {
                    "model": model,
                    "source": source,
                    "access": int(access),
                    "observed": int(observed),
                    "n_trials": len(group),
                    **{f"bet_{k}": float(group[c].astype("float64").mean()) for k, c in zip(STATES, bet_columns)},
                    "bet_knows_exactly": float(group["knows"].mean()),
                }
            )
    columns = ["model", "source", "access", "observed", "n_trials", *[f"bet_{k}" for k in STATES], "bet_knows_exactly"]
    return pd.DataFrame(rows, columns=columns)


def _findings(bets: pd.DataFrame, human: dict) -> pd.DataFrame:
    rows = []
    cells = {(r.model, r.source, r.access, r.observed): r for r in bets.itertuples(index=False)}
    for model, source in sorted({(m, s) for m, s, _, _ in cells}):
        for access, observed, a, b, people_more_on_a, wording in IMPLICATURE_TESTS:
            cell = cells.get((model, source, access, observed))
            difference = getattr(cell, f"bet_{a}") - getattr(cell, f"bet_{b}") if cell else float("nan")
            rows.append(
                {
                    "model": model,
                    "source": source,
                    "access": access,
                    "observed": observed,
                    "comparison": f"bet on {a} minus bet on {b}",
                    "people": wording,
                    "model_difference": difference,
                    "agrees_with_people": (difference > 0) == people_more_on_a if cell else pd.NA,
                }
            )
        for complete, label in ((False, "partial_access_mean"), (True, "complete_access_mean")):
            mine = bets[(bets.model == model) & (bets.source == source) & ((bets.access == 3) == complete)]
            people = human["exp2_knowledge_bets"][label]
            rows.append(
                {
                    "model": model,
                    "source": source,
                    "access": 3 if complete else pd.NA,
                    "observed": pd.NA,
                    "comparison": f"bet that the speaker knows exactly, {'complete' if complete else 'partial'} access",
                    "people": f"mean bet {people}",
                    "model_difference": float((mine.bet_knows_exactly * mine.n_trials).sum() / mine.n_trials.sum())
                    - people
                    if len(mine)
                    else float("nan"),
                    "agrees_with_people": pd.NA,
                }
            )
    return pd.DataFrame(rows).astype({"access": "Int64", "observed": "Int64", "agrees_with_people": "boolean"})


def _plot(bets: pd.DataFrame) -> bytes:
    conditions = sorted({(int(a), int(o)) for a, o in zip(bets.access, bets.observed)})
    figure, axes = plt.subplots(1, max(len(conditions), 1), figsize=(3 * max(len(conditions), 1), 3), sharey=True)
    axes = [axes] if len(conditions) <= 1 else axes
    for axis, (access, observed) in zip(axes, conditions):
        cell = bets[(bets.access == access) & (bets.observed == observed)]
        for row in cell.itertuples(index=False):
            axis.plot(STATES, [getattr(row, f"bet_{k}") for k in STATES], marker="o", label=f"{row.model} {row.source}")
        axis.set_title(f"looked at {access}, said {observed}", fontsize=9)
        axis.set_xticks(STATES)
        axis.set_xlabel("state (how many)")
    return analysis.finish(figure, "mean bet ($)", "Study 1: bets on each state after the utterance, by speaker access")


def analyze(inp: AnalysisInput) -> Analysis:
    table = analysis.model_trial_table(inp, EXP1_COLUMNS, EXP2_COLUMNS)
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
        metadata={"implicature_tests_agreeing_with_people": agreement},
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
        Column("knowledgeQ", text, "string", prose=True),
        Column("participant", int_in_range(1, 10**6), "Int64"),
        Column("story", text, "string"),
        Column("access", int_in_range(1, 3), "Int64", derive=access_from_speech),
        Column("observed", int_in_range(0, 3), "Int64", derive=observed_from_speech),
    ),
    full_size=300,
    exp1_messages=exp1_messages,
    exp2_questions=exp2_questions,
    answer=Answer,
    parse_answer=parse_answer,
    answer_task=ANSWER_TASK,
    analyze=analyze,
)
