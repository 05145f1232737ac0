"""Study 2: polite speech (Yoon, Tessler, Goodman & Frank 2020).

A speaker who has a goal (informative, social, or both) tells a listener how good their work was, given the true
state (0-3 hearts); the answer is one of eight utterances "It was / It wasn't" × terrible, bad, good, amazing.
"""

from __future__ import annotations

import re
import textwrap
import warnings
import zlib
from typing import Literal

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, computed_field

from grace_dagster.studies import analysis
from grace_dagster.studies.base import (
    ID_COLUMN,
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
from grace_dagster.studies.text import NAME, first_name_match, is_person, settled, without_markup

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
# The original experiment showed the answer options in one of four orders, drawn per participant: "was" or "wasn't"
# first, and the words from terrible to amazing or from amazing to terrible (its script's conditions 1-4, in this
# order). A model's preference for the first or last option would otherwise be read as a preference for an utterance.
OPTION_ORDERS = {
    order: tuple(f"It {neg} {word}" for neg in polarities for word in words)
    for order, (polarities, words) in enumerate(
        [(p, w) for p in (POLARITIES, POLARITIES[::-1]) for w in (ASSESSMENTS, ASSESSMENTS[::-1])], start=1
    )
}


# The order of trials stored before the orders were kept: the one fixed order the prompts then listed.
ORDER_BEFORE_ORDERS = 1


def option_order(row: dict[str, str]) -> int:
    """The trial's order of the answer options (1-4): by participant, as in the original (cycling through the four,
    so they are balanced), or by a hash of the trial id when the file has no participant numbers."""
    participant = row.get("participant", "").strip()
    if participant.isascii() and participant.isdigit():
        return (int(participant) - 1) % len(OPTION_ORDERS) + 1
    return zlib.crc32(row[ID_COLUMN].encode()) % len(OPTION_ORDERS) + 1


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
    options = OPTION_ORDERS[int(value(trial, "option_order", str(ORDER_BEFORE_ORDERS)))]
    lines.append(f"Reply with exactly one of: {', '.join(options)}.")
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
_UTTERANCE = r"it\s+(?P<polarity>was\s+not|wasn't|was)\s+(?P<word>(?!not\b)[a-z]+)"
_LABEL = r"(?:(?:answer|response|reply|utterance)\s*[:=-]\s*)?"
_LEADING = re.compile(rf"^{_LABEL}[\"“]?{_UTTERANCE}[\"”]?\s*(?:[.!\n]|$)", re.IGNORECASE)
_WHOLE_UTTERANCE = re.compile(rf"^\s*{_UTTERANCE}\s*[.!]?\s*$", re.IGNORECASE)
_QUOTED = re.compile(r"[\"“]([^\"“”]*)[\"”]")
# Who may say a quoted answer, and how: "Ann would say", "She'd probably reply:", "I would say something like". Only
# these: "Ann would refuse to say", "Nobody would say" and "It would be cruel to say" quote what is not said.
_SAYING = re.compile(
    rf"^(?:(?P<who>{NAME})\s+)?(?:would\s+|will\s+|'d\s+)?(?:probably\s+|most\s+likely\s+|likely\s+)?"
    r"(?:say|reply|answer|respond|tell\s+\w+)(?:\s+something\s+like)?\s*[:,]?\s*$",
    re.IGNORECASE,
)
_SAYING_ADVERBS = re.compile(r"\b(?:probably|most\s+likely|likely)\b", re.IGNORECASE)
# Words that would make the text after an utterance a second answer ("it was" opens one, whatever its word) or a
# comment on the answer's word.
_ASSESSMENT = re.compile(r"\b(?:terrible|bad|good|amazing|it\s+was)\b", re.IGNORECASE)


def _reading(match: re.Match[str]) -> tuple[str, str]:
    polarity = "was" if match.group("polarity").lower() == "was" else "wasn't"
    return polarity, match.group("word").lower()


def _alone(reading: tuple[str, str], rest: str) -> tuple[str, str] | None:
    """`reading`, if the rest of the reply leaves it as it is: no other utterance, no word of the answer set, no
    hedge, negation or correction ("It was good. Or rather, bad.", "It was amazing. NOT.")."""
    return reading if settled(rest, _ASSESSMENT) else None


def _leading_reading(reply: str) -> tuple[str, str] | None:
    match = _LEADING.match(reply)
    return _alone(_reading(match), reply[match.end() :]) if match else None


def _sayer(before: str) -> bool:
    """Whether the text before a quoted answer is someone saying it, with no word that denies it ("Don't say",
    "Nobody would say"; the saying's own "probably" and "most likely" aside)."""
    match = _SAYING.match(before.strip())
    if not match or not settled(_SAYING_ADVERBS.sub(" ", before), _ASSESSMENT):
        return False
    who = (match.group("who") or "").removesuffix("'d")  # the name pattern takes in "She'd"
    return not who or who == "I" or is_person(who)


def _quoted_reading(reply: str) -> tuple[str, str] | None:
    spans = list(_QUOTED.finditer(reply))
    if len(spans) != 1:
        return None
    whole = _WHOLE_UTTERANCE.match(spans[0].group(1))
    if not whole or not _sayer(reply[: spans[0].start()]):
        return None
    return _alone(_reading(whole), reply[spans[0].end() :])


def parse_answer(text: str) -> dict | None:
    """The utterance, read only where it is unambiguous: the reply is the utterance or opens with it as a sentence,
    or the reply's one quoted span is the utterance and the text before it is someone saying it ("Ann would say");
    what follows may only give a reason (no other utterance or word of the answer set, no hedge, negation or
    correction). Anything else (negated, embedded, hedged, several utterances) goes to the judge."""
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
# --- Analysis ------------------------------------------------------------------------------------------------------

UTTERANCE_COLUMNS = {u: f"utterance_p_{option_slug(u)}" for u in UTTERANCES}
LITERAL_COLUMNS = {u: f"{key}_p_yes" for u, key in LITERAL_KEYS.items()}
EXP1_COLUMNS = [*Answer.model_fields, "utterance", analysis.EXTRACTION_COLUMN]
EXP2_COLUMNS = [*UTTERANCE_COLUMNS.values(), "utterance_p_negation", *LITERAL_COLUMNS.values()]
CELL = ["goal", "state_hearts"]
NEGATED_UTTERANCES = [UTTERANCES[i] for i in NEGATED]
SOURCES = {"exp1": "Experiment 1 (sampled answers)", "exp2": "Experiment 2 (exact probabilities)"}


def _answers(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per source, one row per answer with the utterance distribution it contributes: Experiment 1 one row per
    extracted sample (1 on the utterance it chose), Experiment 2 one row per trial (its exact distribution)."""
    exp1 = analysis.usable_exp1(table)
    chosen = pd.get_dummies(exp1["exp1_utterance"].astype("string")).reindex(columns=UTTERANCES, fill_value=0)
    exp2 = analysis.exp2_rows(table, "exp2_utterance_p_negation")
    exp2_p = exp2[[f"exp2_{c}" for c in UTTERANCE_COLUMNS.values()]].set_axis(UTTERANCES, axis=1)
    frames = {}
    for source, rows, p in (("exp1", exp1, chosen), ("exp2", exp2, exp2_p)):
        frame = rows[["model", ID_COLUMN, analysis.ITEM]].assign(
            goal=rows["Goal"],
            state_hearts=rows["State"],
            option_order=(
                rows["option_order"].fillna(ORDER_BEFORE_ORDERS) if "option_order" in rows else ORDER_BEFORE_ORDERS
            ),
        )
        frame = frame.join(p.astype("float64"))
        frame["p_negation"] = frame[NEGATED_UTTERANCES].sum(axis=1)
        frames[source] = frame.astype({"state_hearts": "int64", "option_order": "int64"})
    return frames


def _by_option_order(boot: analysis.Bootstrap, answers: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per model × source × order of the answer options: the option the prompt listed first (`first_listed`), its
    share of the answers asked in this order and its mean share in the other orders, and the difference
    (`first_listed_lift`, with its interval over items); the same for the option listed last; and the share of
    negations. Goals and states are balanced over the orders, so a lift away from 0 is the model choosing by position
    as well as by meaning (the original pooled its four orders)."""
    rows = []
    for source, frame in answers.items():
        if not len(frame):
            continue
        means = boot.means(frame, ["model", "option_order"], [*UTTERANCES, "p_negation"])
        negation_low, negation_high = means.interval()
        for cell, (model, order) in enumerate(means.index):
            others = [i for i, (m, o) in enumerate(means.index) if m == model and o != order]
            row = {
                "model": model,
                "source": source,
                "option_order": order,
                "n_answers": int(means.n_rows[cell]),
                "n_items": int(means.n_items[cell]),
            }
            for name, at in (("first", 0), ("last", -1)):
                utterance = OPTION_ORDERS[order][at]
                j = UTTERANCES.index(utterance)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # no other order, or none in a resample
                    elsewhere = np.nanmean(means.point[others, j]) if others else np.nan
                    lift = means.replicates[:, cell, j] - (
                        np.nanmean(means.replicates[:, others, j], axis=1) if others else np.nan
                    )
                low, high = analysis.percentile_interval(lift, means.n_items[cell])
                row |= {
                    f"{name}_listed": utterance,
                    f"p_{name}_listed": means.point[cell, j],
                    f"p_{name}_listed_elsewhere": elsewhere,
                    f"{name}_listed_lift": means.point[cell, j] - elsewhere,
                    f"{name}_listed_lift_ci_low": float(low),
                    f"{name}_listed_lift_ci_high": float(high),
                }
            k = len(UTTERANCES)
            row |= {
                "p_negation": means.point[cell, k],
                "p_negation_ci_low": negation_low[cell, k],
                "p_negation_ci_high": negation_high[cell, k],
            }
            rows.append(row)
    columns = ["model", "source", "option_order", "n_answers", "n_items"]
    return pd.DataFrame(rows, columns=None if rows else columns)


def _human() -> tuple[pd.DataFrame, pd.DataFrame]:
    negation = analysis.reference_csv("yoon2020_human_negation_by_goal_state.csv").set_index(CELL)
    utterances = analysis.reference_csv("yoon2020_human_utterance_distribution_by_goal_state.csv").set_index(CELL)
    return negation, utterances


def _cells(boot: analysis.Bootstrap, answers: dict[str, pd.DataFrame]) -> dict[str, analysis.CellMeans]:
    values = [*UTTERANCES, "p_negation"]
    return {source: boot.means(frame, ["model", *CELL], values) for source, frame in answers.items() if len(frame)}


def _by_goal_state(
    cells: dict[str, analysis.CellMeans], answers: dict[str, pd.DataFrame], inp: AnalysisInput
) -> pd.DataFrame:
    """Per model × source × goal × state: the distribution over the 8 utterances and the share of negations (with
    its interval over items) beside people's (Yoon et al. 2020, with Wilson intervals)."""
    negation, _ = _human()
    frames = []
    for source, means in cells.items():
        frame = means.frame().drop(columns=[f"{u}_ci_{b}" for u in UTTERANCES for b in ("low", "high")])
        trials = answers[source].groupby(["model", *CELL])[ID_COLUMN].nunique()
        frame.insert(0, "n_items", means.n_items)
        frame.insert(0, "n_answers", means.n_rows.astype(int))
        frame.insert(0, "n_trials", trials.reindex(means.index).to_numpy())
        frame.insert(0, "source", source)
        frames.append(frame.reset_index())
    merged = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["model", "source", *CELL])
    merged = merged.merge(
        negation[["prop_negation", "ci95_low_wilson", "ci95_high_wilson"]].reset_index(), on=CELL, how="left"
    ).rename(columns={"prop_negation": "human_p_negation"})
    temperature = analysis.sampling_columns(inp, merged["model"])
    merged["temperature"] = temperature["exp1_temperature"].where(merged["source"] == "exp1", analysis.EXP2_TEMPERATURE)
    return merged


def _human_arrays(index: pd.MultiIndex) -> tuple[np.ndarray, np.ndarray]:
    """People's share of negations and utterance distribution on the cells of `index` (model, goal, state)."""
    negation, utterances = _human()
    cells = index.droplevel("model")
    return negation["prop_negation"].reindex(cells).to_numpy(), utterances[list(UTTERANCES)].reindex(cells).to_numpy()


def _items(frame: pd.DataFrame, model: str) -> int:
    """How many items a model's rows come from: what its fit statistics are resampled over."""
    return int(frame.loc[frame["model"] == model, analysis.ITEM].nunique())


def _model_cells(means: analysis.CellMeans, model: str) -> analysis.CellMeans:
    return means.reindex(means.index[means.index.get_level_values("model") == model])


def _fits(
    cells: dict[str, analysis.CellMeans], answers: dict[str, pd.DataFrame], boot: analysis.Bootstrap, inp: AnalysisInput
) -> pd.DataFrame:
    """Per model × source: r and RMSE over the negation cells and over the utterance probabilities, with
    intervals over items."""
    rows = []
    for source, means in cells.items():
        for model in means.index.get_level_values("model").unique():
            mine = _model_cells(means, model)
            human_negation, human_utterances = _human_arrays(mine.index)
            items = _items(answers[source], model)
            negation = analysis.fit_with_interval(
                mine.point[:, -1], mine.replicates[:, :, -1], human_negation, items, "negation"
            )
            distribution = analysis.fit_with_interval(
                mine.point[:, :-1].ravel(),
                mine.replicates[:, :, :-1].reshape(boot.resamples, -1),
                human_utterances.ravel(),
                items,
                "distribution",
            )
            rows.append(
                {
                    "model": model,
                    "source": source,
                    "n_trials": int(answers[source].loc[answers[source]["model"] == model, ID_COLUMN].nunique()),
                    "n_answers": int(mine.n_rows.sum()),
                    "cells": negation.pop("negation_values"),
                    **negation,
                    **distribution,
                }
            )
    fits = pd.DataFrame(rows)
    if len(fits):
        sampling = analysis.sampling_columns(inp, fits["model"])
        fits["temperature"] = sampling["exp1_temperature"].where(fits["source"] == "exp1", analysis.EXP2_TEMPERATURE)
    return fits


def _exp1_vs_exp2(
    cells: dict[str, analysis.CellMeans], answers: dict[str, pd.DataFrame], inp: AnalysisInput
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per model × goal × state, Experiment 1's distribution of sampled answers beside Experiment 2's exact one:
    their total variation distance, each one's distance to people's, and each one's share of negations, with
    intervals over items; then per model the mean over cells."""
    if set(cells) != {"exp1", "exp2"}:
        return pd.DataFrame(), pd.DataFrame()
    index = cells["exp1"].index.union(cells["exp2"].index)
    exp1, exp2 = cells["exp1"].reindex(index), cells["exp2"].reindex(index)
    _, human = _human_arrays(index)
    n_items = np.minimum(exp1.n_items, exp2.n_items)
    distances = {
        "tv_exp1_exp2": (exp1.point[:, :-1], exp2.point[:, :-1], exp1.replicates[..., :-1], exp2.replicates[..., :-1]),
        "tv_exp1_people": (exp1.point[:, :-1], human, exp1.replicates[..., :-1], human),
        "tv_exp2_people": (exp2.point[:, :-1], human, exp2.replicates[..., :-1], human),
    }
    table = pd.DataFrame(index=index)
    table["exp1_answers"], table["exp2_trials"], table["n_items"] = (
        exp1.n_rows.astype(int),
        exp2.n_rows.astype(int),
        n_items,
    )
    for source, means in (("exp1", exp1), ("exp2", exp2)):
        for j, utterance in enumerate(UTTERANCES):
            table[f"{source}_p_{option_slug(utterance)}"] = means.point[:, j]
    for source, means in (("exp1", exp1), ("exp2", exp2)):
        low, high = means.interval()
        table[f"{source}_p_negation"] = means.point[:, -1]
        table[f"{source}_p_negation_ci_low"], table[f"{source}_p_negation_ci_high"] = low[:, -1], high[:, -1]
    replicated = {}
    for name, (p, q, p_rep, q_rep) in distances.items():
        replicated[name] = analysis.total_variation(p_rep, q_rep)
        low, high = analysis.percentile_interval(replicated[name], n_items)
        table[name], table[f"{name}_ci_low"], table[f"{name}_ci_high"] = analysis.total_variation(p, q), low, high
    table = table.reset_index()
    table = table.join(analysis.sampling_columns(inp, table["model"]))

    summary = []
    for model in index.get_level_values("model").unique():
        mine = (index.get_level_values("model") == model) & (n_items > 0)
        row = {"model": model, "cells": int(mine.sum())}
        for name, resampled in replicated.items():
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                per_resample = np.nanmean(resampled[:, mine], axis=1)
            items = min(_items(answers["exp1"], model), _items(answers["exp2"], model))
            low, high = analysis.percentile_interval(per_resample, np.array(items))
            row |= {
                f"mean_{name}": float(np.mean(table.loc[mine, name])),
                f"mean_{name}_ci_low": float(low),
                f"mean_{name}_ci_high": float(high),
            }
        summary.append(row)
    summary = pd.DataFrame(summary)
    return table, summary.join(analysis.sampling_columns(inp, summary["model"])) if len(summary) else summary


def _literal(table: pd.DataFrame, boot: analysis.Bootstrap) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The literal-meaning task: per model × utterance × true state, the mean probability that the model answers
    yes (with its interval over items), beside the share of people who did (Wilson intervals)."""
    columns = [f"exp2_{c}" for c in LITERAL_COLUMNS.values()]
    rows = table.dropna(subset=columns, how="all").drop_duplicates(["model", ID_COLUMN])
    long = rows.melt(["model", ID_COLUMN, analysis.ITEM, "State"], columns, "column", "p_yes").dropna(subset=["p_yes"])
    long["utterance"] = long["column"].map({f"exp2_{c}": u for u, c in LITERAL_COLUMNS.items()})
    long = long.rename(columns={"State": "state_hearts"}).astype({"state_hearts": "int64"})
    human = analysis.reference_csv("yoon2020_human_literal_semantics_by_utterance_state.csv")
    human = human.rename(columns={"utt": "utterance", "prop_yes": "human_p_yes", "n": "human_n"})
    human["human_ci_low"], human["human_ci_high"] = analysis.wilson_interval(
        (human["human_p_yes"] * human["human_n"]).round(), human["human_n"]
    )
    if long.empty:
        return pd.DataFrame(), pd.DataFrame()
    means = boot.means(long, ["model", "utterance", "state_hearts"], ["p_yes"])
    cells = means.frame({"p_yes": "model_p_yes"})
    cells.insert(0, "n_items", means.n_items)
    cells.insert(0, "n_trials", means.n_rows.astype(int))
    cells = cells.reset_index().merge(human, on=["utterance", "state_hearts"], how="left")
    cells["difference"] = cells["model_p_yes"] - cells["human_p_yes"]
    human_by_cell = human.set_index(["utterance", "state_hearts"])["human_p_yes"]
    fits = []
    for model in means.index.get_level_values("model").unique():
        mine = _model_cells(means, model)
        people = human_by_cell.reindex(mine.index.droplevel("model")).to_numpy()
        fit = analysis.fit_with_interval(
            mine.point[:, 0], mine.replicates[:, :, 0], people, _items(long, model), "p_yes"
        )
        fits.append({"model": model, "cells": fit.pop("p_yes_values"), **fit})
    return cells, pd.DataFrame(fits)


# --- Plots ---------------------------------------------------------------------------------------------------------


def _label(model: str, source: str) -> str:
    return f"{model}, {SOURCES[source]}"


def _plot_negation(merged: pd.DataFrame) -> bytes:
    human = analysis.reference_csv("yoon2020_human_negation_by_goal_state.csv")
    figure, axes = plt.subplots(1, len(GOALS), figsize=(10, 3.2), sharey=True)
    for axis, goal in zip(axes, GOALS):
        people = human[human.goal == goal].sort_values("state_hearts")
        axis.errorbar(
            people.state_hearts,
            people.prop_negation,
            yerr=analysis.error_bars(people.prop_negation, people.ci95_low_wilson, people.ci95_high_wilson),
            label="people (Yoon et al. 2020), Wilson 95% CI",
            capsize=3,
            **analysis.PEOPLE_STYLE,
        )
        for offset, ((model, source), group) in enumerate(merged[merged.goal == goal].groupby(["model", "source"])):
            group = group.sort_values("state_hearts")
            axis.errorbar(
                group.state_hearts + 0.06 * (offset + 1),
                group.p_negation,
                yerr=analysis.error_bars(group.p_negation, group.p_negation_ci_low, group.p_negation_ci_high),
                marker="o",
                capsize=2,
                label=f"{_label(model, source)}, 95% CI over items",
            )
        axis.set_title(f"goal: {goal}", fontsize=9)
        axis.set_xticks([0, 1, 2, 3])
        axis.set_xlabel("true state (hearts, 0-3)")
        axis.set_ylim(-0.02, 1.02)
    return analysis.finish(
        figure,
        "proportion of negated utterances",
        "Study 2: negation by goal and true state, models against people",
    )


def _heatmap(axis, matrix: np.ndarray, title: str) -> object:
    image = axis.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for (row, column), share in np.ndenumerate(matrix):
        if not np.isnan(share) and share >= 0.1:
            axis.text(
                column,
                row,
                f"{share:.2f}",
                ha="center",
                va="center",
                fontsize=6,
                color="white" if share < 0.6 else "black",
            )
    axis.set_title(title, fontsize=8)
    axis.set_xticks(range(len(UTTERANCES)), [u.removeprefix("It ") for u in UTTERANCES], rotation=50, fontsize=7)
    axis.set_xlabel("utterance ('It ...')", fontsize=8)
    return image


def _plot_heatmaps(merged: pd.DataFrame, inp: AnalysisInput) -> bytes:
    """Per model a row: people's utterance distribution per goal × state, then the model's in each experiment."""
    _, human = _human()
    rows = [(g, s) for g in GOALS for s in (0, 1, 2, 3)]
    models = sorted(merged["model"].unique())
    figure, axes = plt.subplots(len(models), 3, figsize=(13, 4.8 * len(models)), squeeze=False)
    figure.subplots_adjust(hspace=0.75, wspace=0.06)
    image = None
    for axis_row, model in zip(axes, models):
        people = human[list(UTTERANCES)].reindex(rows).to_numpy()
        image = _heatmap(axis_row[0], people, "people\nYoon et al. 2020\n203 answers per row")
        for axis, source in zip(axis_row[1:], SOURCES):
            mine = merged[(merged.model == model) & (merged.source == source)].set_index(CELL)
            matrix = mine[list(UTTERANCES)].reindex(rows).to_numpy(dtype=float)
            if source == "exp1":
                sampling = inp.exp1_sampling.get(model)
                how = (
                    f"temperature {sampling.temperature:g}, {sampling.samples_per_trial} per trial" if sampling else ""
                )
            else:
                how = f"temperature {analysis.EXP2_TEMPERATURE:g}"
            detail = how if len(mine) else "refused by its checks or not run"
            _heatmap(axis, matrix, f"{model}\n{SOURCES[source]}\n{detail}")
        axis_row[0].set_yticks(range(len(rows)), [f"{g}, {s} hearts" for g, s in rows], fontsize=7)
        for axis in axis_row[1:]:
            axis.set_yticks([])
        axis_row[0].set_ylabel("goal, true state")
    figure.colorbar(image, ax=axes, shrink=0.6, label="proportion of answers (0-1)")
    figure.suptitle(
        "Study 2: distribution over the 8 utterances by goal and true state, each model beside people",
        fontsize=10,
        y=0.97 + 0.08 / len(models),  # above the panels' three-line titles
    )
    return analysis.png(figure)


def _plot_exp1_vs_exp2(comparison: pd.DataFrame, note: str) -> bytes:
    figure, axes = plt.subplots(1, len(GOALS), figsize=(11, 3.4), sharey=True)
    styles = {
        "tv_exp1_exp2": ("o", "-", "Experiment 1 vs Experiment 2"),
        "tv_exp1_people": ("^", "--", "Experiment 1 vs people"),
        "tv_exp2_people": ("v", ":", "Experiment 2 vs people"),
    }
    colours = {m: f"C{i}" for i, m in enumerate(sorted(comparison["model"].unique()))}
    for axis, goal in zip(axes, GOALS):
        for model, group in comparison[comparison.goal == goal].groupby("model"):
            group = group.sort_values("state_hearts")
            for offset, (name, (marker, line, what)) in enumerate(styles.items()):
                axis.errorbar(
                    group.state_hearts + 0.05 * offset,
                    group[name],
                    yerr=analysis.error_bars(group[name], group[f"{name}_ci_low"], group[f"{name}_ci_high"]),
                    marker=marker,
                    linestyle=line,
                    color=colours[model],
                    capsize=2,
                    label=f"{model}: {what}",
                )
        axis.set_title(f"goal: {goal}", fontsize=9)
        axis.set_xticks([0, 1, 2, 3])
        axis.set_xlabel("true state (hearts, 0-3)")
        axis.set_ylim(-0.02, 1.02)
    return analysis.finish(
        figure,
        "total variation distance (0-1)",
        "Study 2: Experiment 1 against Experiment 2 per goal × state (distance between utterance distributions; "
        f"people's as reference)\n{textwrap.fill(note, 130)}",
    )


def _plot_literal(cells: pd.DataFrame) -> bytes:
    human = analysis.reference_csv("yoon2020_human_literal_semantics_by_utterance_state.csv")
    human_low, human_high = analysis.wilson_interval((human.prop_yes * human.n).round(), human.n)
    human = human.assign(low=human_low, high=human_high)
    figure, axes = plt.subplots(2, 4, figsize=(12, 5.5), sharex=True, sharey=True)
    for axis, utterance in zip(axes.ravel(), UTTERANCES):
        people = human[human.utt == utterance].sort_values("state_hearts")
        axis.errorbar(
            people.state_hearts,
            people.prop_yes,
            yerr=analysis.error_bars(people.prop_yes, people.low, people.high),
            label="people (Yoon et al. 2020, 49 per cell), Wilson 95% CI",
            capsize=3,
            **analysis.PEOPLE_STYLE,
        )
        for offset, (model, group) in enumerate(cells[cells.utterance == utterance].groupby("model")):
            group = group.sort_values("state_hearts")
            axis.errorbar(
                group.state_hearts + 0.08 * (offset + 1),
                group.model_p_yes,
                yerr=analysis.error_bars(group.model_p_yes, group.model_p_yes_ci_low, group.model_p_yes_ci_high),
                marker="o",
                capsize=2,
                label=f"{model}, Experiment 2 p(yes), 95% CI over items",
            )
        axis.set_title(f'"{utterance}"', fontsize=9)
        axis.set_xticks([0, 1, 2, 3])
        axis.set_ylim(-0.02, 1.02)
    for axis in axes[1]:
        axis.set_xlabel("true state (hearts, 0-3)")
    axes[1][0].set_ylabel("probability of 'yes'")
    return analysis.finish(
        figure,
        "probability of 'yes'",
        "Study 2, literal meaning: does the utterance fit the true state? Models' p(yes) against people's share of yes",
    )


def _question_set(key: str) -> str:
    return "literal meaning (yes/no)" if key in LITERAL_KEYS.values() else key


def analyze(inp: AnalysisInput) -> Analysis:
    table = analysis.model_trial_table(inp, EXP1_COLUMNS, EXP2_COLUMNS)
    labels, unit = analysis.item_labels(table, inp.study)
    boot = analysis.Bootstrap.over(labels, unit)
    working = table.assign(**{analysis.ITEM: labels})
    answers = _answers(working)
    cells = _cells(boot, answers)
    merged = _by_goal_state(cells, answers, inp)
    fits = _fits(cells, answers, boot, inp)
    comparison, comparison_summary = _exp1_vs_exp2(cells, answers, inp)
    literal, literal_fits = _literal(working, boot)
    masses = analysis.captured_mass(inp, _question_set)
    note = analysis.temperature_note(inp)
    figures = {}
    if len(merged):
        figures["negation_by_goal_state"] = _plot_negation(merged)
        figures["utterance_heatmaps"] = _plot_heatmaps(merged, inp)
    if len(comparison):
        figures["exp1_vs_exp2"] = _plot_exp1_vs_exp2(comparison, note)
    if len(literal):
        figures["literal_meaning"] = _plot_literal(literal)
    if len(masses):
        figures["captured_mass"] = analysis.captured_mass_figure(masses, "Study 2, Experiment 2")
    headline = {
        f"{r.model} {r.source}": f"negation r={r.negation_r:.2f} [{r.negation_r_ci_low:.2f}, "
        f"{r.negation_r_ci_high:.2f}] rmse={r.negation_rmse:.3f} [{r.negation_rmse_ci_low:.3f}, "
        f"{r.negation_rmse_ci_high:.3f}]; utterances r={r.distribution_r:.2f} rmse={r.distribution_rmse:.3f} "
        f"({r.n_answers} answers)"
        for r in fits.itertuples(index=False)
    }
    return Analysis(
        table=table,
        comparisons={
            "by_goal_state": merged,
            "fit_by_model": fits,
            "exp1_vs_exp2": comparison,
            "exp1_vs_exp2_by_model": comparison_summary,
            "by_option_order": _by_option_order(boot, answers),
            "literal_meaning": literal,
            "literal_fit_by_model": literal_fits,
            "captured_mass": analysis.captured_mass_summary(masses),
        },
        figures=figures,
        metadata={**headline, "temperatures": note, "uncertainty": boot.describe()},
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
        Column("option_order", int_in_range(1, len(OPTION_ORDERS)), "Int64", derive=option_order),
    ),
    full_size=2424,
    exp1_turns=TURNS,
    exp1_prompts=exp1_prompts,
    answer=Answer,
    csv_names={"polarity": "Was/Wasn't", "assessment": "Assessment", "response_utterance": "response_text"},
    exp2_questions=exp2_questions,
    analyze=analyze,
    row_checks=(scenario_agrees_with_state,),
    item_column="item",
)
