"""Dagster resources: thin wrappers that give assets storage, model endpoints and experiment settings."""

from grace_dagster.resources.endpoints import LLMEndpoints
from grace_dagster.resources.settings import ExperimentSettings
from grace_dagster.resources.storage import Storage

__all__ = ["ExperimentSettings", "LLMEndpoints", "Storage"]
