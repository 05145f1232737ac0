"""The model registry: every shipped entry loads, and each kind of bad entry is refused with a clear message."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from grace_dagster.registry import DEFAULT_REGISTRY_PATH, RegistryError, load_registry

RESEARCH_PLAN_LINEUP = {
    "gemma-2-2b": 1,
    "gemma-2-9b": 1,
    "gemma-2-27b": 2,
    "llama-3.1-70b": 4,
    "gpt-oss-20b": 1,
    "gpt-oss-120b": 2,
}


def test_every_shipped_entry_loads():
    registry = load_registry()
    slugs = {m.slug for m in registry.models}
    assert {"smollm2-135m", "gemma3-270m"} <= slugs
    for slug, gpus in RESEARCH_PLAN_LINEUP.items():
        model = registry.get(slug)
        assert model.resources.gpus == gpus
        assert model.serving.backend == "vllm"
    judges = [m for m in registry.models if "judge" in m.roles and m.slug.startswith("deepseek")]
    assert {m.serving.backend for m in judges} == {"vllm", "external"}
    assert registry.get("smollm2-135m").kind == "instruct"
    assert registry.get("gemma3-270m").kind == "base"


def test_local_models_point_at_their_pypi_packages():
    from importlib.metadata import version

    for model in load_registry().participants(backend="embedded"):
        assert version(model.weights.package) == model.weights.version


def test_local_vllm_entry_serves_the_embedded_weights_and_is_never_rendered_for_the_cluster():
    from grace_dagster.k8s.render import served_models

    registry = load_registry()
    local, embedded = registry.get("smollm2-135m-vllm"), registry.get("smollm2-135m")
    assert local.serving.backend == "vllm" and not local.on_cluster
    assert (local.served_name, local.weights) == (embedded.served_name, embedded.weights), "the same weights"
    served = served_models(registry)
    assert local not in served and all(m.on_cluster and m.resources.gpus >= 1 for m in served)
    assert {m.slug for m in served} == {m.slug for m in registry.models if m.serving.backend == "vllm"} - {local.slug}


def test_concurrency_defaults_to_what_each_server_can_use():
    registry = load_registry()
    assert registry.get("smollm2-135m").serving.max_concurrency == 4
    assert registry.get("smollm2-135m-vllm").serving.max_concurrency == 64
    assert registry.get("gemma-2-9b").serving.max_concurrency == 64
    assert registry.get("deepseek-chat-api").serving.max_concurrency == 4


def test_unknown_slug_names_the_known_ones():
    with pytest.raises(RegistryError, match="known models: .*smollm2-135m"):
        load_registry().get("no-such-model")


def _base() -> dict:
    return yaml.safe_load(DEFAULT_REGISTRY_PATH.read_text())


def _entry(raw: dict, slug: str) -> dict:
    return next(m for m in raw["models"] if m["slug"] == slug)


def _mutate_duplicate(raw):
    raw["models"].append(copy.deepcopy(_entry(raw, "gemma-2-9b")))


def _mutate(slug, path, value):
    def mutate(raw):
        target = _entry(raw, slug)
        *parents, last = path
        for key in parents:
            target = target[key]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value

    return mutate


_DELETE = object()

BAD_ENTRIES = [
    ("duplicate slug", _mutate_duplicate, r"duplicate slug 'gemma-2-9b'"),
    ("pipe in slug", _mutate("gemma-2-9b", ["slug"], "gemma|9b"), r"slug 'gemma\|9b' may contain only"),
    ("comma in slug", _mutate("gemma-2-9b", ["slug"], "gemma,9b"), r"may contain only lowercase"),
    ("uppercase slug", _mutate("gemma-2-9b", ["slug"], "Gemma-2-9B"), r"may contain only lowercase"),
    ("missing served_name", _mutate("gemma-2-9b", ["served_name"], _DELETE), r"served_name: Field required"),
    ("missing weights", _mutate("gemma-2-9b", ["weights"], _DELETE), r"weights: Field required"),
    ("negative gpus", _mutate("gemma-2-9b", ["resources", "gpus"], -1), r"resources.gpus: .*greater than or equal"),
    ("more gpus than a node", _mutate("gemma-2-9b", ["resources", "gpus"], 16), r"resources.gpus: .*less than or"),
    ("vllm without gpu", _mutate("gemma-2-9b", ["resources", "gpus"], 0), r"needs at least 1 GPU"),
    ("embedded with gpu", _mutate("smollm2-135m", ["resources", "gpus"], 1), r"runs on the CPU"),
    ("zero memory", _mutate("gemma-2-9b", ["resources", "memory_gib"], 0), r"resources.memory_gib > 0"),
    ("unknown kind", _mutate("gemma-2-9b", ["kind"], "chat"), r"kind: Input should be 'instruct' or 'base'"),
    ("misspelt field", _mutate("gemma-2-9b", ["servd_name"], "x"), r"servd_name: Extra inputs are not permitted"),
    (
        "local vllm entry with gpu products",
        _mutate("smollm2-135m-vllm", ["serving", "gpu_products"], ["NVIDIA-A40"]),
        r"served only by a local vLLM.*drop serving.gpu_products",
    ),
    (
        "vllm entry with api weights",
        _mutate("smollm2-135m-vllm", ["weights"], {"source": "api", "provider": "X"}),
        r"huggingface.*on the cluster.*pypi.*a local vLLM only",
    ),
    ("zero concurrency", _mutate("smollm2-135m-vllm", ["serving", "max_concurrency"], 0), r"max_concurrency"),
    (
        "unknown exception rule",
        _mutate("gemma-2-27b", ["nrp_exceptions"], [{"rule": "gpus-over-9000", "reason": "because it is big"}]),
        r"nrp_exceptions.0.rule",
    ),
    (
        "missing serving backend",
        _mutate("smollm2-135m", ["serving", "backend"], _DELETE),
        r"entry 1 \(slug 'smollm2-135m'\), field serving\.backend: required, one of embedded, vllm, external$",
    ),
    (
        "missing weights source",
        _mutate("smollm2-135m", ["weights", "source"], _DELETE),
        r"entry 1 \(slug 'smollm2-135m'\), field weights\.source: required, one of pypi, huggingface, api$",
    ),
    (
        "version read as a number",
        _mutate("smollm2-135m", ["weights", "version"], 1.0),
        r'field weights\.version: expected text, but YAML read the number 1\.0: quote the value, e\.g\. "1\.0"$',
    ),
]


@pytest.mark.parametrize("mutate,expected", [b[1:] for b in BAD_ENTRIES], ids=[b[0] for b in BAD_ENTRIES])
def test_bad_entry_is_refused_with_its_entry_and_field_named(tmp_path, mutate, expected):
    raw = _base()
    mutate(raw)
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    message = str(info.value)
    assert str(path) in message
    assert "entry" in message or "duplicate" in message
    assert re.search(expected, message), message


def test_unreadable_registry_files_are_refused(tmp_path):
    with pytest.raises(RegistryError, match="registry file not found"):
        load_registry(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [\n")
    with pytest.raises(RegistryError, match="not valid YAML"):
        load_registry(broken)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(RegistryError, match="expected a mapping with a 'models' list"):
        load_registry(empty)


def test_duplicate_slug_names_both_entries(tmp_path):
    raw = _base()
    first = next(number for number, m in enumerate(raw["models"], start=1) if m["slug"] == "gemma-2-9b")
    _mutate_duplicate(raw)
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    assert (
        f"registry, field models: duplicate slug 'gemma-2-9b' in entries {first} and {len(raw['models'])}: "
        "each model needs its own slug"
    ) in str(info.value)


def test_a_key_given_twice_in_one_entry_is_refused_with_its_line(tmp_path):
    lines = DEFAULT_REGISTRY_PATH.read_text().splitlines(keepends=True)
    first = lines.index("    kind: instruct\n")
    lines.insert(first + 1, "    kind: base\n")  # PyYAML alone would keep this one and drop the first silently
    path = tmp_path / "models.yaml"
    path.write_text("".join(lines))
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    assert str(info.value) == (
        f"{path}: invalid model registry:\n"
        f"  line {first + 2}, field kind: given twice in one mapping (first on line {first + 1}); keep one of them"
    )
