"""Experiment settings shared by the assets of a run: subset size, sampling, thresholds."""

import os

import pandas as pd
from dagster import ConfigurableResource
from pydantic import Field


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


class ExperimentSettings(ConfigurableResource):
    """Set in the UI's launchpad (resources.settings.config) or through the environment for the CLI."""

    trial_limit: int | None = Field(
        default_factory=lambda: _env_int("GRACE_TRIAL_LIMIT"),
        description="Use only the first N trials of each study (the quick profile); None runs all of them.",
    )
    seed: int = Field(default=20261122, description="Base seed; each trial's seed derives from it and its id.")
    temperature: float = Field(
        default_factory=lambda: _env_float("GRACE_TEMPERATURE", 0.7),
        ge=0,
        description="Sampling temperature for Experiment 1 (research plan: 0.7). Experiment 2 reads the model's own "
        "distribution, which is temperature 1: set 1 here for a like-for-like comparison of the two experiments.",
    )
    samples_per_trial: int = Field(
        default_factory=lambda: _env_int("GRACE_SAMPLES_PER_TRIAL") or 1,
        ge=1,
        description="Experiment 1 answers sampled per trial (the OpenAI `n` parameter; sample i is seeded with the "
        "trial's seed + i). The published LLM rerun of study 2 used 30.",
    )
    max_tokens: int = Field(
        default_factory=lambda: _env_int("GRACE_MAX_TOKENS") or 160,
        description="Token limit of an Experiment 1 answer.",
    )
    min_captured_mass: float = Field(
        default=0.05, description="WARN when the answer options hold less of the model's probability than this."
    )

    judge_model: str = Field(
        default_factory=lambda: os.environ.get("GRACE_JUDGE_MODEL", "smollm2-135m"),
        description="Registry slug of the instruct model that reads answers the parser cannot (structured "
        "extraction); a DeepSeek entry on the cluster, a local model on a laptop.",
    )
    judge_max_attempts: int = Field(
        default=3, ge=1, description="Judge requests per answer before it counts as failed."
    )
    judge_audit_size: int = Field(
        default=10,
        ge=0,
        description="Rows the parser read that the judge reads too, to estimate the judge's accuracy per partition.",
    )
    min_extraction_rate: float = Field(
        default=0.95, ge=0, le=1, description="Blocking: the share of answers extracted (the research plan's 95%)."
    )
    min_judge_accuracy: float = Field(
        default=0.9,
        ge=0,
        le=1,
        description="WARN when the judge agrees with the parser on fewer audited rows; blocking when it agrees with "
        "researchers' readings on fewer reviewed rows and has decided rows nobody reviewed.",
    )
    min_reviewed_for_judge_accuracy: int = Field(
        default=10, ge=1, description="Reviewed rows the judge also read before its accuracy against people counts."
    )

    def subset(self, trials: pd.DataFrame) -> pd.DataFrame:
        return trials if self.trial_limit is None else trials.head(self.trial_limit)
