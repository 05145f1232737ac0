"""Dagster resources: thin wrappers that give assets storage and model endpoints."""

from grace_dagster.resources.storage import Storage

__all__ = ["Storage"]
