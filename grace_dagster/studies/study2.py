"""Study 2: polite speech (Yoon, Tessler, Goodman & Frank 2020).

A speaker who has a goal (informative, social, or both) tells a listener how good their work was, given the true
state (0-3 hearts); the answer is one of eight utterances "It was / It wasn't" × terrible, bad, good, amazing.
"""

from __future__ import annotations

import re
from typing import Literal

import matplotlib.pyplot as plt
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, computed_field

from grace_dagster.studies import analysis
from grace_dagster.studies.base import (
    Analysis,
    AnalysisInput,
    Question,
    Study,
    Trial,
    Turn,
    option_slug,
    user,
    value,
)
from grace_dagster.studies.inputs import Column, int_in_range, one_of, text
from grace_dagster.studies.text import NAME, first_name_match, without_markup

GOALS = ("informative", "social", "both")
_HEARTS = re.compile(r"^\s*([0-3])\s*(?:(?:out\s+)?of\s+3\s+)?(?:hearts?)?\s*$", re.IGNORECASE)


def hearts(value: str) -> int:
    """The true state in hearts: "2", "2 hearts" or "2 out of 3 hearts"."""
    match = _HEARTS.match(value)
    if not match:
        raise ValueError(f"expected a number of hearts from 0 to 3 (e.g. 2 or '2 out of 3 hearts'); got {value!r}")
    return int(match.group(1))


POLARITIES = ("was", "wasn't")
ASSESSMENTS = ("terrible", "bad", "good", "amazing")
UTTERANCES = tuple(f"It {neg} {word}" for neg in POLARITIES for word in ASSESSMENTS)
NEGATED = tuple(i for i, u in enumerate(UTTERANCES) if u.startswith("It wasn't"))
# The goal wordings of the original experiment, with the speaker (SP) and listener (LS) named.
GOAL_WORDING = {
    "informative": "If {SP} wanted to give as accurate and informative feedback as possible, rather than make {LS} "
    "feel good,",
    "social": "If {SP} wanted to make {LS} feel good, rather than give informative feedback,",
    "both": "If {SP} wanted to BOTH make {LS} feel good AND give accurate and informative feedback,",
}

# --- Reading the scenario: the true state and the names, when the file has only the Grace columns ------------------

_STATED_HEARTS = re.compile(r"\b([0-3])\s*(?:out\s+)?of\s+(?:3|three)\s+hearts?\b", re.IGNORECASE)
# "Bob approached Ann, who ...", "Ava went to Ben": the listener goes to the speaker; the original state sentence
# names both the other way round ("how Ann actually felt about Bob's presentation").
_LISTENER_TO_SPEAKER = re.compile(
    rf"(?=(?P<listener>{NAME})\s+(?:approached|went\s+(?:up\s+)?to|came\s+(?:up\s+)?to|turned\s+to|asked|"
    rf"called|texted|showed\s+(?:it|them)\s+to|sent\s+(?:it|them)\s+to)\s+(?P<speaker>{NAME})\b)"
)
_SPEAKER_ABOUT_LISTENER = re.compile(
    rf"(?=how\s+(?P<speaker>{NAME})\s+actually\s+felt\s+about\s+(?P<listener>{NAME})['’]s)"
)


def stated_hearts(scenario: str) -> int | None:
    """The true state when the scenario itself states it in hearts ("2 out of 3 hearts"), as the original text does."""
    found = {int(n) for n in _STATED_HEARTS.findall(scenario)}
    return found.pop() if len(found) == 1 else None


def _names(row: dict[str, str]) -> tuple[str, str] | None:
    scenario = row.get("Scenario", "")
    for pattern in (_SPEAKER_ABOUT_LISTENER, _LISTENER_TO_SPEAKER):
        found = first_name_match(pattern, scenario, "speaker", "listener")
        if found:
            return found
    return None


def speaker_from_scenario(row: dict[str, str]) -> str | None:
    names = _names(row)
    return names[0] if names else None


def listener_from_scenario(row: dict[str, str]) -> str | None:
    names = _names(row)
    return names[1] if names else None


def scenario_agrees_with_state(row: dict) -> tuple[str, str] | None:
    stated = stated_hearts(row["Scenario"])
    if stated is not None and stated != row["State"]:
        return (
            "Scenario",
            f"the scenario says {stated} of 3 hearts but State is {row['State']}; expected the same true state in both",
        )
    return None


def _situation(trial: Trial) -> list[str]:
    """The scenario and the true state (unless the scenario already states it)."""
    speaker = value(trial, "speaker", "the speaker")
    lines = [trial.Scenario]
    if stated_hearts(trial.Scenario) is None:
        lines.append(
            f"Here's how {speaker} actually felt about it, on a scale of 0 to 3 hearts: {trial.State} out of 3 hearts."
        )
    return lines


def _question(trial: Trial) -> str:
    """The trial as the original experiment showed it: scenario, true state (unless the scenario already states it),
    goal, question, and the answer set."""
    speaker = value(trial, "speaker", "the speaker")
    listener = value(trial, "listener", "the listener")
    lines = _situation(trial)
    goal = GOAL_WORDING[trial.Goal].format(SP=speaker, LS=listener)
    lines.append(f"{goal} what would {speaker} be most likely to say?")
    lines.append(f"Reply with exactly one of: {', '.join(UTTERANCES)}.")
    return "\n".join(lines)


def exp1_prompts(trial: Trial) -> list[str]:
    return [_question(trial)]


# The literal-meaning task (Yoon et al. 2020, Supplementary Materials): a separate group of people saw a true state
# and answered, for one utterance, whether the speaker thought the work was / wasn't <adjective>: yes or no, with no
# goal given. Its answers are the literal meanings the paper's model starts from. Here it is an Experiment 2 question
# set, asked of the scenario and true state of the trials of one goal condition: the task shows no goal, and the
# trials of one condition already cover every state (each participant sees each goal × state once), so asking the
# other two conditions' trials as well would triple its cost for the same utterance × state cells.
LITERAL_KEYS = {u: f"literal_{option_slug(u)}" for u in UTTERANCES}
LITERAL_TASK_GOAL = "informative"
YES_NO = ("yes", "no")


def literal_questions(trial: Trial) -> list[Question]:
    """For each utterance: given the scenario and the true state, did the speaker think it was / wasn't <word>?"""
    if trial.Goal != LITERAL_TASK_GOAL:
        return []
    speaker = value(trial, "speaker", "the speaker")
    situation = "\n".join(_situation(trial))
    return [
        Question(
            key=LITERAL_KEYS[f"It {polarity} {word}"],
            messages=user(f"{situation}\nDo you think {speaker} thought it {polarity} {word}? Reply with yes or no."),
            options=YES_NO,
        )
        for polarity in POLARITIES
        for word in ASSESSMENTS
    ]


def exp2_questions(trial: Trial) -> list[Question]:
    """The utterance the speaker would choose (the prompt of Experiment 1); for the trials of LITERAL_TASK_GOAL
    also the literal-meaning questions."""
    utterance = Question(
        key="utterance", messages=user(_question(trial)), options=UTTERANCES, sums={"negation": NEGATED}
    )
    return [utterance, *literal_questions(trial)]


class Answer(BaseModel):
    """A structured Experiment 1 answer: which of the eight utterances the speaker would say."""

    model_config = ConfigDict(extra="forbid")

    polarity: Literal["was", "wasn't"] = Field(description="'was' or 'wasn't': whether the utterance is negated")
    assessment: Literal["terrible", "bad", "good", "amazing"] = Field(description="the assessment word")

    @computed_field
    @property
    def utterance(self) -> str:
        return f"It {self.polarity} {self.assessment}"


# --- Reading a reply: only where the utterance is unambiguous -------------------------------------------------------

# "It was/wasn't/was not <word>": the word is captured whatever it is, so an answer outside the eight utterances is
# refused by the schema with its word named, rather than mapped to the nearest allowed one.
_UTTERANCE = r"it\s+(?P<polarity>was\s+not|wasn't|was)\s+(?P<word>[a-z]+)"
_LABEL = r"(?:(?:answer|response|reply|utterance)\s*[:=-]\s*)?"
_LEADING = re.compile(rf"^{_LABEL}[\"“]?{_UTTERANCE}[\"”]?\s*(?:[.!\n]|$)", re.IGNORECASE)
_ANY_UTTERANCE = re.compile(rf"\b{_UTTERANCE}\b", re.IGNORECASE)
_WHOLE_UTTERANCE = re.compile(rf"^\s*{_UTTERANCE}\s*[.!]?\s*$", re.IGNORECASE)
_QUOTED = re.compile(r"[\"“]([^\"“”]*)[\"”]")
# What may come before a quoted answer: someone saying it ("Ann would probably say:"), and no word that turns the
# quote into what is not said ("wouldn't say", "rude to say", "instead of").
_SAYING = re.compile(
    r"\b(?:say|says|said|reply|replies|answer|answers|respond|responds|tell\s+\w+|tells\s+\w+)"
    r"(?:\s+something\s+like)?\s*[:,]?\s*$",
    re.IGNORECASE,
)
_DENIAL = re.compile(
    r"n't|\b(?:not|never|no|instead|rather|avoid|rude|unkind|lie|lying|wrong|hurt|harsh|mean|but)\b", re.IGNORECASE
)


def _reading(match: re.Match[str]) -> tuple[str, str]:
    polarity = "was" if match.group("polarity").lower() == "was" else "wasn't"
    return polarity, match.group("word").lower()


def _alone(reading: tuple[str, str], rest: str) -> tuple[str, str] | None:
    """`reading`, unless the rest of the reply names another utterance."""
    return None if any(_reading(m) != reading for m in _ANY_UTTERANCE.finditer(rest)) else reading


def _leading_reading(reply: str) -> tuple[str, str] | None:
    match = _LEADING.match(reply)
    return _alone(_reading(match), reply[match.end() :]) if match else None


def _quoted_reading(reply: str) -> tuple[str, str] | None:
    spans = list(_QUOTED.finditer(reply))
    if len(spans) != 1:
        return None
    whole = _WHOLE_UTTERANCE.match(spans[0].group(1))
    before = reply[: spans[0].start()]
    if not whole or not _SAYING.search(before) or _DENIAL.search(before):
        return None
    return _alone(_reading(whole), reply[spans[0].end() :])


def parse_answer(text: str) -> dict | None:
    """The utterance, read only where it is unambiguous: the reply is the utterance or opens with it as a sentence,
    or the reply's one quoted span is the utterance and the text before it has someone say it. Anything else
    (negated, embedded, hedged, several utterances) goes to the judge."""
    reply = without_markup(text)
    if len(reply) > 1 and reply[0] in '"“' and reply[-1] in '"”' and len(_QUOTED.findall(reply)) == 1:
        reply = reply[1:-1].strip()  # the whole reply in quotes
    reading = _leading_reading(reply) or _quoted_reading(reply)
    return dict(zip(("polarity", "assessment"), reading)) if reading else None


TURNS = (
    Turn(
        "utterance",
        Answer,
        parse_answer,
        "The participant was told a story and asked what the speaker would most likely say, choosing one of: "
        + ", ".join(UTTERANCES)
        + ".",
    ),
)
UTTERANCE_COLUMNS = {u: f"utterance_p_{option_slug(u)}" for u in UTTERANCES}
EXP1_COLUMNS = [*Answer.model_fields, "utterance", analysis.EXTRACTION_COLUMN]
EXP2_COLUMNS = [*UTTERANCE_COLUMNS.values(), "utterance_p_negation"]


def _distributions(table: pd.DataFrame) -> pd.DataFrame:
    """Per model × source × goal × state: the distribution over the 8 utterances and the share of negations.

    exp1: how often each utterance was the extracted answer; exp2: the mean of the trials' exact distributions.
    """
    exp1 = analysis.usable_exp1(table)
    exp1_counts = pd.get_dummies(exp1["exp1_utterance"].astype("string")).reindex(columns=UTTERANCES, fill_value=0)
    exp2 = table.dropna(subset=["exp2_utterance_p_negation"])
    sources = {
        "exp1": pd.concat([exp1[["model", "Goal", "State"]], exp1_counts.astype("float64")], axis=1),
        "exp2": exp2[["model", "Goal", "State"]].join(
            exp2[[f"exp2_{c}" for c in UTTERANCE_COLUMNS.values()]].set_axis(UTTERANCES, axis=1).astype("float64")
        ),
    }
    frames = []
    for source, frame in sources.items():
        grouped = frame.groupby(["model", "Goal", "State"])
        cell = grouped[list(UTTERANCES)].mean()
        cell.insert(0, "n_trials", grouped.size())
        cell.insert(0, "source", source)
        frames.append(cell.reset_index())
    cells = pd.concat(frames, ignore_index=True)
    cells["p_negation"] = cells[[u for u in UTTERANCES if u.startswith("It wasn't")]].sum(axis=1)
    return cells.rename(columns={"Goal": "goal", "State": "state_hearts"})


def _compare(cells: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cell-by-cell comparison with people, and per model × source the correlation and RMSE."""
    negation = analysis.reference_csv("yoon2020_human_negation_by_goal_state.csv")
    utterances = analysis.reference_csv("yoon2020_human_utterance_distribution_by_goal_state.csv")
    merged = cells.merge(
        negation[["goal", "state_hearts", "prop_negation", "ci95_low_wilson", "ci95_high_wilson"]],
        on=["goal", "state_hearts"],
        how="left",
    ).rename(columns={"prop_negation": "human_p_negation"})
    human_long = utterances.melt(["goal", "state_hearts", "n"], UTTERANCES, "utterance", "human_p")
    model_long = cells.melt(["model", "source", "goal", "state_hearts"], UTTERANCES, "utterance", "model_p")
    paired = model_long.merge(human_long, on=["goal", "state_hearts", "utterance"], how="left")
    rows = []
    for (model, source), group in merged.groupby(["model", "source"]):
        distribution = paired[(paired.model == model) & (paired.source == source)]
        neg = analysis.fit(group["p_negation"], group["human_p_negation"])
        dist = analysis.fit(distribution["model_p"], distribution["human_p"])
        rows.append(
            {
                "model": model,
                "source": source,
                "n_trials": int(group["n_trials"].sum()),
                "cells": neg["n"],
                "negation_r": neg["r"],
                "negation_rmse": neg["rmse"],
                "distribution_values": dist["n"],
                "distribution_r": dist["r"],
                "distribution_rmse": dist["rmse"],
            }
        )
    return merged, pd.DataFrame(rows)


def _plot(merged: pd.DataFrame) -> bytes:
    human = analysis.reference_csv("yoon2020_human_negation_by_goal_state.csv")
    figure, axes = plt.subplots(1, len(GOALS), figsize=(10, 3.2), sharey=True)
    for axis, goal in zip(axes, GOALS):
        people = human[human.goal == goal].sort_values("state_hearts")
        axis.errorbar(
            people.state_hearts,
            people.prop_negation,
            yerr=[people.prop_negation - people.ci95_low_wilson, people.ci95_high_wilson - people.prop_negation],
            color="black",
            marker="s",
            label="people (Yoon et al. 2020)",
        )
        for (model, source), group in merged[merged.goal == goal].groupby(["model", "source"]):
            group = group.sort_values("state_hearts")
            axis.plot(group.state_hearts, group.p_negation, marker="o", label=f"{model} {source}")
        axis.set_title(f"goal: {goal}", fontsize=9)
        axis.set_xticks([0, 1, 2, 3])
        axis.set_xlabel("true state (hearts)")
    return analysis.finish(
        figure, "proportion of negated utterances", "Study 2: negation by goal and true state, models against people"
    )


def analyze(inp: AnalysisInput) -> Analysis:
    table = analysis.model_trial_table(inp, EXP1_COLUMNS, EXP2_COLUMNS)
    cells = _distributions(table)
    merged, fits = _compare(cells)
    return Analysis(
        table=table,
        comparisons={"by_goal_state": merged, "fit_by_model": fits},
        figures={"negation_by_goal_state": _plot(merged)} if len(merged) else {},
        metadata={
            f"{r.model} {r.source}": f"negation r={r.negation_r:.2f} rmse={r.negation_rmse:.3f}; "
            f"utterances r={r.distribution_r:.2f} rmse={r.distribution_rmse:.3f} ({r.n_trials} trials)"
            for r in fits.itertuples(index=False)
        },
    )


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
        Column("speaker", text, "string", derive=speaker_from_scenario),
        Column("listener", text, "string", derive=listener_from_scenario),
    ),
    full_size=2424,
    exp1_turns=TURNS,
    exp1_prompts=exp1_prompts,
    answer=Answer,
    csv_names={"polarity": "Was/Wasn't", "assessment": "Assessment", "response_utterance": "response_text"},
    exp2_questions=exp2_questions,
    analyze=analyze,
    row_checks=(scenario_agrees_with_state,),
)
