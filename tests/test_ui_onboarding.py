"""Onboarding a model end to end, as a researcher does it: `dagster dev` (webserver and daemon) on a temporary
instance with the project's dagster.yaml, one local model already materialized, the second added to the registry,
the `onboard_new_models` sensor (started through GraphQL, as the UI's toggle does) requesting its runs, and the
daemon running them. Then a real browser (Playwright driving Debian's Chromium) reads the UI; screenshots are saved
under test-artifacts/ui/.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml
from dagster import AssetCheckKey, AssetRecordsFilter, DagsterEventType, DagsterRunStatus, RunsFilter
from dagster._core.event_api import PartitionKeyFilter
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from grace_dagster.assets import ALL_CHECKS, EXPERIMENT_ASSETS, exp1_responses
from grace_dagster.registry.loader import DEFAULT_REGISTRY_PATH
from tests import pipeline
from tests.dagster_dev import REPO, DagsterDev, new_home

FIRST, ADDED = "smollm2-135m", "gemma3-270m"
STUDIES = ("study1", "study2")
ARTIFACTS = Path(os.environ.get("GRACE_TEST_ARTIFACTS", REPO / "test-artifacts")) / "ui"
START_SENSOR = """
mutation($selector: SensorSelector!) {
  startSensor(sensorSelector: $selector) { __typename ... on Sensor { name } ... on PythonError { message } }
}"""
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # the machine's closed network refuses them, many at a time
    "--disable-component-update",
    "--disable-sync",
]


def _registry_with(path: Path, slugs: list[str]) -> None:
    raw = yaml.safe_load(Path(DEFAULT_REGISTRY_PATH).read_text())
    raw["models"] = [m for m in raw["models"] if m["slug"] in slugs]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="module")
def onboarded(tmp_path_factory, servers):
    tmp = tmp_path_factory.mktemp("onboarding")
    home, data, registry = new_home(tmp / "home"), tmp / "data", tmp / "models.yaml"
    _registry_with(registry, [FIRST])
    env = {
        "GRACE_DATA_DIR": str(data),
        "GRACE_REGISTRY": str(registry),
        "GRACE_TRIAL_LIMIT": "2",
        "GRACE_MAX_TOKENS": "24",
    }
    res = pipeline.resources(
        tmp, trial_limit=2, max_tokens=24, base_urls={FIRST: servers(FIRST).base_url}, registry_path=str(registry)
    )
    with DagsterDev(home, env, tmp / "dagster-dev.log") as dev:
        instance = dev.instance()
        pipeline.prepare(instance, res, [FIRST])
        for study in STUDIES:  # the first model, materialized before the second is added
            pipeline.run(instance, res, exp1_responses.key, FIRST, study)

        _registry_with(registry, [FIRST, ADDED])  # the researcher adds one registry entry, then turns the sensor on
        started = dev.graphql(START_SENSOR, {"selector": {**dev.repository, "sensorName": "onboard_new_models"}})
        assert started["startSensor"]["__typename"] == "Sensor", started

        deadline = time.monotonic() + 900
        runs = []
        while time.monotonic() < deadline:
            runs = instance.get_runs(RunsFilter(tags={"grace/model": ADDED}))
            if len(runs) == len(STUDIES) and all(r.is_finished for r in runs):
                break
            time.sleep(3)
        else:
            raise TimeoutError(f"the runs of {ADDED} did not finish: {[(r.run_id, r.status) for r in runs]}")
        yield dev, instance, runs


@pytest.mark.slow
def test_a_model_added_to_the_registry_is_backfilled_across_every_study_and_experiment(onboarded):
    _, instance, runs = onboarded
    assert ADDED in instance.get_dynamic_partitions("model")
    assert {r.tags["grace/study"] for r in runs} == set(STUDIES)
    for run in runs:
        # The tiny model's answers may fail the extraction gate (a blocking check, which fails the run); any other
        # failure is a bug.
        failed_steps = {e.step_key for e in instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_FAILURE)}
        assert failed_steps <= {"exp1__structured_extraction_rate_at_least_threshold"}, (run.run_id, failed_steps)
        assert run.status == (DagsterRunStatus.FAILURE if failed_steps else DagsterRunStatus.SUCCESS)
    for study in STUDIES:
        partition = f"{ADDED}|{study}"
        for asset in [a for assets in EXPERIMENT_ASSETS.values() for a in assets]:
            materialized = instance.fetch_materializations(
                AssetRecordsFilter(asset_key=asset.key, asset_partitions=[partition]), limit=1
            ).records
            assert materialized, f"{asset.key.to_user_string()} {partition} was not materialized"
            checks = [
                AssetCheckKey(asset.key, spec.name)
                for definition in ALL_CHECKS
                for spec in definition.check_specs
                if spec.asset_key == asset.key
            ]
            results = instance.event_log_storage.get_latest_asset_check_execution_by_key(
                checks, partition_filter=PartitionKeyFilter(key=partition)
            )
            for check in checks:
                assert results[check].status != AssetCheckExecutionRecordStatus.PLANNED, f"{check} {partition}"


@pytest.mark.slow
def test_the_ui_shows_the_graph_the_partition_grid_and_a_check_with_its_metadata(onboarded):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect, sync_playwright

    dev, _, _ = onboarded
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)

        def visit(path: str) -> None:
            page.goto(f"{dev.url}{path}", wait_until="networkidle")
            # The first visit's newsletter dialog can open after the page has loaded, over what the test clicks.
            skip = page.get_by_role("button", name="Skip")
            try:
                skip.wait_for(state="visible", timeout=3_000)
                skip.click()
            except PlaywrightTimeout:
                pass

        visit("/asset-groups")
        for group in ("inputs", "exp1", "exp2", "analysis"):
            expect(page.get_by_text(group, exact=True).first).to_be_visible()
        page.screenshot(path=ARTIFACTS / "asset-graph.png")

        visit("/assets/exp1/responses?view=partitions")
        expect(page.get_by_text("Materialized (4)")).to_be_visible()
        for key in (FIRST, ADDED, *STUDIES):
            expect(page.get_by_text(key, exact=True).first).to_be_visible()
        page.screenshot(path=ARTIFACTS / "partition-grid.png")

        visit("/assets/exp1/structured?view=checks")
        page.locator("text=/extraction_rate/ >> visible=true").first.click()
        expect(page.get_by_text("Evaluation result")).to_be_visible()
        for field in ("extraction_rate", "threshold", "by_parser", "by_judge", "failed"):
            expect(page.get_by_text(field, exact=True).first).to_be_visible()
        page.screenshot(path=ARTIFACTS / "check-result.png", full_page=True)
        browser.close()
    assert all((ARTIFACTS / name).stat().st_size > 10_000 for name in ("asset-graph.png", "partition-grid.png"))
