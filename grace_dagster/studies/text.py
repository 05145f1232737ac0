"""Reading the people and numbers out of vignette text and replies, shared by the studies' inputs and parsers.

Everything here answers "not found" (None) rather than guess: a derived value that is wrong would be wrong in every
prompt and every analysis built on it, silently.
"""

from __future__ import annotations

import re

NUMBER_VALUES = {"zero": 0, "none": 0, "one": 1, "two": 2, "three": 3}
# Capitalized words that open clauses in vignettes without being anyone's name.
NOT_NAMES = frozenset(
    "A An The This That These Those Your You I We He She They It His Her Their Its My Our Then Later Now Today "
    "Yesterday Tomorrow After Afterwards Before When While Meanwhile Finally So But And Or On In At Over From To "
    "Imagine Here There Speaker Listener Someone Somebody Everyone Nobody Dr Mr Mrs Ms Prof".split()
)
# A word that may be a name: letters of any script (Zoë, José, Łukasz), apostrophes and hyphens inside. Patterns
# built with it wrap themselves in a lookahead, so that "that Bob approached" is also tried from "Bob".
NAME = r"[^\W\d_][\w'’-]*"


def is_name(word: str) -> bool:
    return word[:1].isupper() and word.removesuffix("'s").removesuffix("’s") not in NOT_NAMES


def is_person(word: str) -> bool:
    """A name or a third-person pronoun: someone a reply's clause can be about ("he doesn't know", "Ann would say")."""
    return word.lower() in ("he", "she", "they") or is_name(word)


def first_name_match(pattern: re.Pattern[str], text: str, *groups: str) -> tuple[str, ...] | None:
    """The first match of `pattern` whose named `groups` are all names."""
    for match in pattern.finditer(text):
        found = tuple(match.group(g) for g in groups)
        if all(is_name(name) for name in found):
            return found
    return None


def number_value(token: str) -> int | str:
    """A number as read: whole numbers and number words become ints; anything else ("2.5") stays text, so the
    answer schema refuses it with its value named instead of the parser rounding it."""
    lowered = token.lower()
    if lowered in NUMBER_VALUES:
        return NUMBER_VALUES[lowered]
    return int(lowered) if lowered.isdigit() else token


_MARKUP = re.compile(r"[*_`#]")
_QUOTES = "\"'“”‘’«»"


def without_markup(text: str) -> str:
    """A reply without markdown emphasis and surrounding whitespace, its apostrophes straight."""
    return _MARKUP.sub("", text).replace("’", "'").replace("‘", "'").strip()


def plain_reply(text: str) -> str:
    """A reply without markdown, surrounding quotes and whitespace, its apostrophes straight."""
    return without_markup(text).strip(_QUOTES + " \n\t")


# What turns the text after a reply's answer into something other than a reason for it: a question, a negation, a
# hedge, a correction or retraction, an alternative, a condition, or irony ("2, but I'm not sure", "It was good. Or
# rather, bad.", "It was good. Nah.", "Yes, unless he lied"). Deliberately broad: a reason that uses one of these
# words goes to the judge, which costs a request; a hedge read as a settled answer would be a wrong number.
_QUALIFIER = re.compile(
    r"[?+%]|n't\b|\b(?:not|no|nor|never|none|nobody|noone|no-one|cannot|hardly|rarely|or|but|however|though|"
    r"although|yet|actually|maybe|perhaps|possibly|probably|likely|unlikely|might|may|could|guess|think|unsure|sure|"
    r"certain|uncertain|wait|mean|rather|instead|kidding|joking|sike|psych|nah|nope|scratch|correct\w*|reconsider\w*|"
    r"second\s+thoughts?|take\s+it\s+back|changed?\s+my\s+mind|avoid\w*|lie|lies|lied|lying|unless|if|except|"
    r"otherwise|approximately|roughly|around|only|just|sarcas\w*|ironic\w*|honest\w*|depends|either|neither)\b",
    re.IGNORECASE,
)


def settled(rest: str, answer_words: re.Pattern[str]) -> bool:
    """Whether the text after a reply's answer leaves that answer as it is: it names none of the turn's answer words
    (a second answer, or the same one qualified) and no question, negation, hedge or correction."""
    return not _QUALIFIER.search(rest) and not answer_words.search(rest)
