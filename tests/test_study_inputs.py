"""Study inputs: the shipped samples follow the designs, the group's Grace-only files load, bad files are refused
with the file, row and column named."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from grace_dagster.studies import STUDIES, InputError
from grace_dagster.studies.samples import study1_rows, study2_rows

STUDY1 = STUDIES["study1"]
STUDY2 = STUDIES["study2"]


def test_samples_have_the_full_design():
    s1 = STUDY1.load()
    assert len(s1) == 300 == STUDY1.full_size
    assert s1["trial_id"].is_unique
    assert set(zip(s1["access"], s1["observed"], strict=True)) == {(1, 1), (2, 1), (2, 2), (3, 1), (3, 2), (3, 3)}
    assert s1["story"].nunique() == 6
    s2 = STUDY2.load()
    assert len(s2) == 2424 == STUDY2.full_size
    cells = Counter(zip(s2["Goal"], s2["State"], strict=True))
    assert len(cells) == 12 and set(cells.values()) == {202}
    assert s2["item"].nunique() == 13


def test_committed_samples_equal_what_the_generator_writes(tmp_path):
    from grace_dagster.studies.samples import write_samples

    write_samples(tmp_path)
    for name in ("study1", "study2"):
        assert (tmp_path / f"{name}.csv").read_bytes() == STUDIES[name].sample_path.read_bytes(), (
            f"{name}.csv drifted from grace_dagster/studies/samples.py: run `make samples`"
        )


def test_grace_only_columns_load_with_derived_ids_and_factors(tmp_path):
    full = pd.read_csv(STUDY1.sample_path)
    grace_only = full[["story_setup", "priorQ", "speech", "speechQ"]].assign(notes="kept")
    path = tmp_path / "study1.csv"
    grace_only.to_csv(path, index=False)
    table = STUDY1.load(path)
    assert list(table["trial_id"][:2]) == ["study1-0001", "study1-0002"]
    # access and observed are parsed from the speech text, as the study defines it.
    assert table["access"].tolist() == full["access"].tolist()
    assert table["observed"].tolist() == full["observed"].tolist()
    assert table["participant"].isna().all()
    assert (table["notes"] == "kept").all(), "extra columns pass through"


def test_study2_state_accepts_hearts_wording(tmp_path):
    path = tmp_path / "study2.csv"
    path.write_text(
        "Scenario,Goal,State\n"
        "A scenario.,Informative,2 out of 3 hearts\n"
        "A scenario.,social,0 hearts\n"
        "A scenario.,both,3\n"
    )
    table = STUDY2.load(path)
    assert table["State"].tolist() == [2, 0, 3]
    assert table["Goal"].tolist() == ["informative", "social", "both"]


S2_HEADER = "trial_id,Scenario,Goal,State\n"
S2_ROW = 'a,"Imagine that Ben baked bread.",social,1\n'

# (name, study, file bytes, expected fragments of the message: row, column and what was expected)
BAD_INPUTS = [
    ("missing column", STUDY2, b"trial_id,Scenario,State\na,text,1\n", ["header", "'Goal'", "required column"]),
    ("empty file", STUDY2, b"", ["the file is empty", "Scenario, Goal, State"]),
    ("whitespace-only file", STUDY2, b"\n  \n", ["the file is empty"]),
    ("header only", STUDY2, S2_HEADER.encode(), ["header but no rows"]),
    (
        "duplicate id",
        STUDY2,
        (S2_HEADER + S2_ROW + S2_ROW).encode(),
        ["row 2", "line 3", "'trial_id'", "duplicate id 'a' (first used in row 1)"],
    ),
    (
        "unknown goal",
        STUDY2,
        (S2_HEADER + 'a,"text",kindness,1\n').encode(),
        ["row 1", "'Goal'", "expected one of informative, social, both; got 'kindness'"],
    ),
    (
        "state out of range",
        STUDY2,
        (S2_HEADER + S2_ROW + 'b,"text",both,4\n').encode(),
        ["row 2", "'State'", "expected a number of hearts from 0 to 3", "'4'"],
    ),
    (
        "blank text",
        STUDY2,
        (S2_HEADER + S2_ROW + 'b,"  ",both,2\n').encode(),
        ["row 2", "'Scenario'", "expected non-empty text"],
    ),
    (
        "non-UTF-8 bytes",
        STUDY2,
        (S2_HEADER + S2_ROW).encode() + b'b,"caf\xe9 au lait",both,2\n',
        ["row 2", "line 3", "'Scenario'", "expected UTF-8 text", "0xe9"],
    ),
    (
        "too few fields",
        STUDY2,
        (S2_HEADER + S2_ROW + "b,text,both\n").encode(),
        ["row 2", "expected 4 fields as in the header; found 3"],
    ),
    (
        "study 1 access out of range",
        STUDY1,
        b"story_setup,priorQ,speech,speechQ,access\nsetup,prior?,speech,now?,7\n",
        ["row 1", "'access'", "expected a whole number from 1 to 3; got 7"],
    ),
    (
        "study 1 access against the speech",
        STUDY1,
        b'story_setup,priorQ,speech,speechQ,access\nsetup,prior?,"Jim says: ""I have looked at 2 of the 3.""",now?,3\n',
        ["row 1", "'access'", "the speech says 2 but access is 3; expected the same number in both"],
    ),
    (
        "study 1 more observed than looked at",
        STUDY1,
        b"story_setup,priorQ,speech,speechQ,access,observed\nsetup,prior?,speech,now?,1,2\n",
        ["row 1", "'observed'", "2 observed of the 1 the speaker looked at (access); expected at most 1"],
    ),
    (
        "duplicate column name",
        STUDY1,
        b"story_setup,priorQ,speech,speech,speechQ\na,b,c,d,e\n",
        ["header", "'speech'", "appears twice"],
    ),
    (
        "misspelt optional column",
        STUDY1,
        b"story_setup,priorQ,speech,speechQ,acess\nsetup,prior?,speech,now?,2\n",
        ["header, column 'acess': not a column of this study; did you mean 'access'?"],
    ),
    (
        "optional column in another case",
        STUDY1,
        b"story_setup,priorQ,speech,speechQ,Access\nsetup,prior?,speech,now?,2\n",
        ["header, column 'Access': not a column of this study; did you mean 'access'?"],
    ),
    (
        "misspelt knowledge question",
        STUDY1,
        b"story_setup,priorQ,speech,speechQ,knowledge_Q\nsetup,prior?,speech,now?,Does he know?\n",
        ["header, column 'knowledge_Q': not a column of this study; did you mean 'knowledgeQ'?"],
    ),
    (
        "misspelt speaker",
        STUDY2,
        (S2_HEADER.strip() + ",speeker\n" + S2_ROW.strip() + ",Ben\n").encode(),
        ["header, column 'speeker': not a column of this study; did you mean 'speaker'?"],
    ),
    (
        "misspelt id column",
        STUDY2,
        ("Trial_ID" + S2_HEADER.removeprefix("trial_id") + S2_ROW).encode(),
        ["header, column 'Trial_ID': not a column of this study; did you mean 'trial_id'?"],
    ),
]


@pytest.mark.parametrize("study,content,fragments", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_file_row_column_and_expectation(tmp_path, study, content, fragments):
    path = tmp_path / f"{study.name}.csv"
    path.write_bytes(content)
    with pytest.raises(InputError) as info:
        study.load(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_a_misspelt_required_column_is_named_once_and_other_columns_pass_through(tmp_path):
    path = tmp_path / "study2.csv"
    path.write_text('scenario,Goal,State,Date\n"Imagine that Ben baked bread.",social,1,2024-05-01\n')
    with pytest.raises(InputError) as info:
        STUDY2.load(path)
    assert [str(p) for p in info.value.problems] == [
        "header, column 'scenario': not a column of this study; did you mean 'Scenario'?"
    ], "one problem, the misspelling, not also 'required column is missing'"
    path.write_text('Scenario,Goal,State,Date\n"Imagine that Ben baked bread.",social,1,2024-05-01\n')
    assert STUDY2.load(path)["Date"].tolist() == ["2024-05-01"], "a column unlike any of the study's passes through"


def test_columns_that_extend_or_cut_a_study_column_are_the_groups_own_and_pass_through(tmp_path):
    """Answer-schema names, plurals and numbered copies are not typos of a study column."""
    path = tmp_path / "study1.csv"
    path.write_text(
        "story_setup,priorQ,speech,speechQ,Knowledge_A,Knowledge,participants,access2\n"
        '"setup","How many?","Jim says: ""I have looked at 2 of the 3.""","Now how many?",yes,high,4,x\n'
    )
    table = STUDY1.load(path)
    assert table.loc[0, "Knowledge_A"] == "yes" and table.loc[0, "participants"] == "4" and table.loc[0, "access"] == 2


def test_study2_option_order_comes_from_the_trial_id_without_participants_and_short_rows_are_reported(tmp_path):
    path = tmp_path / "study2.csv"
    path.write_text("Goal,State,Scenario,participant\nsocial,2,A scenario.,\u00b2\nboth,1,Another.,\n")
    with pytest.raises(InputError) as info:
        STUDY2.load(path)
    assert "column 'participant'" in str(info.value)  # '²' is no participant number, and nothing crashes
    path.write_text("Goal,State,Scenario\nsocial,2,A scenario.\nboth,1\n")
    with pytest.raises(InputError, match="row 2, line 3: expected 3 fields as in the header; found 2"):
        STUDY2.load(path)
    path.write_text("Goal,State,Scenario\n" + "social,2,A scenario.\n" * 400)
    counts = STUDY2.load(path)["option_order"].value_counts()
    assert set(counts.index) == {1, 2, 3, 4} and counts.min() > 70, "generated ids spread the four orders"


@pytest.mark.parametrize(
    "header,row,shown",
    [
        ("Scenario;Goal;State", "A scenario.;social;1", "';'"),
        ("Scenario\tGoal\tState", "A scenario.\tsocial\t1", "tabs"),
        ("trial_id;Scenario;Goal;State,notes", "a;A scenario.;social;1,x", "';'"),
    ],
    ids=["semicolons", "tabs", "semicolons with a stray comma"],
)
def test_another_delimiter_is_named_instead_of_every_column_missing(tmp_path, header, row, shown):
    path = tmp_path / "study2.csv"
    path.write_text(f"{header}\n{row}\n")
    with pytest.raises(InputError) as info:
        STUDY2.load(path)
    assert str(path) in str(info.value)
    assert [str(p) for p in info.value.problems] == [
        f"header: the file appears to use {shown} as the delimiter; expected a comma-separated file "
        "(save or export it as CSV with commas)"
    ]


def test_every_problem_is_listed_not_only_the_first(tmp_path):
    path = tmp_path / "study2.csv"
    path.write_text(S2_HEADER + 'a,"x",kind,1\nb,"",both,9\n')
    with pytest.raises(InputError) as info:
        STUDY2.load(path)
    assert [(p.row, p.column) for p in info.value.problems] == [(1, "Goal"), (2, "Scenario"), (2, "State")]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(InputError, match="(?s)nope.csv: 1 problem.*the file does not exist"):
        STUDY1.load(tmp_path / "nope.csv")


def test_generators_are_deterministic():
    assert study1_rows() == study1_rows()
    assert study2_rows() == study2_rows()


FIXTURES = Path(__file__).with_name("fixtures")


def test_knowledge_question_is_derived_from_the_trial_for_all_54_original_stimuli(tmp_path):
    """The group's files have no knowledgeQ column: it is built from the speaker's name (in `speech`) and the
    referent (in `speechQ`) exactly as the original experiments asked it; access and the reported word likewise."""
    original = pd.read_csv(FIXTURES / "gs2013_rendered_stimuli.csv")
    assert len(original) == 54
    bare = original.rename(columns={"setup": "story_setup"})[["story_setup", "priorQ", "speech", "speechQ"]]
    bare.to_csv(tmp_path / "study1.csv", index=False)
    table = STUDY1.load(tmp_path / "study1.csv")
    assert table["knowledgeQ"].tolist() == original["knowledgeQ"].tolist()
    assert (table["knowledgeQ_source"] == "derived").all()
    assert table["access"].tolist() == original["access"].tolist()
    said = table["quantifier"].fillna(table["observed"].astype("string"))
    assert said.tolist() == [w.lower() for w in original["word"].astype(str)]


def test_knowledge_question_falls_back_to_the_generic_wording_only_without_a_name(tmp_path):
    path = tmp_path / "study1.csv"
    path.write_text(
        "story_setup,priorQ,speech,speechQ,knowledgeQ\n"
        'Seeds sprout.,How many?,"The speaker says: ""I have looked at 2 of the 3 seeds. Two of the seeds have '
        'sprouted.""",Now how many of the 3 seeds do you think have sprouted?,\n'
        'Seeds sprout.,How many?,"Amaru calls: ""I have looked at 2 of the 3 seeds. Two of the seeds sprouted.""",'
        "Now how many of the 3 seeds do you think have sprouted?,\n"
    )
    with pytest.raises(InputError, match="column 'knowledgeQ': expected non-empty text"):
        STUDY1.load(path)  # a knowledgeQ column with blank cells is a mistake in the file, not a request to derive
    bare = pd.read_csv(path).drop(columns="knowledgeQ")
    bare.to_csv(path, index=False)
    table = STUDY1.load(path)
    assert table["knowledgeQ"].tolist() == [
        "Do you think the speaker knows exactly how many of the 3 seeds have sprouted?",
        "Do you think Amaru knows exactly how many of the 3 seeds have sprouted?",
    ]
    assert table["knowledgeQ_source"].tolist() == ["generic", "derived"]
    assert table["observed"].tolist() == [2, 2], "a past-tense report ('sprouted') is read too"


def test_study1_some_trials_are_read_as_a_quantifier_with_access():
    table = STUDY1.load(FIXTURES / "study1_some_only.csv")
    assert table["quantifier"].tolist() == ["some"] * 6 and table["observed"].isna().all()
    assert table["access"].tolist() == [1, 3, 2, 3, 1, 2]
    assert table["knowledgeQ"].iloc[4] == "Do you think Łucja knows exactly how many of the 3 starters have doubled?"


def test_study2_names_come_from_the_scenario_when_there_are_no_name_columns():
    table = STUDY2.load(FIXTURES / "study2_bare_columns.csv")
    assert table["speaker"].tolist() == ["Amélie", "Amélie", "Bartłomiej", "Bartłomiej", "Ayşe", "Ayşe"]
    assert table["listener"].tolist() == ["Søren", "Søren", "Chiara", "Chiara", "Nnamdi", "Nnamdi"]
    assert table["State"].tolist() == [1, 3, 0, 2, 1, 2]


def test_study2_prompt_does_not_repeat_a_state_the_scenario_already_gives():
    trial = next(STUDY2.load(FIXTURES / "study2_bare_columns.csv").itertuples(index=False))
    (prompt,) = STUDY2.exp1_prompts(trial)
    assert prompt.count("out of 3 hearts") == 1 and "the speaker" not in prompt and "the listener" not in prompt
    assert "If Amélie wanted to make Søren feel good" in prompt and "what would Amélie be most likely to say?" in prompt
    # Without a stated state the prompt adds one, with the names of the file's columns.
    sample = next(STUDY2.load().itertuples(index=False))
    (prompt,) = STUDY2.exp1_prompts(sample)
    assert f"on a scale of 0 to 3 hearts: {sample.State} out of 3 hearts." in prompt and sample.speaker in prompt


def test_study2_scenario_stating_another_state_than_the_state_column_is_refused(tmp_path):
    rows = pd.read_csv(FIXTURES / "study2_bare_columns.csv")
    rows.loc[2, "State"] = "3"
    rows.to_csv(tmp_path / "study2.csv", index=False)
    with pytest.raises(InputError) as error:
        STUDY2.load(tmp_path / "study2.csv")
    assert "row 3, line 4, column 'Scenario': the scenario says 0 of 3 hearts but State is 3" in str(error.value)


def test_study1_prior_is_asked_in_its_own_turn_before_the_utterance_is_shown():
    trial = next(STUDY1.load().itertuples(index=False))
    prior, bets, knowledge = STUDY1.exp1_prompts(trial)
    utterance = trial.speech.split('"')[1]
    assert trial.priorQ in prior and utterance not in prior and trial.speechQ not in prior
    assert utterance in bets and trial.knowledgeQ not in bets
    assert knowledge.startswith(trial.knowledgeQ) and utterance not in knowledge
    assert [turn.key for turn in STUDY1.exp1_turns] == ["prior", "bets", "knowledge"]
    questions = {q.key: q for q in STUDY1.exp2_questions(trial)}
    assert (
        questions["prior"].options == ("0", "1", "2", "3")
        and utterance not in questions["prior"].messages[0]["content"]
    )
