"""Faults inside a run, on the real pipeline: killed runs resume without repeating a request or losing a row,
damaged checkpoint files are read past, a second process on a partition is refused, a bad input stops `grace run`
before any model server starts, and the servers a run starts listen on loopback and die with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from dagster import DagsterInstance, materialize

from grace_dagster.assets import (
    ALL_ASSETS,
    ALL_CHECKS,
    exp1,
    exp1_responses,
    exp1_structured,
    exp2,
    exp2_probabilities,
    structured,
)
from grace_dagster.assets.exp1 import conversation_jobs
from grace_dagster.assets.exp2 import question_jobs
from grace_dagster.llm.batch import Checkpoint, CheckpointBusy
from grace_dagster.registry import load_registry
from grace_dagster.resources import ExperimentSettings
from grace_dagster.studies import STUDIES, study1
from tests import pipeline
from tests.dagster_dev import REPO, new_home

MODEL = "smollm2-135m"


def test_checkpoint_keys_survive_edits_to_code_and_change_with_the_request(monkeypatch):
    """A request's key is the model, the exact request and an explicit method version: an edit to a plot, a check
    message or an analysis function (which changes the modules' code versions) keeps every finished request."""
    model, settings = load_registry().get(MODEL), ExperimentSettings()
    keys = {}
    for name, study in STUDIES.items():
        trials = study.load().head(3)
        keys[name] = (
            set(conversation_jobs(study, trials, model, settings)),
            set(question_jobs(study, trials, model)[0]),
        )
    for module in (exp1, exp2, structured):
        monkeypatch.setattr(module, "CODE_VERSION", "edited")
    monkeypatch.setattr(study1, "_plot_bets", lambda bets: b"")  # a plot rewritten
    monkeypatch.setattr(structured, "judged_and_failed_rows", lambda table, check: None)  # a check rewritten
    for name, study in STUDIES.items():
        trials = study.load().head(3)
        assert (
            set(conversation_jobs(study, trials, model, settings)),
            set(question_jobs(study, trials, model)[0]),
        ) == keys[name]
        warmer = ExperimentSettings(temperature=1.0)
        assert set(conversation_jobs(study, trials, model, warmer)).isdisjoint(keys[name][0]), "sampling counts"
        reworded = trials.assign(**{study.text_columns[0]: trials[study.text_columns[0]] + " Really."})
        assert set(conversation_jobs(study, reworded, model, settings)).isdisjoint(keys[name][0]), "the prompt counts"
        assert set(question_jobs(study, reworded, model)[0]).isdisjoint(keys[name][1])
        reseeded = ExperimentSettings(seed=settings.seed + 1)
        assert set(conversation_jobs(study, trials, model, reseeded)).isdisjoint(keys[name][0]), "the seed counts"
        reweighted = model.model_copy(update={"weights": model.weights.model_copy(update={"version": "9.9.9"})})
        assert reweighted.weights_revision != model.weights_revision
        assert set(conversation_jobs(study, trials, reweighted, settings)).isdisjoint(keys[name][0]), "the weights"
        assert set(question_jobs(study, trials, reweighted)[0]).isdisjoint(keys[name][1]), "the weights count"
    # A new way of asking, declared by bumping the method version, asks everything anew.
    monkeypatch.setattr(exp1, "EXP1_METHOD", exp1.EXP1_METHOD + "-next")
    monkeypatch.setattr(exp2, "EXP2_METHOD", exp2.EXP2_METHOD + "-next")
    for name, study in STUDIES.items():
        trials = study.load().head(3)
        assert set(conversation_jobs(study, trials, model, settings)).isdisjoint(keys[name][0]), "method version"
        assert set(question_jobs(study, trials, model)[0]).isdisjoint(keys[name][1]), "method version"


def test_checkpoint_reads_past_a_torn_and_a_garbage_line_and_keeps_every_good_one(tmp_path):
    path = tmp_path / "checkpoint.jsonl"
    good = [json.dumps({"key": f"k{i}", "value": i}) for i in range(3)]
    path.write_text(f"{good[0]}\n{{not json at all\n{good[1]}\n\x00\x01\n{good[2]}\n" + '{"key": "k3", "val')
    with Checkpoint(path) as checkpoint:
        assert sorted(checkpoint.records) == ["k0", "k1", "k2"] and checkpoint.skipped_lines == 3
        checkpoint.add("k3", {"value": 3})
    with Checkpoint(path) as checkpoint:
        assert sorted(checkpoint.records) == ["k0", "k1", "k2", "k3"], "the new record is not glued to the torn one"
    # A whole last record whose newline never made it to disk is kept, not asked again.
    path.write_text(f"{good[0]}\n{good[1]}")
    with Checkpoint(path) as checkpoint:
        assert sorted(checkpoint.records) == ["k0", "k1"] and checkpoint.skipped_lines == 0
        checkpoint.add("k2", {"value": 2})
    assert len(path.read_text().splitlines()) == 3


def test_a_second_process_on_a_partition_is_refused_with_a_clear_message(tmp_path):
    path = tmp_path / "checkpoint.jsonl"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys, time
            from grace_dagster.llm.batch import Checkpoint
            checkpoint = Checkpoint(__import__("pathlib").Path({str(path)!r}))
            print("holding", flush=True)
            time.sleep(60)
        """),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(CheckpointBusy, match="in use by another run of the same partition; wait for it"):
            Checkpoint(path)
    finally:
        holder.kill()
        holder.wait()
    Checkpoint(path).close()  # free again once the other process is gone


@pytest.mark.slow
def test_exp2_killed_run_resumes_with_no_question_asked_twice(tmp_path, servers):
    trials = 3
    home = new_home(tmp_path / "home")
    data = tmp_path / "data"
    instance = DagsterInstance.local_temp(tempdir=str(home))
    res = pipeline.resources(tmp_path, trial_limit=trials, base_urls={MODEL: servers(MODEL).base_url})
    pipeline.prepare(instance, res, [MODEL], studies=("study2",))
    checkpoint = data / "checkpoints" / "exp2" / MODEL / "study2.jsonl"
    config = {
        "resources": {
            "settings": {"config": {"trial_limit": trials}},
            "llm": {"config": {"base_urls": {MODEL: servers(MODEL).base_url}}},
        }
    }
    pipeline.kill_part_way(
        home,
        data,
        "exp2/probabilities",
        f"{MODEL}|study2",
        config,
        lambda: len(pipeline.checkpoint_records(checkpoint)) >= 2,
    )
    before = len(pipeline.checkpoint_records(checkpoint))

    result = pipeline.run(instance, res, exp2_probabilities.key, MODEL, "study2")
    meta = pipeline.metadata(result, exp2_probabilities.key)
    # An utterance question per trial, and the literal-meaning questions of the informative trial(s).
    questions = meta["distinct_questions"]
    assert questions > trials and 2 <= before < questions, "killed part-way"
    assert result.success and meta["cache_hits"] == before and meta["requests_made"] == questions - before
    records = pipeline.checkpoint_records(checkpoint)
    assert len(records) == questions and len({r["key"] for r in records}) == questions, "each question once"
    long = pd.read_parquet(data / "exp2" / "probabilities" / MODEL / "study2.parquet")
    assert long.groupby(["trial_id", "question"]).ngroups == questions
    assert long["trial_id"].nunique() == trials and not long.duplicated(["trial_id", "question", "variant"]).any()


UNREADABLE = ["Hmm, hard to say.", "It depends on Ben, really.", "Well...", "Oh no."]


@pytest.mark.slow
def test_judge_killed_mid_extraction_resumes_with_no_reply_judged_twice(tmp_path, servers):
    home = new_home(tmp_path / "home")
    data = tmp_path / "data"
    instance = DagsterInstance.local_temp(tempdir=str(home))
    url = servers(MODEL).base_url
    res = pipeline.resources(tmp_path, trial_limit=4, max_tokens=8, base_urls={MODEL: url})
    pipeline.prepare(instance, res, [MODEL], studies=("study2",))
    assert pipeline.run(instance, res, exp1_responses.key, MODEL, "study2").success
    path = data / "exp1" / "responses" / MODEL / "study2.parquet"
    pd.read_parquet(path).assign(response_utterance=UNREADABLE, finish_reason_utterance="stop").to_parquet(path)
    checkpoint = data / "checkpoints" / "exp1-judge" / MODEL / "study2.jsonl"
    config = {
        "resources": {
            "settings": {"config": {"trial_limit": 4, "judge_audit_size": 0}},
            "llm": {"config": {"base_urls": {MODEL: url}}},
        }
    }
    pipeline.kill_part_way(
        home,
        data,
        "exp1/structured",
        f"{MODEL}|study2",
        config,
        lambda: len(pipeline.checkpoint_records(checkpoint)) >= 1,
    )
    before = len(pipeline.checkpoint_records(checkpoint))
    assert 1 <= before < 4, "killed part-way"

    res["settings"] = ExperimentSettings(trial_limit=4, judge_audit_size=0)
    result = materialize(
        [*ALL_ASSETS, *ALL_CHECKS],
        selection=[exp1_structured.key],
        partition_key=pipeline.key(MODEL, "study2"),
        resources=res,
        instance=instance,
        raise_on_error=False,
    )
    meta = pipeline.metadata(result, exp1_structured.key)
    assert meta["judge_cache_hits"] == before and meta["judge_requests_made"] >= 4 - before
    records = pipeline.checkpoint_records(checkpoint)
    assert len(records) == 4 and len({r["key"] for r in records}) == 4, "each reply judged once"
    table = pd.read_parquet(data / "exp1" / "structured" / MODEL / "study2.parquet")
    assert len(table) == 4 and table["trial_id"].is_unique


def test_grace_run_on_a_bad_study_file_names_file_row_and_column_and_starts_no_server(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "study2.csv").write_text("Scenario,Goal,State\nA scenario.,kindness,2\n")
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(new_home(tmp_path / "home")),
        "GRACE_DATA_DIR": str(tmp_path / "data"),
        "GRACE_INPUT_DIR": str(inputs),
        "TMPDIR": str(temp),
    }
    done = subprocess.run(
        [sys.executable, "-m", "grace_dagster.cli", "run", "--studies", "study2", "--trials", "2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode != 0
    assert f"{inputs / 'study2.csv'}" in done.stderr
    assert "row 1, line 2, column 'Goal': expected one of informative, social, both; got 'kindness'" in done.stderr
    assert not list(temp.glob("grace-serve-*.log")), "no model server was started"
    assert not (tmp_path / "data" / "checkpoints").exists()


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on `port`, from /proc (hex, little-endian IPv4)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.rsplit(":", 1)
            if state == "0A" and int(port_hex, 16) == port:
                found.add(address)
    return found


@pytest.mark.slow
def test_an_embedded_server_listens_on_loopback_only_and_dies_with_the_run_that_started_it(tmp_path):
    """The run process alone is SIGKILLed (not its process group): its server exits through the parent watchdog."""
    run = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import time
            from grace_dagster.serving.process import EmbeddedServer
            server = EmbeddedServer({MODEL!r}, log_dir={str(tmp_path)!r}).start()
            print(server.port, server.process.pid, flush=True)
            time.sleep(600)
        """),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    port, server_pid = (int(x) for x in run.stdout.readline().split())
    try:
        assert _listening_addresses(port) == {"0100007F"}, "127.0.0.1 only"
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Path(f"/proc/{server_pid}").exists():
            time.sleep(0.1)
        assert not Path(f"/proc/{server_pid}").exists() or "zombie" in Path(f"/proc/{server_pid}/status").read_text()
    finally:
        os.killpg(run.pid, signal.SIGKILL) if Path(f"/proc/{server_pid}").exists() else None


def _own_servers() -> list[int]:
    """Pids of the embedded servers this process started (their --parent-pid is this process)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "serve" in args and "--parent-pid" in args and args[args.index("--parent-pid") + 1] == str(os.getpid()):
            found.append(int(proc.name))
    return found


@pytest.mark.slow
def test_a_killed_model_server_is_started_again_and_the_partition_finishes_with_every_row_once(tmp_path):
    """The run's own embedded server is SIGKILLed after two conversations; the endpoint resource notices its
    process is gone, starts a new one, and the run asks only what was not finished."""
    instance = DagsterInstance.ephemeral()
    res = pipeline.resources(tmp_path, trial_limit=8, max_tokens=24)  # no base_urls: the resource starts the server
    pipeline.prepare(instance, res, [MODEL], studies=("study2",))
    checkpoint = tmp_path / "data" / "checkpoints" / "exp1" / MODEL / "study2.jsonl"
    killed: list[int] = []
    # The session's shared servers (tests/conftest.py) have this process as their parent too: never theirs.
    shared = set(_own_servers())

    def runs_servers() -> list[int]:
        return [pid for pid in _own_servers() if pid not in shared]

    def kill_when_two_done():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if sum("conversations" in r for r in pipeline.checkpoint_records(checkpoint)) >= 2 and runs_servers():
                killed.extend(runs_servers())
                for pid in killed:
                    os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_two_done)
    killer.start()
    result = pipeline.run(instance, res, exp1_responses.key, MODEL, "study2")
    killer.join()
    assert killed, "the server was killed mid-partition"
    meta = pipeline.metadata(result, exp1_responses.key)
    assert result.success and meta["server_restarts"] == 1
    conversations = [r for r in pipeline.checkpoint_records(checkpoint) if "conversations" in r]
    assert len(conversations) == 8 and len({r["trial_id"] for r in conversations}) == 8
    table = pd.read_parquet(tmp_path / "data" / "exp1" / "responses" / MODEL / "study2.parquet")
    assert len(table) == 8 and table["trial_id"].is_unique and table["response_utterance"].notna().all()
    assert not runs_servers(), "the restarted server is stopped at the end of the run"
