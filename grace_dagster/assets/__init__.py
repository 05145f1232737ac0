"""Assets: the study inputs, the two experiments, structured extraction and analysis, with their checks."""

import warnings

# Pinned on purpose (DESIGN section 10): the study partition mapping is beta and partitioned checks are preview in
# Dagster 1.13. Their warnings would otherwise open every run's log.
warnings.filterwarnings("ignore", message=".*is currently in (beta|preview)")

from grace_dagster.assets.analysis import ANALYSIS_ASSETS  # noqa: E402
from grace_dagster.assets.exp1 import EXP1_CHECKS, exp1_responses  # noqa: E402
from grace_dagster.assets.exp2 import EXP2_CHECKS, exp2_probabilities  # noqa: E402
from grace_dagster.assets.inputs import study_trials  # noqa: E402
from grace_dagster.assets.review import review_files, review_readings  # noqa: E402
from grace_dagster.assets.structured import STRUCTURED_CHECKS, exp1_structured  # noqa: E402

ALL_ASSETS = [study_trials, exp1_responses, review_readings, exp1_structured, exp2_probabilities, *ANALYSIS_ASSETS]
ALL_CHECKS = [*EXP1_CHECKS, *STRUCTURED_CHECKS, *EXP2_CHECKS]
# What one model × study run of an experiment materializes: raw and structured of Experiment 1 in the same run, so
# the responses' blocking checks stop the extraction there (DESIGN section 3).
EXPERIMENT_ASSETS = {"exp1": [exp1_responses, exp1_structured], "exp2": [exp2_probabilities]}

__all__ = [
    "ALL_ASSETS",
    "ALL_CHECKS",
    "ANALYSIS_ASSETS",
    "EXPERIMENT_ASSETS",
    "exp1_responses",
    "exp1_structured",
    "exp2_probabilities",
    "review_files",
    "review_readings",
    "study_trials",
]
