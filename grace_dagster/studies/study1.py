"""Study 1: knowledge and implicature (Goodman & Stuhlmüller 2013).

A speaker has looked at some of three objects and reports what they saw, with a number ("Two of the ...", the
original experiment 2) or a quantifier ("Some of the ...", experiment 1). The participant says how many of the three
have the property before the utterance (prior), bets on each number after it (posterior), and says whether the
speaker knows exactly. As in the original experiment, the prior is asked before the utterance is shown: Experiment 1
is a conversation of three turns, each answered before the next is asked.
"""

from __future__ import annotations

import re
import textwrap
from typing import Literal

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from grace_dagster.studies import analysis
from grace_dagster.studies.base import ID_COLUMN, Analysis, AnalysisInput, Question, Study, Trial, Turn, user
from grace_dagster.studies.inputs import Column, int_in_range, one_of, text
from grace_dagster.studies.text import NAME, first_name_match, is_person, number_value, plain_reply, settled

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


def counts_agree_with_speech(row: dict) -> tuple[str, str] | None:
    """A file's `access` and `observed` must agree with what the speech says and with each other: a trial whose
    numbers contradict its text would be analysed in another condition than the one its prompt shows."""
    speech = {"speech": row["speech"]}
    for column, stated in (("access", access_from_speech(speech)), ("observed", observed_from_speech(speech))):
        given = row.get(column)
        if given is not None and stated is not None and given != stated:
            return column, f"the speech says {stated} but {column} is {given}; expected the same number in both"
    access, observed = row.get("access"), row.get("observed")
    if access is not None and observed is not None and observed > access:
        return (
            "observed",
            f"{observed} observed of the {access} the speaker looked at (access); expected at most {access}",
        )
    return None


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


def _leading_answer(text: str, label: str, answer: str) -> tuple[re.Match[str], str] | None:
    """The reply's leading answer (the pattern `answer`, after an optional label such as "Prior:" or "Answer:") and
    the text after it, when the answer ends there: at the reply's end, a punctuation mark or a line break. "2 or
    more", "One can't know", "No idea" and "Yes if he looked" open with an answer's word without giving it."""
    reply = plain_reply(text)
    match = re.match(rf"(?:(?:answer|{label})\s*[:=-]\s*)?{answer}\s*(?=[.!,;:\n]|$)", reply, re.IGNORECASE)
    return (match, reply[match.end() :]) if match else None


# Study 1's answers are short formats, and each parser reads a reply only when it is the answer and nothing else
# (or, for the knowledge question, the answer and a clause that says the same). A reason after the answer goes to
# the judge: it rarely changes the answer, but no pattern can tell when it does ("2. Actually, fewer", "No, he's
# fully informed", "0: 10, ... (in hundreds)").
_END = re.compile(r"[\s.!]*")
_NUMBER = r"\d+(?:\.\d+)?|zero|none|one|two|three"


def parse_prior(text: str) -> dict | None:
    """A reply that is the number: "2", "Two.", "Prior: 2 of the 3 seeds", "None of them"."""
    found = _leading_answer(
        text, "prior", rf"(?P<value>{_NUMBER})(?:\s+(?:out\s+)?of\s+(?:the\s+)?(?:3|three)(?:\s+[a-z]+)?|\s+of\s+them)?"
    )
    if not found or not _END.fullmatch(found[1]):
        return None
    return {"Prior_A": number_value(found[0].group("value"))}


_BET = re.compile(r"(?<![\d.])(\d+)\s*[:=]\s*\$?\s*(\d+(?:\.\d+)?)")
# What may stand around the four bets: a label ("Here are my bets:"), the total, the currency, separators.
_BET_FRAME = re.compile(
    r"\b(?:here\s+(?:are|is)\s+)?(?:my\s+)?(?:final\s+)?(?:bets?|answer)\b|\btotal(?:\s*[:=])?(?:\s*\$)?\s*100\b"
    r"|\bdollars?\b|\band\b|[$\s,;.:=|*-]",
    re.IGNORECASE,
)


def parse_bets(text: str) -> dict | None:
    """Bets given as "0: 10, 1: 20, 2: 50, 3: 20" (with or without $), each state once, and nothing else but a label
    and the total ("Here are my bets:", "Total: $100"). Values are returned as read, even out of range or not adding
    up to 100, so the schema refuses them with the reason."""
    reply = plain_reply(text)
    bets: dict[str, str] = {}
    for state, dollars in _BET.findall(reply):
        if bets.setdefault(state, dollars) != dollars:
            return None  # two different bets on one state
    if set(bets) != {str(k) for k in STATES} or _BET_FRAME.sub("", _BET.sub("", reply)):
        return None
    return {f"Bet_{k}": number_value(bets[str(k)]) for k in STATES}


# A clause after yes or no that says the same, about the speaker (he, she, they, a name or "the speaker"), optionally
# with "exactly" and the question's "how many of the 3 ...": "Yes, he knows exactly", "No, Omar doesn't actually know
# how many of the 3 bulbs have bloomed", "No, I don't think Priya does", "No, I don't think so".
_PERSON = rf"(?:{NAME}|the\s+speaker)"
_EXACTLY = rf"(?:\s+(?:exactly|precisely))?(?:\s+how\s+many\b(?P<object>[^.!?\n,;]*))?{_END.pattern}"
_SAYS_SAME = {
    "yes": re.compile(
        rf"[\s,;:]*(?P<who>{_PERSON})\s+(?:does|knows|did|knew|can\s+know)(?:\s+know)?{_EXACTLY}", re.IGNORECASE
    ),
    "no": re.compile(
        rf"[\s,;:]*(?:(?P<who>{_PERSON})\s+(?:doesn't|does\s+not|didn't|did\s+not|can't|cannot|couldn't|could\s+not)"
        rf"(?:\s+(?:really|actually|truly))?(?:\s+know)?|I\s+(?:don't|do\s+not)\s+think\s+(?:so|(?P<thought_of>"
        rf"{_PERSON})\s+(?:does|knows|did|knew)))\b{_EXACTLY}",
        re.IGNORECASE,
    ),
}
# What the question's object may not contain: "how many, but he knows it's two", "how many or not".
_NOT_AN_OBJECT = re.compile(r"\b(?:yes|no|knows?|knew|does|did)\b", re.IGNORECASE)


def _says_same(value: str, rest: str) -> bool:
    match = _SAYS_SAME[value].fullmatch(rest)
    if not match:
        return False
    who = match.group("who") or match.groupdict().get("thought_of")
    person = who is None or " ".join(who.lower().split()) == "the speaker" or is_person(who)  # None: "I don't think so"
    return person and settled(match.group("object") or "", _NOT_AN_OBJECT)


def parse_knowledge(text: str) -> dict | None:
    """A reply that is yes or no, alone or with a clause that says the same about the speaker ("Yes, he knows
    exactly", "No, she doesn't know how many of the 3 jars have grown mold", "No, I don't think so"). "No idea", "No,
    he knows", "No, he's fully informed" and "Yes, he looked at all of them" go to the judge."""
    found = _leading_answer(text, "knowledge", "(?P<value>yes|no)")
    if not found:
        return None
    value, rest = found[0].group("value").lower(), found[1]
    return {"Knowledge_A": value} if _END.fullmatch(rest) or _says_same(value, rest) else None


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
            weights = chosen.n_answers.sum()
            mean = (chosen.bet_knows_exactly * chosen.n_answers).sum() / weights if weights else float("nan")
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


BET_VALUES = [*[f"bet_{k}" for k in STATES], "bet_knows_exactly"]
MEASURES = {**{f"bet_{k}": f"bet on {k}" for k in STATES}, "bet_knows_exactly": "bet that the speaker knows exactly"}
SOURCES = {"exp1": "Experiment 1 (sampled answers)", "exp2": "Experiment 2 (exact probabilities)"}


def _said_kind(said: pd.Series) -> pd.Series:
    """ "some" or "a number": the two utterance kinds people's knowledge bets are reported for."""
    return said.where(said.isin(QUANTIFIERS.values()), "a number")


def _answers(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per source, one row per placed answer with its bets in dollars: Experiment 1 one row per extracted sample
    (the bets it gave; knows exactly: 100 for yes, 0 for no), Experiment 2 one row per trial (the four states'
    expected chances rescaled to 100 dollars; knows exactly: 100 × p(yes))."""
    exp1 = analysis.usable_exp1(table)
    exp2 = analysis.exp2_rows(table, "exp2_bet_0")
    sources = {
        "exp1": (exp1, [f"exp1_Bet_{k}" for k in STATES], exp1["exp1_Knowledge_A"].map({"yes": 100.0, "no": 0.0})),
        "exp2": (exp2, [f"exp2_bet_{k}" for k in STATES], exp2["exp2_knowledge_p_yes"] * 100.0),
    }
    frames = {}
    for source, (rows, bet_columns, knows) in sources.items():
        frame = rows[["model", ID_COLUMN, analysis.ITEM, *CONDITION]].copy()
        for k, column in zip(STATES, bet_columns):
            frame[f"bet_{k}"] = rows[column].astype("float64")
        frame["bet_knows_exactly"] = pd.Series(knows, index=rows.index, dtype="float64")
        frame = frame.dropna(subset=[*CONDITION, "bet_0"])
        frames[source] = frame.astype({"access": "int64", "said": "string"}).assign(
            said_kind=lambda f: _said_kind(f.said)
        )
    return frames


def _items(frame: pd.DataFrame, model: str) -> int:
    """How many items (stories) a model's rows come from: what its fit statistics are resampled over."""
    return int(frame.loc[frame["model"] == model, analysis.ITEM].nunique())


def _bets_by_condition(
    boot: analysis.Bootstrap, answers: dict[str, pd.DataFrame], inp: AnalysisInput
) -> tuple[pd.DataFrame, dict[str, analysis.CellMeans]]:
    """Mean bets on each state and on "knows exactly" (dollars), with intervals over stories, per model × source ×
    (access, said) condition."""
    frames, cells = [], {}
    for source, frame in answers.items():
        if frame.empty:
            continue
        means = cells[source] = boot.means(frame, ["model", *CONDITION], BET_VALUES)
        table = means.frame()
        table.insert(0, "n_items", means.n_items)
        table.insert(0, "n_answers", means.n_rows.astype(int))
        table.insert(
            0, "n_trials", frame.groupby(["model", *CONDITION])[ID_COLUMN].nunique().reindex(means.index).to_numpy()
        )
        table.insert(0, "source", source)
        frames.append(table.reset_index())
    columns = ["model", *CONDITION, "source", "n_trials", "n_answers", "n_items"]
    bets = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*columns, *BET_VALUES])
    bets = bets[
        [
            "model",
            "source",
            "access",
            "said",
            *[c for c in bets.columns if c not in ("model", "source", "access", "said")],
        ]
    ]
    temperature = analysis.sampling_columns(inp, bets["model"])["exp1_temperature"]
    bets["temperature"] = temperature.where(bets["source"] == "exp1", analysis.EXP2_TEMPERATURE)
    return bets.astype({"access": "Int64", "said": "string", "n_answers": "int64"}), cells


def _exp1_vs_exp2(cells: dict[str, analysis.CellMeans], inp: AnalysisInput) -> pd.DataFrame:
    """Per model × condition × measure: the mean bet in Experiment 1 beside Experiment 2's (dollars), and their
    difference, each with its interval over stories (the two from the same resamples)."""
    if set(cells) != {"exp1", "exp2"}:
        return pd.DataFrame()
    index = cells["exp1"].index.union(cells["exp2"].index)
    exp1, exp2 = cells["exp1"].reindex(index), cells["exp2"].reindex(index)
    n_items = np.minimum(exp1.n_items, exp2.n_items).astype(int)
    exp1_low, exp1_high = exp1.interval()
    exp2_low, exp2_high = exp2.interval()
    difference_low, difference_high = analysis.percentile_interval(exp1.replicates - exp2.replicates, n_items)
    rows = []
    for i, (model, access, said) in enumerate(index):
        for j, value in enumerate(BET_VALUES):
            rows.append(
                {
                    "model": model,
                    "access": access,
                    "said": said,
                    "measure": MEASURES[value],
                    "exp1_answers": int(exp1.n_rows[i]),
                    "exp2_trials": int(exp2.n_rows[i]),
                    "n_items": n_items[i],
                    "exp1_mean": exp1.point[i, j],
                    "exp1_ci_low": exp1_low[i, j],
                    "exp1_ci_high": exp1_high[i, j],
                    "exp2_mean": exp2.point[i, j],
                    "exp2_ci_low": exp2_low[i, j],
                    "exp2_ci_high": exp2_high[i, j],
                    "difference": exp1.point[i, j] - exp2.point[i, j],
                    "difference_ci_low": difference_low[i, j],
                    "difference_ci_high": difference_high[i, j],
                }
            )
    table = pd.DataFrame(rows).astype({"access": "Int64", "said": "string"})
    return table.join(analysis.sampling_columns(inp, table["model"]))


def _people_knows(human: dict, said_kind: str, access: int) -> float:
    """People's mean bet that the speaker knows exactly, for "some" by access and for numbers by partial (1-2) or
    complete (3) access."""
    if said_kind == "some":
        return human["exp1_knowledge_bets_by_access"][str(access)]["mean"]
    numbers = human["exp2_knowledge_bets"]
    return numbers["complete_access_mean"] if access == 3 else numbers["partial_access_mean"]


def _knowledge(
    boot: analysis.Bootstrap, answers: dict[str, pd.DataFrame], human: dict, inp: AnalysisInput
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The bet that the speaker knows exactly (dollars), per model × source × what was said (some, a number) ×
    access, beside people's; and per model × source r and RMSE against people's five reported means (some at
    access 1, 2, 3; numbers at partial and complete access), with intervals over stories."""
    frames, fits = [], []
    reference = [("some", [1], 1), ("some", [2], 2), ("some", [3], 3), ("a number", [1, 2], 1), ("a number", [3], 3)]
    for source, frame in answers.items():
        if frame.empty or not frame["said_kind"].isin(["some", "a number"]).any():
            continue
        means = boot.means(frame, ["model", "said_kind", "access"], ["bet_knows_exactly"])
        table = means.frame({"bet_knows_exactly": "bet_knows_exactly"})
        table.insert(0, "n_items", means.n_items)
        table.insert(0, "n_answers", means.n_rows.astype(int))
        table = table.reset_index()
        table.insert(1, "source", source)
        table["people_mean_bet"] = [_people_knows(human, k, a) for k, a in zip(table.said_kind, table.access)]
        frames.append(table)
        grouped = frame.assign(
            condition=[
                f"{kind}, access {'1-2' if kind == 'a number' and access < 3 else access}"
                for kind, access in zip(frame.said_kind, frame.access)
            ]
        )
        conditions = boot.means(grouped, ["model", "condition"], ["bet_knows_exactly"])
        people = {
            f"{kind}, access {'1-2' if accesses == [1, 2] else accesses[0]}": _people_knows(human, kind, a)
            for kind, accesses, a in reference
        }
        for model in conditions.index.get_level_values("model").unique():
            mine = conditions.reindex(conditions.index[conditions.index.get_level_values("model") == model])
            human_values = np.array([people.get(c, np.nan) for c in mine.index.get_level_values("condition")])
            fit = analysis.fit_with_interval(
                mine.point[:, 0], mine.replicates[:, :, 0], human_values, _items(frame, model), "knowledge"
            )
            fits.append({"model": model, "source": source, "conditions": fit.pop("knowledge_values"), **fit})
    knowledge = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    fit_table = pd.DataFrame(fits)
    for table in (knowledge, fit_table):
        if len(table):
            temperature = analysis.sampling_columns(inp, table["model"])["exp1_temperature"]
            table["temperature"] = temperature.where(table["source"] == "exp1", analysis.EXP2_TEMPERATURE)
    return knowledge, fit_table


def _coherence(boot: analysis.Bootstrap, table: pd.DataFrame) -> pd.DataFrame:
    """Per model, from Experiment 2: the sum of the four states' expected chances, each asked on its own (people's
    bets add up to 100 by construction; a coherent model's would too), and p(yes) for the knowledge question by
    the speaker's access, each mean with its interval over stories."""
    rows = analysis.exp2_rows(table, "exp2_state_means_sum").dropna(subset=["access"])
    if rows.empty:
        return pd.DataFrame()
    rows = rows.assign(model=rows["model"], access=rows["access"].astype("int64"))
    sums = boot.means(rows, ["model"], ["exp2_state_means_sum"])
    knows = boot.means(rows, ["model", "access"], ["exp2_knowledge_p_yes"])
    sums_low, sums_high = sums.interval()
    knows_low, knows_high = knows.interval()
    out = []
    for i, model in enumerate(sums.index):
        mine = rows[rows.model == model]["exp2_state_means_sum"]
        row = {
            "model": model,
            "n_trials": int(sums.n_rows[i]),
            "n_items": int(sums.n_items[i]),
            "state_means_sum_mean": sums.point[i, 0],
            "state_means_sum_ci_low": sums_low[i, 0],
            "state_means_sum_ci_high": sums_high[i, 0],
            "state_means_sum_min": float(mine.min()),
            "state_means_sum_max": float(mine.max()),
        }
        for access in STATES[1:]:
            position = knows.index.get_indexer([(model, access)])[0]
            found = position >= 0
            row[f"knowledge_p_yes_access_{access}"] = knows.point[position, 0] if found else np.nan
            row[f"knowledge_p_yes_access_{access}_ci_low"] = knows_low[position, 0] if found else np.nan
            row[f"knowledge_p_yes_access_{access}_ci_high"] = knows_high[position, 0] if found else np.nan
        out.append(row)
    return pd.DataFrame(out)


# --- Plots ---------------------------------------------------------------------------------------------------------


def _plot_bets(bets: pd.DataFrame) -> bytes:
    conditions = sorted({(int(a), str(s)) for a, s in zip(bets.access, bets.said)})
    figure, axes = plt.subplots(1, max(len(conditions), 1), figsize=(3 * max(len(conditions), 1), 3), sharey=True)
    axes = [axes] if len(conditions) <= 1 else axes
    for axis, (access, said) in zip(axes, conditions):
        cell = bets[(bets.access == access) & (bets.said == said)]
        for offset, row in enumerate(cell.itertuples(index=False)):
            values = [getattr(row, f"bet_{k}") for k in STATES]
            low = [getattr(row, f"bet_{k}_ci_low") for k in STATES]
            high = [getattr(row, f"bet_{k}_ci_high") for k in STATES]
            axis.errorbar(
                np.array(STATES) + 0.06 * offset,
                values,
                yerr=analysis.error_bars(values, low, high),
                marker="o",
                capsize=2,
                label=f"{row.model}, {SOURCES[row.source]}, 95% CI over stories",
            )
        axis.set_title(f"looked at {access}, said '{said}'", fontsize=9)
        axis.set_xticks(STATES)
        axis.set_xlabel("state (how many of 3)")
    return analysis.finish(
        figure,
        "mean bet ($ of 100)",
        "Study 1: bets on each state after the utterance, by speaker access (Experiment 2: expected chances rescaled "
        "to $100; no per-state human data is public)",
    )


def _plot_exp1_vs_exp2(comparison: pd.DataFrame, note: str) -> bytes:
    models = sorted(comparison["model"].unique())
    figure, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4.4), squeeze=False)
    for axis, model in zip(axes[0], models):
        mine = comparison[comparison.model == model]
        for measure, marker in zip(MEASURES.values(), "os^vD"):
            chosen = mine[mine.measure == measure]
            axis.errorbar(
                chosen.exp2_mean,
                chosen.exp1_mean,
                xerr=analysis.error_bars(chosen.exp2_mean, chosen.exp2_ci_low, chosen.exp2_ci_high),
                yerr=analysis.error_bars(chosen.exp1_mean, chosen.exp1_ci_low, chosen.exp1_ci_high),
                marker=marker,
                linestyle="none",
                capsize=2,
                label=measure,
            )
        axis.plot([0, 100], [0, 100], color="grey", linewidth=0.8, label="equal in both experiments")
        axis.set_xlim(-2, 102)
        axis.set_ylim(-2, 102)
        axis.set_title(f"{model}: one point per access × said condition", fontsize=9)
        axis.set_xlabel("Experiment 2: mean bet ($ of 100)")
    return analysis.finish(
        figure,
        "Experiment 1: mean bet ($ of 100)",
        "Study 1: Experiment 1 against Experiment 2 per condition (Experiment 2: the states' expected chances rescaled "
        f"to $100), 95% CIs over stories\n{textwrap.fill(note, 110)}",
    )


def _plot_knowledge(knowledge: pd.DataFrame, human: dict) -> bytes:
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    spread = {
        "some": [human["exp1_knowledge_bets_by_access"][str(a)]["spread"] for a in (1, 2, 3)],
        "a number": [human["exp2_knowledge_bets"]["partial_access_spread"]] * 2
        + [human["exp2_knowledge_bets"]["complete_access_spread"]],
    }
    for axis, kind in zip(axes, ("some", "a number")):
        people = [_people_knows(human, kind, a) for a in (1, 2, 3)]
        axis.errorbar(
            [1, 2, 3],
            people,
            yerr=spread[kind],
            label="people (Goodman & Stuhlmüller 2013), ± reported spread",
            capsize=3,
            **analysis.PEOPLE_STYLE,
        )
        mine = knowledge[knowledge.said_kind == kind] if len(knowledge) else knowledge
        for offset, ((model, source), group) in enumerate(mine.groupby(["model", "source"]) if len(mine) else []):
            group = group.sort_values("access")
            axis.errorbar(
                group.access + 0.06 * (offset + 1),
                group.bet_knows_exactly,
                yerr=analysis.error_bars(
                    group.bet_knows_exactly, group.bet_knows_exactly_ci_low, group.bet_knows_exactly_ci_high
                ),
                marker="o",
                capsize=2,
                label=f"{model}, {SOURCES[source]}, 95% CI over stories",
            )
        title = "said 'some'" if kind == "some" else "said a number (people: access 1-2 pooled)"
        axis.set_title(title, fontsize=9)
        axis.set_xticks([1, 2, 3])
        axis.set_xlabel("speaker's access (objects looked at, of 3)")
        axis.set_ylim(-2, 102)
    return analysis.finish(
        figure,
        "bet that the speaker knows exactly ($ of 100)",
        "Study 1: does the speaker know exactly? Experiment 1: 100 × share of yes; Experiment 2: 100 × p(yes)",
    )


def _plot_coherence(table: pd.DataFrame) -> bytes:
    rows = analysis.exp2_rows(table, "exp2_state_means_sum")
    figure, axes = plt.subplots(1, 1, figsize=(6, 3.2), squeeze=False)
    axis = axes[0][0]
    bins = np.linspace(0, max(200.0, float(rows["exp2_state_means_sum"].max()) + 10), 41)
    for model, group in rows.groupby("model"):
        axis.hist(group["exp2_state_means_sum"], bins=bins, alpha=0.6, label=model)
    axis.axvline(100, color="black", linewidth=2, label="100: coherent (people's bets add up to 100)")
    axis.set_xlabel("sum of the 4 states' expected chances (percentage points)")
    return analysis.finish(
        figure,
        "trials (count)",
        "Study 1, Experiment 2: do the separately asked chances of 0, 1, 2 and 3 add up to 100%?",
    )


def analyze(inp: AnalysisInput) -> Analysis:
    table = analysis.model_trial_table(inp, EXP1_COLUMNS, EXP2_COLUMNS)
    table.insert(table.columns.get_loc("quantifier") + 1, "said", _said(table))
    # Experiment 2 reads each state's chance separately; rescaled to 100 dollars they compare with the bets. Their
    # sum before rescaling says how coherent the four separate answers are.
    means = table[[f"exp2_state{k}_mean" for k in STATES]].astype("float64")
    table["exp2_state_means_sum"] = means.sum(axis=1, min_count=len(STATES))
    for k in STATES:
        table[f"exp2_bet_{k}"] = 100.0 * means[f"exp2_state{k}_mean"] / table["exp2_state_means_sum"]
    labels, unit = analysis.item_labels(table, inp.study)
    boot = analysis.Bootstrap.over(labels, unit)
    working = table.assign(**{analysis.ITEM: labels})
    answers = _answers(working)
    human = analysis.reference_json("gs2013_reported_stats.json")
    bets, cells = _bets_by_condition(boot, answers, inp)
    findings = _findings(bets, human)
    comparison = _exp1_vs_exp2(cells, inp)
    knowledge, fits = _knowledge(boot, answers, human, inp)
    coherence = _coherence(boot, working)
    masses = analysis.captured_mass(inp)
    note = analysis.temperature_note(inp)
    tests = findings.dropna(subset=["agrees_with_people"])
    agreement = {
        f"{m} {s}": f"{int(g.agrees_with_people.sum())}/{len(g)}" for (m, s), g in tests.groupby(["model", "source"])
    }
    figures = {}
    if len(bets):
        figures["bets_by_condition"] = _plot_bets(bets)
        figures["knowledge_by_access"] = _plot_knowledge(knowledge, human)
    if len(comparison):
        figures["exp1_vs_exp2"] = _plot_exp1_vs_exp2(comparison, note)
    if len(coherence):
        figures["coherence"] = _plot_coherence(table)
    if len(masses):
        figures["captured_mass"] = analysis.captured_mass_figure(masses, "Study 1, Experiment 2")
    return Analysis(
        table=table,
        comparisons={
            "bets_by_condition": bets,
            "findings": findings,
            "exp1_vs_exp2": comparison,
            "knowledge_by_access": knowledge,
            "fit_by_model": fits,
            "coherence": coherence,
            "captured_mass": analysis.captured_mass_summary(masses),
        },
        figures=figures,
        metadata={
            "implicature_tests_agreeing_with_people": agreement,
            "trials_not_placed": not_placed(table),
            "temperatures": note,
            "uncertainty": boot.describe(),
        },
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
    row_checks=(counts_agree_with_speech,),
    item_column="story",
)
