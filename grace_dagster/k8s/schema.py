"""Schema validation of rendered objects against the Kubernetes OpenAPI schemas, offline.

No cluster is reachable from the development machines, so `kubernetes-validate` checks every object against the
JSON schemas it ships for a pinned Kubernetes version, in strict mode (an unknown or misspelt field is an error,
where `kubectl apply` on a real cluster would drop it silently or refuse it only at deploy time). Custom resources
have no schema there; the few the project renders get a small structural check of their own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import kubernetes_validate

# Pinned, so validation is reproducible, and older than the newest (kubernetes-validate 1.37.0 ships 1.25 to 1.37):
# a field that only later releases know is caught here instead of being refused by an older cluster.
KUBERNETES_VERSION = "1.30"


@dataclass(frozen=True)
class SchemaError:
    """An object the API server would refuse: which object, where in it, and what is wrong."""

    kind: str
    name: str
    path: str
    message: str
    source: str | None = None

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        at = f" at {self.path}" if self.path else ""
        return f"{where}{self.kind}/{self.name}: [schema]{at}: {self.message}"


def _service_monitor(obj: Mapping) -> Iterator[tuple[str, str]]:
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        yield "spec", "a ServiceMonitor needs a spec"
        return
    if not isinstance(spec.get("selector"), Mapping):
        yield "spec.selector", "a ServiceMonitor needs a label selector for its Services"
    endpoints = spec.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        yield "spec.endpoints", "a ServiceMonitor needs at least one endpoint"
        return
    allowed = {"port", "targetPort", "path", "interval", "scrapeTimeout", "scheme", "honorLabels"}
    for i, endpoint in enumerate(endpoints):
        if not isinstance(endpoint, Mapping) or not ("port" in endpoint or "targetPort" in endpoint):
            yield f"spec.endpoints.{i}", "an endpoint names the Service port to scrape (port)"
            continue
        for key in sorted(set(endpoint) - allowed):
            yield f"spec.endpoints.{i}.{key}", f"unknown endpoint field {key!r}"


# Custom resources without a shipped schema: (apiVersion, kind) -> structural check.
CUSTOM_RESOURCES: dict[tuple[str, str], Callable[[Mapping], Iterator[tuple[str, str]]]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _service_monitor,
}


@functools.lru_cache(maxsize=1)
def _supported_versions() -> tuple[str, ...]:
    return tuple(kubernetes_validate.utils.all_versions())


def validate_object(obj: Mapping, version: str = KUBERNETES_VERSION) -> list[SchemaError]:
    kind = str(obj.get("kind", "?"))
    name = str((obj.get("metadata") or {}).get("name", "?"))
    custom = CUSTOM_RESOURCES.get((str(obj.get("apiVersion")), kind))
    if custom is not None:
        return [SchemaError(kind, name, path, message) for path, message in custom(obj)]
    try:
        kubernetes_validate.validate(dict(obj), version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        return [SchemaError(kind, name, path, f"{e.message} (Kubernetes {e.version} schema)")]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [
            SchemaError(
                kind,
                name,
                "",
                f"{e.message}; use a built-in kind or add a structural check to grace_dagster/k8s/schema.py",
            )
        ]
    except kubernetes_validate.utils.VersionNotSupportedError:
        supported = ", ".join(_supported_versions())
        raise ValueError(
            f"kubernetes-validate has no schemas for Kubernetes {version}; supported: {supported}"
        ) from None
    return []


def validate_objects(objects: Iterable[Mapping], version: str = KUBERNETES_VERSION) -> list[SchemaError]:
    """Schema errors of every object (an empty list means the API server would accept them)."""
    errors: list[SchemaError] = []
    for obj in objects:
        errors += validate_object(obj, version)
    return errors
