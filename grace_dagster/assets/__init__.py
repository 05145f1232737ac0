"""Assets: the study inputs, the two experiments, structured extraction and analysis."""

from grace_dagster.assets.inputs import study_trials

ALL_ASSETS = [study_trials]

__all__ = ["ALL_ASSETS", "study_trials"]
