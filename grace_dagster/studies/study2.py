"""Study 2: polite speech (Yoon, Tessler, Goodman & Frank 2020).

A speaker who has a goal (informative, social, or both) tells a listener how good their work was, given the true
state (0-3 hearts); the answer is one of eight utterances "It was / It wasn't" × terrible, bad, good, amazing.
"""

from __future__ import annotations

import re

from grace_dagster.studies.base import Study
from grace_dagster.studies.inputs import Column, int_in_range, one_of, text

GOALS = ("informative", "social", "both")
_HEARTS = re.compile(r"^\s*([0-3])\s*(?:(?:out\s+)?of\s+3\s+)?(?:hearts?)?\s*$", re.IGNORECASE)


def hearts(value: str) -> int:
    """The true state in hearts: "2", "2 hearts" or "2 out of 3 hearts"."""
    match = _HEARTS.match(value)
    if not match:
        raise ValueError(f"expected a number of hearts from 0 to 3 (e.g. 2 or '2 out of 3 hearts'); got {value!r}")
    return int(match.group(1))


STUDY = Study(
    name="study2",
    title="Polite speech",
    citation=(
        "Yoon, E. J., Tessler, M. H., Goodman, N. D. & Frank, M. C. (2020). Polite speech emerges from competing "
        "social goals. Open Mind 4:71-87. doi:10.1162/opmi_a_00035 (CC BY 4.0)"
    ),
    columns=(
        Column("Scenario", text, "string", required=True),
        Column("Goal", one_of(*GOALS), "string", required=True),
        Column("State", hearts, "Int64", required=True),
        Column("participant", int_in_range(1, 10**6), "Int64"),
        Column("item", text, "string"),
        Column("speaker", text, "string"),
        Column("listener", text, "string"),
    ),
    full_size=2424,
)
