"""The project's own sample inputs, written in the shape of the original designs (not their sentences).

`python -m grace_dagster.studies.samples` rewrites `studies/data/study{1,2}.csv`; a test checks that the committed
files equal what this module writes, so the samples can only change here.
"""

from __future__ import annotations

import csv
import random
from itertools import product
from pathlib import Path

from grace_dagster.studies.base import DATA_DIR

# Study 1: six stories about three objects and a property that almost always holds.
STORIES = [
    dict(
        story="jam",
        speaker="Nora",
        noun="jars",
        setup="Homemade plum jam left open almost always grows mold within a week. Last week, cook Nora left "
        "3 jars of plum jam open in her pantry.",
        predicate="grown mold",
    ),
    dict(
        story="bulbs",
        speaker="Omar",
        noun="bulbs",
        setup="Tulip bulbs from the Veldhoven nursery almost always bloom by April. Last autumn, gardener Omar "
        "planted 3 Veldhoven bulbs.",
        predicate="bloomed",
    ),
    dict(
        story="batteries",
        speaker="Priya",
        noun="batteries",
        setup="Kestrel batteries left in a cold garage over winter almost always leak. Priya left 3 Kestrel "
        "batteries in her garage all winter.",
        predicate="leaked",
    ),
    dict(
        story="eggs",
        speaker="Tom",
        noun="eggs",
        setup="Eggs from the Halvorsen farm almost always have double yolks. Tom bought 3 Halvorsen eggs this morning.",
        predicate="double yolks",
    ),
    dict(
        story="parcels",
        speaker="Elena",
        noun="parcels",
        setup="Parcels sent with the Swiftline courier almost always arrive dented. Elena received 3 Swiftline "
        "parcels today.",
        predicate="arrived dented",
    ),
    dict(
        story="sensors",
        speaker="Sam",
        noun="sensors",
        setup="Thermometers from the old lab batch almost always fail calibration. Engineer Sam took 3 "
        "thermometers from that batch to test.",
        predicate="failed calibration",
    ),
]
# (access, observed): how many objects the speaker looked at and how many had the property (exp. 2 design).
STUDY1_CONDITIONS = [(1, 1), (2, 1), (2, 2), (3, 1), (3, 2), (3, 3)]
STUDY1_PARTICIPANTS = 50
NUMBER_WORD = {1: "One", 2: "Two", 3: "Three"}


def study1_rows() -> list[dict[str, object]]:
    rows = []
    for participant in range(1, STUDY1_PARTICIPANTS + 1):
        # A Latin square: each participant sees every story once and every condition once.
        for trial, (access, observed) in enumerate(STUDY1_CONDITIONS):
            s = STORIES[(participant + trial) % len(STORIES)]
            verb = "has" if observed == 1 else "have"
            noun, speaker, predicate = s["noun"], s["speaker"], s["predicate"]
            rows.append(
                {
                    "trial_id": f"s1-p{participant:03d}-t{trial + 1}",
                    "participant": participant,
                    "story": s["story"],
                    "access": access,
                    "observed": observed,
                    "story_setup": s["setup"],
                    "priorQ": f"How many of the 3 {noun} do you think have {predicate}?",
                    "speech": f'{speaker} calls you and says: "I have looked at {access} of the 3 {noun}. '
                    f'{NUMBER_WORD[observed]} of the {noun} {verb} {predicate}."',
                    "speechQ": f"Now how many of the 3 {noun} do you think have {predicate}?",
                    "knowledgeQ": f"Do you think {speaker} knows exactly how many of the 3 {noun} have {predicate}?",
                }
            )
    return rows


# Study 2: thirteen pieces of work a listener made, judged by a speaker who knows the field.
ITEMS = [
    ("scarf", "knitted a scarf", "knits a lot", "What did you think of my scarf?"),
    ("story", "wrote a short story", "reads a lot of fiction", "How was my story?"),
    ("birdhouse", "built a birdhouse", "does a lot of woodwork", "How was my birdhouse?"),
    ("curry", "cooked a curry for dinner", "cooks a lot", "How did my curry taste?"),
    ("toast", "gave a toast at a wedding", "gives a lot of speeches", "How was my toast?"),
    ("poster", "designed a poster for a concert", "works as a designer", "How was my poster?"),
    ("karaoke", "sang a song at karaoke night", "sings in a choir", "How was my singing?"),
    ("photos", "took photos at a friend's party", "is a photographer", "How were my photos?"),
    ("bowl", "made a pottery bowl", "makes a lot of pottery", "How was my bowl?"),
    ("bread", "baked a loaf of sourdough bread", "bakes a lot", "How did my bread taste?"),
    ("website", "built a website for a club", "builds websites for a living", "How was my website?"),
    ("lecture", "gave a guest lecture", "teaches at a university", "How was my lecture?"),
    ("garden", "planted a vegetable garden", "gardens a lot", "How was my garden?"),
]
NAME_PAIRS = [
    ("Ava", "Ben"),
    ("Carla", "Dev"),
    ("Eli", "Fatima"),
    ("Grace", "Hugo"),
    ("Ines", "Jonah"),
    ("Kofi", "Lena"),
    ("Maya", "Noah"),
    ("Oscar", "Pia"),
]
GOAL_LABELS = ("informative", "social", "both")
STUDY2_PARTICIPANTS = 202


def study2_rows(seed: int = 2020) -> list[dict[str, object]]:
    rng = random.Random(seed)
    rows = []
    for participant in range(1, STUDY2_PARTICIPANTS + 1):
        cells = list(product(GOAL_LABELS, range(4)))
        rng.shuffle(cells)
        items = rng.sample(ITEMS, len(cells))
        for trial, ((goal, state), (item, deed, expertise, question)) in enumerate(zip(cells, items, strict=True)):
            speaker, listener = rng.choice(NAME_PAIRS)
            if rng.random() < 0.5:
                speaker, listener = listener, speaker
            rows.append(
                {
                    "trial_id": f"s2-p{participant:03d}-t{trial + 1:02d}",
                    "participant": participant,
                    "item": item,
                    "speaker": speaker,
                    "listener": listener,
                    "Scenario": f"Imagine that {listener} {deed} but was not sure how good it was. {listener} "
                    f'went to {speaker}, who {expertise}, and asked: "{question}"',
                    "Goal": goal,
                    "State": state,
                }
            )
    return rows


def write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_samples(directory: Path = DATA_DIR) -> None:
    write_csv(directory / "study1.csv", study1_rows())
    write_csv(directory / "study2.csv", study2_rows())


if __name__ == "__main__":
    write_samples()
    print(f"wrote {DATA_DIR / 'study1.csv'} and {DATA_DIR / 'study2.csv'}")
