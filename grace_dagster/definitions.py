"""The Definitions object that Dagster loads (`dagster dev -w workspace.yaml`). Only assembly happens here."""

from dagster import Definitions

from grace_dagster.assets import ALL_ASSETS, ALL_CHECKS
from grace_dagster.resources.defaults import default_resources

defs = Definitions(assets=ALL_ASSETS, asset_checks=ALL_CHECKS, resources=default_resources())
