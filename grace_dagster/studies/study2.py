"""Study 2: polite speech (Yoon, Tessler, Goodman & Frank 2020).

A speaker who has a goal (informative, social, or both) tells a listener how good their work was, given the true
state (0-3 hearts); the answer is one of eight utterances "It was / It wasn't" × terrible, bad, good, amazing.
"""

from __future__ import annotations

import re

from grace_dagster.studies.base import Messages, Question, Study, Trial, user, value
from grace_dagster.studies.inputs import Column, int_in_range, one_of, text

GOALS = ("informative", "social", "both")
_HEARTS = re.compile(r"^\s*([0-3])\s*(?:(?:out\s+)?of\s+3\s+)?(?:hearts?)?\s*$", re.IGNORECASE)


def hearts(value: str) -> int:
    """The true state in hearts: "2", "2 hearts" or "2 out of 3 hearts"."""
    match = _HEARTS.match(value)
    if not match:
        raise ValueError(f"expected a number of hearts from 0 to 3 (e.g. 2 or '2 out of 3 hearts'); got {value!r}")
    return int(match.group(1))


UTTERANCES = tuple(f"It {neg} {word}" for neg in ("was", "wasn't") for word in ("terrible", "bad", "good", "amazing"))
NEGATED = tuple(i for i, u in enumerate(UTTERANCES) if u.startswith("It wasn't"))
# The goal wordings of the original experiment, with the speaker (SP) and listener (LS) named.
GOAL_WORDING = {
    "informative": "If {SP} wanted to give as accurate and informative feedback as possible, rather than make {LS} "
    "feel good,",
    "social": "If {SP} wanted to make {LS} feel good, rather than give informative feedback,",
    "both": "If {SP} wanted to BOTH make {LS} feel good AND give accurate and informative feedback,",
}


def _question(trial: Trial) -> str:
    speaker = value(trial, "speaker", "the speaker")
    listener = value(trial, "listener", "the listener")
    goal = GOAL_WORDING[trial.Goal].format(SP=speaker, LS=listener)
    return (
        f"{trial.Scenario}\n"
        f"Here's how {speaker} actually felt about it, on a scale of 0 to 3 hearts: {trial.State} out of 3 hearts.\n"
        f"{goal} what would {speaker} be most likely to say?\n"
        f"Reply with exactly one of: {', '.join(UTTERANCES)}."
    )


def exp1_messages(trial: Trial) -> Messages:
    return user(_question(trial))


def exp2_questions(trial: Trial) -> list[Question]:
    return [Question(key="utterance", messages=user(_question(trial)), options=UTTERANCES, sums={"negation": NEGATED})]


STUDY = Study(
    name="study2",
    title="Polite speech",
    citation=(
        "Yoon, E. J., Tessler, M. H., Goodman, N. D. & Frank, M. C. (2020). Polite speech emerges from competing "
        "social goals. Open Mind 4:71-87. doi:10.1162/opmi_a_00035 (CC BY 4.0)"
    ),
    columns=(
        Column("Scenario", text, "string", required=True, prose=True),
        Column("Goal", one_of(*GOALS), "string", required=True),
        Column("State", hearts, "Int64", required=True),
        Column("participant", int_in_range(1, 10**6), "Int64"),
        Column("item", text, "string"),
        Column("speaker", text, "string"),
        Column("listener", text, "string"),
    ),
    full_size=2424,
    exp1_messages=exp1_messages,
    exp2_questions=exp2_questions,
)
