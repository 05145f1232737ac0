"""Rendered objects to files under `k8s/` and back.

The layout is made for `kubectl apply -R -f k8s/` and for review: files apply in lexical order (the namespace
first), each model's weights volume, Deployment and Service sit together in `models/<slug>.yaml`, and the Secret
templates end in `.yaml.template`, which kubectl skips, so applying the directory can never overwrite a real secret
with an empty one. The text is deterministic (sorted keys, fixed order, no anchors): a re-render is compared byte
for byte with the committed files.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import yaml

from grace_dagster.k8s.conventions import LABEL_MODEL, NAMESPACE

SUFFIXES = (".yaml", ".yml", ".yaml.template")

HEADER = (
    "# Rendered by `grace k8s render` from grace_dagster/registry/models.yaml. Do not edit: change the registry\n"
    "# (or grace_dagster/k8s/render.py) and render again; `grace k8s lint` checks these files.\n"
)
SECRET_HEADER = (
    "# A template without values: kubectl skips *.yaml.template, so `kubectl apply -R -f k8s/` never blanks the real\n"
    "# secret. Create the real one by hand, and never commit a filled copy:\n"
    "#   kubectl -n {namespace} create secret generic {name} {literals}\n"
)

_BY_KIND = {
    "Namespace": "00-namespace.yaml",
    "ResourceQuota": "01-quota.yaml",
    "ServiceAccount": "02-service-accounts.yaml",
    "Role": "03-rbac.yaml",
    "RoleBinding": "03-rbac.yaml",
    "NetworkPolicy": "04-network-policy.yaml",
    "PersistentVolumeClaim": "05-shared-volumes.yaml",
    "ServiceMonitor": "06-monitoring.yaml",
}


class ManifestError(ValueError):
    """A manifest file cannot be read; the message names the file."""


@dataclass(frozen=True)
class Manifest:
    """One object and the file it came from (for messages that point at the file to fix)."""

    obj: dict
    path: Path


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: object) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    # Scripts stay readable as block literals instead of one line of escaped newlines.
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_Dumper.add_representer(str, _str)


def dump(obj: dict) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=True, default_flow_style=False, width=110, allow_unicode=True)


def file_for(obj: dict) -> str:
    """The path, relative to the manifest directory, that an object is written to."""
    kind = obj["kind"]
    if kind == "Secret":
        return f"secrets/{obj['metadata']['name']}.yaml.template"
    model = obj.get("metadata", {}).get("labels", {}).get(LABEL_MODEL)
    if model:
        return f"models/{model}.yaml"
    try:
        return _BY_KIND[kind]
    except KeyError:
        raise ManifestError(f"{kind}/{obj['metadata']['name']}: no file is assigned to kind {kind}") from None


def to_files(objects: list[dict]) -> dict[str, str]:
    """Relative path -> file text, every object in render order within its file."""
    grouped: dict[str, list[dict]] = {}
    for obj in objects:
        grouped.setdefault(file_for(obj), []).append(obj)
    files = {}
    for path, objs in sorted(grouped.items()):
        if path.startswith("secrets/"):
            (secret,) = objs
            literals = " ".join(f"--from-literal={key}=..." for key in sorted(secret.get("stringData", {})))
            header = SECRET_HEADER.format(namespace=NAMESPACE, name=secret["metadata"]["name"], literals=literals)
        else:
            header = HEADER
        files[path] = header + "---\n".join(dump(o) for o in objs)
    return files


def managed_files(directory: Path) -> list[Path]:
    """The manifest files under `directory` (what render owns and lint reads), sorted."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))


def write_files(files: dict[str, str], directory: Path) -> list[str]:
    """Write the rendered files, delete manifest files no longer rendered; return the paths that changed."""
    directory.mkdir(parents=True, exist_ok=True)
    changed = []
    for stale in managed_files(directory):
        rel = stale.relative_to(directory).as_posix()
        if rel not in files:
            stale.unlink()
            changed.append(rel)
    for rel, text in files.items():
        path = directory / rel
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        changed.append(rel)
    for sub in sorted((p for p in directory.rglob("*") if p.is_dir()), reverse=True):
        if not any(sub.iterdir()):
            sub.rmdir()
    return sorted(changed)


def drift(files: dict[str, str], directory: Path, context: int = 3) -> list[str]:
    """A readable report of how `directory` differs from the rendered `files` (empty when identical)."""
    report = []
    on_disk = {p.relative_to(directory).as_posix(): p for p in managed_files(directory)}
    for rel in sorted(set(on_disk) - set(files)):
        report.append(f"{directory / rel}: not rendered from the registry any more (stale file)")
    for rel, text in sorted(files.items()):
        if rel not in on_disk:
            report.append(f"{directory / rel}: missing (rendered but not committed)")
            continue
        current = on_disk[rel].read_text(encoding="utf-8")
        if current != text:
            diff = difflib.unified_diff(
                current.splitlines(),
                text.splitlines(),
                f"{directory / rel} (committed)",
                f"{directory / rel} (rendered)",
                n=context,
                lineterm="",
            )
            report.append("\n".join(diff))
    return report


def load_manifests(directory: Path) -> list[Manifest]:
    """Every object in the manifest files under `directory`, in file order."""
    if not directory.is_dir():
        raise ManifestError(f"{directory}: not a directory of manifests")
    manifests = []
    for path in managed_files(directory):
        try:
            docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        except yaml.YAMLError as e:
            raise ManifestError(f"{path}: not valid YAML: {e}") from None
        for index, doc in enumerate(docs):
            if doc is None:
                continue
            if not isinstance(doc, dict) or not {"apiVersion", "kind", "metadata"} <= set(doc):
                raise ManifestError(
                    f"{path}: document {index + 1} is not a Kubernetes object "
                    "(apiVersion, kind and metadata are required)"
                )
            manifests.append(Manifest(doc, path))
    return manifests
