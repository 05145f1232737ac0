"""Study 1: knowledge and implicature (Goodman & Stuhlmüller 2013, experiment 2 design).

A speaker has looked at some of three objects and reports what they saw; the participant bets on how many of the
three have the property, before (prior) and after (posterior) the utterance, and on whether the speaker knows exactly.
"""

from __future__ import annotations

import re

from grace_dagster.studies.base import Messages, Question, Study, Trial, user, value
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
)
