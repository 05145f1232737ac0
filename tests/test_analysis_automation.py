"""The analysis brings itself up to date, and what it shows: `dagster dev` (webserver and daemon) on a temporary
instance with the project's dagster.yaml; a backfill of both experiments launched through GraphQL as the UI's
dialog launches it; nobody launches the analysis, the `analysis_automation` sensor (running by default) does once
the backfill has landed. A later run whose blocking check fails is refused by the analysis the automation runs
next. Then a real browser (Playwright driving Debian's Chromium) opens the analysis in the UI; screenshots of the
new tables and plots are saved under test-artifacts/ui/.

The model's Experiment 1 replies are real (the embedded SmolLM2 answered, 2 samples per trial), then replaced by
replies in the requested format that differ between samples, as a capable model gives them, so the structured
partitions pass the extraction gate honestly and Experiment 1 can be set against Experiment 2.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import pytest
import yaml
from dagster import AssetKey, DagsterInstance, RunsFilter

from grace_dagster.assets import exp1_responses
from grace_dagster.registry.loader import DEFAULT_REGISTRY_PATH
from grace_dagster.resources import ExperimentSettings
from tests import pipeline
from tests.dagster_dev import BACKFILL_STATUS, LAUNCH_BACKFILL, TERMINAL_BACKFILL, TERMINAL_RUN, DagsterDev, new_home
from tests.test_ui_onboarding import ARTIFACTS, CHROMIUM_ARGS

MODEL = "smollm2-135m"
STUDIES = ("study1", "study2")
SETTINGS = {"trial_limit": 3, "max_tokens": 16, "samples_per_trial": 2, "judge_audit_size": 2}
IN_FORMAT = {  # each sample's replies, by turn: samples differ, as sampled answers do
    "study1": [
        {"prior": "2", "bets": "0: 10, 1: 20, 2: 50, 3: 20", "knowledge": "No."},
        {"prior": "1", "bets": "0: 0, 1: 60, 2: 30, 3: 10", "knowledge": "Yes."},
        {"prior": "2", "bets": "0: 5, 1: 45, 2: 40, 3: 10", "knowledge": "Yes."},
    ],
    "study2": [{"utterance": "It wasn't bad."}, {"utterance": "It was terrible."}, {"utterance": "It was good."}],
}
OUTSIDE_THE_SCHEMA = {"utterance": "It was fantastic!"}
ANALYSIS = {study: AssetKey(["analysis", study]) for study in STUDIES}
EXPERIMENTS = [["exp1", "structured"], ["exp2", "probabilities"]]
SCREENSHOTS = {  # metadata entries shown in the UI, per study
    "study2": [
        "exp1_vs_exp2_by_model",
        "fit_by_model",
        "literal_fit_by_model",
        "exp1_vs_exp2",
        "plot_utterance_heatmaps",
        "plot_exp1_vs_exp2",
        "plot_negation_by_goal_state",
        "plot_literal_meaning",
        "plot_captured_mass",
    ],
    "study1": ["coherence", "exp1_vs_exp2", "plot_exp1_vs_exp2", "plot_knowledge_by_access", "plot_coherence"],
}


class Round(NamedTuple):
    dev: DagsterDev
    instance: DagsterInstance
    data: Path
    backfill: dict
    first: dict
    automation_runs: list


def _registry_with(path: Path, slugs: list[str]) -> None:
    raw = yaml.safe_load(Path(DEFAULT_REGISTRY_PATH).read_text())
    raw["models"] = [m for m in raw["models"] if m["slug"] in slugs]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def _replace_replies(data: Path, study: str, replies: list[dict]) -> None:
    path = data / "exp1" / "responses" / MODEL / f"{study}.parquet"
    responses = pd.read_parquet(path)
    chosen = list(itertools.islice(itertools.cycle(replies), len(responses)))
    for turn in chosen[0]:
        responses[f"response_{turn}"] = [reply[turn] for reply in chosen]
        responses[f"finish_reason_{turn}"] = "stop"
    responses.to_parquet(path, index=False)


def _backfill(dev: DagsterDev, partitions: list[str], assets: list[list[str]]) -> dict:
    """A backfill as the UI's dialog launches it, with the launchpad's settings, run to its end by the daemon."""
    params = {
        "partitionNames": partitions,
        "assetSelection": [{"path": a} for a in assets],
        "runConfigData": {"resources": {"settings": {"config": SETTINGS}}},
    }
    launched = dev.graphql(LAUNCH_BACKFILL, {"params": params})["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        backfill = dev.graphql(BACKFILL_STATUS, {"id": launched["backfillId"]})["partitionBackfillOrError"]
        if backfill["status"] in TERMINAL_BACKFILL and all(r["status"] in TERMINAL_RUN for r in backfill["runs"]):
            return backfill
        time.sleep(2)
    raise TimeoutError(f"backfill {launched['backfillId']} did not finish; see {dev.log}")


def _analysis_after(instance: DagsterInstance, study: str, after: float, timeout: float = 600):
    """The first materialization of analysis/<study> stored after `after` (a timestamp), waiting for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = instance.get_latest_materialization_event(ANALYSIS[study])
        if event is not None and event.timestamp > after:
            return event
        time.sleep(3)
    raise TimeoutError(f"analysis/{study} was not materialized by the automation within {timeout} s")


@pytest.fixture(scope="module")
def automated(tmp_path_factory, servers):
    """Round 1: real replies, 2 samples per trial, replaced by replies in the requested format; a backfill of both
    experiments; the analysis the automation materializes after it."""
    tmp = tmp_path_factory.mktemp("automation")
    home, data, registry = new_home(tmp / "home"), tmp / "data", tmp / "models.yaml"
    _registry_with(registry, [MODEL])
    env = {"GRACE_DATA_DIR": str(data), "GRACE_REGISTRY": str(registry)}
    res = pipeline.resources(tmp, base_urls={MODEL: servers(MODEL).base_url}, registry_path=str(registry))
    res["settings"] = ExperimentSettings(**SETTINGS)
    with DagsterDev(home, env, tmp / "dagster-dev.log") as dev:
        instance = dev.instance()
        pipeline.prepare(instance, res, [MODEL])
        for study in STUDIES:
            assert pipeline.run(instance, res, exp1_responses.key, MODEL, study).success
            _replace_replies(data, study, IN_FORMAT[study])
        landed = time.time()
        backfill = _backfill(dev, [f"{MODEL}|{study}" for study in STUDIES], EXPERIMENTS)
        first = {study: _analysis_after(instance, study, landed) for study in STUDIES}
        yield Round(dev, instance, data, backfill, first, _automation_runs(instance))


@pytest.fixture(scope="module")
def refused_later(automated):
    """Round 2: study 2's Experiment 1 is run again in a later run and fails its blocking check; the analysis the
    automation materializes next."""
    _replace_replies(automated.data, "study2", [OUTSIDE_THE_SCHEMA])
    failed_at = time.time()
    _backfill(automated.dev, [f"{MODEL}|study2"], [["exp1", "structured"]])
    return _analysis_after(automated.instance, "study2", failed_at)


def _automation_runs(instance: DagsterInstance) -> list:
    return instance.get_runs(RunsFilter(tags={"dagster/sensor_name": "analysis_automation"}))


def _metadata(event) -> dict:
    return {k: v.value for k, v in event.dagster_event.step_materialization_data.materialization.metadata.items()}


@pytest.mark.slow
def test_the_analysis_is_materialized_by_the_automation_once_a_backfill_has_landed(automated):
    backfill_runs = {r["runId"] for r in automated.backfill["runs"]}
    # One automated run for the whole backfill, both studies' analyses in it: it waited until no experiment
    # partition was in progress, then asked once.
    (run,) = automated.automation_runs
    assert run.asset_selection == set(ANALYSIS.values()) and run.run_id not in backfill_runs
    assert run.tags["dagster/from_automation_condition"] == "true"
    for event in automated.first.values():
        assert event.run_id == run.run_id
        meta = _metadata(event)
        read = meta["partitions_read_and_refused"]
        assert read.count("| ok ") == 2, read  # both experiments of the model were read
        assert "sampled at temperature 0.7" in meta["temperatures"] and "1000 resamples" in meta["uncertainty"]
    study2 = _metadata(automated.first["study2"])
    assert "tv_exp1_exp2" in study2["exp1_vs_exp2"] and "human_p_yes" in study2["literal_meaning"]
    assert {"plot_utterance_heatmaps", "plot_exp1_vs_exp2", "plot_literal_meaning", "plot_captured_mass"} <= set(study2)
    table = pd.read_parquet(Path(study2["parquet"]))
    assert table["sample"].tolist() == [0, 1] * 3, "one row per trial × sample"
    study1 = _metadata(automated.first["study1"])
    assert "state_means_sum_mean" in study1["coherence"] and "difference" in study1["exp1_vs_exp2"]
    assert {"plot_knowledge_by_access", "plot_coherence", "plot_exp1_vs_exp2"} <= set(study1)


def _show_metadata(page, key: str, path: Path) -> Path:
    """One metadata entry of the selected materialization (Events tab): a table in its row, a plot or a long table
    in the dialog its "[Show Markdown]" opens."""
    row = page.locator("tr").filter(has=page.get_by_text(key, exact=True)).first
    row.scroll_into_view_if_needed()
    button = row.get_by_text("[Show Markdown]")
    if button.count():
        button.click()
        dialog = page.get_by_role("dialog")
        dialog.wait_for(state="visible")
        page.wait_for_timeout(500)  # the image inside the dialog decodes after it opens
        dialog.screenshot(path=path)
        dialog.get_by_role("button", name="Close").click()
        dialog.wait_for(state="detached")  # it fades out; the next entry's dialog must be the only one
    else:
        row.screenshot(path=path)
    return path


@pytest.mark.slow
def test_the_ui_shows_the_new_tables_and_plots(automated):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shots = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 2000, "height": 1100})  # wide: comparison tables have many columns
        page.set_default_timeout(60_000)

        def visit(path: str) -> None:
            page.goto(f"{automated.dev.url}{path}", wait_until="networkidle")
            skip = page.get_by_role("button", name="Skip")
            try:
                skip.wait_for(state="visible", timeout=3_000)
                skip.click()
            except PlaywrightTimeout:
                pass

        visit("/assets/analysis/study2")
        expect(page.get_by_text("analysis_automation").first).to_be_visible()  # the sensor that keeps it current
        shots.append(ARTIFACTS / "analysis-study2-overview.png")
        page.screenshot(path=shots[-1])
        page.get_by_text("Hide navigation").click()
        for study, keys in SCREENSHOTS.items():
            visit(f"/assets/analysis/{study}?view=events")
            expect(page.get_by_text("Materialized in run").first).to_be_visible()
            shots += [_show_metadata(page, key, ARTIFACTS / f"analysis-{study}-{key}.png") for key in keys]
        browser.close()
    assert all(shot.stat().st_size > 5_000 for shot in shots), [(s.name, s.stat().st_size) for s in shots]


@pytest.mark.slow
def test_a_partition_that_failed_its_blocking_check_later_is_refused_by_the_next_automated_analysis(
    automated, refused_later
):
    run = automated.instance.get_run_by_id(refused_later.run_id)
    assert run.tags.get("dagster/sensor_name") == "analysis_automation"
    meta = _metadata(refused_later)
    (exp1_row,) = [line for line in meta["partitions_read_and_refused"].splitlines() if "exp1" in line]
    assert "refused: extraction_rate_at_least_threshold failed" in exp1_row
    assert meta["exp1_vs_exp2"].startswith("not written"), "nothing from the refused partition is compared"
    # The comparison the first automated analysis wrote (both experiments were read then) is gone, not left stale.
    assert not (Path(meta["csv"]).parent / "analysis_study2_exp1_vs_exp2.csv").exists()
    assert "No Experiment 1 answers were read" in meta["temperatures"]
    table = pd.read_parquet(Path(meta["parquet"]))
    assert table["exp1_utterance"].isna().all() and table["exp2_utterance_p_negation"].notna().all()
