"""The Definitions object that Dagster loads (`dagster dev -w workspace.yaml`). Only assembly happens here."""

from dagster import Definitions

from grace_dagster.assets import ALL_ASSETS, ALL_CHECKS, review_files
from grace_dagster.assets.analysis import analysis_automation
from grace_dagster.resources.defaults import default_resources
from grace_dagster.sensors import onboard_new_models, scale_idle_models, watch_gpu_utilisation

defs = Definitions(
    assets=ALL_ASSETS,
    asset_checks=ALL_CHECKS,
    resources=default_resources(),
    sensors=[onboard_new_models, scale_idle_models, watch_gpu_utilisation, review_files, analysis_automation],
)
