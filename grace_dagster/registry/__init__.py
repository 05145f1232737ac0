"""The model registry: one YAML file that says what each model is and how it is served."""

from grace_dagster.registry.loader import (
    DEFAULT_REGISTRY_PATH,
    Model,
    Registry,
    RegistryError,
    load_registry,
)

__all__ = ["DEFAULT_REGISTRY_PATH", "Model", "Registry", "RegistryError", "load_registry"]
