"""Experiment settings shared by the assets of a run: subset size, sampling, thresholds."""

import os

import pandas as pd
from dagster import ConfigurableResource
from pydantic import Field


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


class ExperimentSettings(ConfigurableResource):
    """Set in the UI's launchpad (resources.settings.config) or through the environment for the CLI."""

    trial_limit: int | None = Field(
        default_factory=lambda: _env_int("GRACE_TRIAL_LIMIT"),
        description="Use only the first N trials of each study (the quick profile); None runs all of them.",
    )
    seed: int = Field(default=20261122, description="Base seed; each trial's seed derives from it and its id.")
    temperature: float = Field(default=0.7, description="Sampling temperature for Experiment 1 (research plan).")
    max_tokens: int = Field(default=160, description="Token limit of an Experiment 1 answer.")
    min_captured_mass: float = Field(
        default=0.05, description="WARN when the answer options hold less of the model's probability than this."
    )

    def subset(self, trials: pd.DataFrame) -> pd.DataFrame:
        return trials if self.trial_limit is None else trials.head(self.trial_limit)
