"""`grace k8s cleanup-plan`: what is left on the cluster, how old it is, what is safely archived, what to delete.

The research plan keeps nothing on the cluster beyond 30 days after the experiments end, and the cluster purges data
that nobody read for 6 months. The plan reads the namespace (volumes, Deployments, Jobs) and the receipts that
`grace archive --verify` leaves beside each archive it checked, and prints the steps in the audit's order: archive,
verify, delete Deployments, delete Jobs, then delete volumes, holding back any data volume without a verified copy.

Run by an operator with the namespace's own rights (their kubeconfig): the pipeline's grace-run account may not list
volumes or Jobs, and this command never deletes anything itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException

from grace_dagster.archive import Receipt, default_archive_name
from grace_dagster.k8s.cluster import ClusterError, api_message, forbidden, with_retries
from grace_dagster.k8s.conventions import LABEL_MODEL, LABEL_VOLUME
from grace_dagster.registry.loader import Registry

RETENTION_DAYS = 30
PURGE_DAYS = 182  # "unread for 6 months"
# Where deploy/archive-pod.yaml mounts each shared data volume (by its grace/volume label).
ARCHIVE_POD = "grace-archive"
ARCHIVE_MOUNTS = {"input": "/data/input", "output": "/data/output"}
RELEASE = "grace-dagster"


@dataclass(frozen=True)
class Volume:
    name: str
    holds: str  # weights | input | output | unknown
    storage_class: str
    size: str
    created: datetime
    model: str | None = None


@dataclass(frozen=True)
class Workload:
    name: str
    created: datetime
    model: str | None = None  # model Deployments carry the registry slug
    active: bool = False  # a Job still running


@dataclass
class NamespaceState:
    namespace: str
    volumes: list[Volume] = field(default_factory=list)
    deployments: list[Workload] = field(default_factory=list)
    jobs: list[Workload] = field(default_factory=list)


def _created(obj: dict) -> datetime:
    stamp = (obj.get("metadata") or {}).get("creationTimestamp") or "1970-01-01T00:00:00Z"
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def read_namespace(api: k8s_client.ApiClient, namespace: str, log: Callable[[str], None] = lambda _: None):
    """Volumes, Deployments and Jobs of the namespace (three list calls, retried on 429/5xx)."""
    core, apps, batch = k8s_client.CoreV1Api(api), k8s_client.AppsV1Api(api), k8s_client.BatchV1Api(api)
    calls = {
        "persistentvolumeclaims": core.list_namespaced_persistent_volume_claim,
        "deployments": apps.list_namespaced_deployment,
        "jobs": batch.list_namespaced_job,
    }
    items: dict[str, list[dict]] = {}
    for resource, call in calls.items():
        try:
            response = with_retries(
                lambda call=call: call(namespace, _preload_content=False, _request_timeout=30), f"list {resource}", log
            )
        except ApiException as e:
            if e.status in (401, 403):
                raise forbidden(namespace, "list", resource, None, e) from None
            raise ClusterError(
                f"the Kubernetes API failed to list {resource} in namespace {namespace}: HTTP {e.status} {e.reason} "
                f"{api_message(e)}".rstrip()
            ) from None
        items[resource] = json.loads(response.data).get("items") or []
    state = NamespaceState(namespace)
    for obj in items["persistentvolumeclaims"]:
        labels = obj["metadata"].get("labels") or {}
        spec = obj.get("spec") or {}
        state.volumes.append(
            Volume(
                name=obj["metadata"]["name"],
                holds=labels.get(LABEL_VOLUME, "unknown"),
                storage_class=spec.get("storageClassName") or "(default)",
                size=((spec.get("resources") or {}).get("requests") or {}).get("storage", "?"),
                created=_created(obj),
                model=labels.get(LABEL_MODEL),
            )
        )
    for obj in items["deployments"]:
        labels = obj["metadata"].get("labels") or {}
        state.deployments.append(Workload(obj["metadata"]["name"], _created(obj), labels.get(LABEL_MODEL)))
    for obj in items["jobs"]:
        status = obj.get("status") or {}
        state.jobs.append(Workload(obj["metadata"]["name"], _created(obj), active=bool(status.get("active"))))
    return state


def _covering_receipt(volume: Volume, receipts: list[Receipt]) -> Receipt | None:
    """The newest intact verified archive of the volume (by the name recorded, else by the archive pod's mount)."""
    mount = ARCHIVE_MOUNTS.get(volume.holds)
    matching = [
        r
        for r in receipts
        if r.intact and (r.volume == volume.name or (not r.volume and mount and r.data_dir == mount))
    ]
    return matching[-1] if matching else None


def _days(delta: timedelta) -> int:
    return int(delta.total_seconds() // 86400)


def cleanup_plan(
    state: NamespaceState,
    receipts: list[Receipt],
    registry: Registry,
    now: datetime,
    ended: date | None,
    unverified: Sequence[Path] = (),
) -> list[str]:
    """The plan as printed lines."""
    ns = state.namespace
    lines = [
        f"Cleanup plan for namespace {ns} on {now.date().isoformat()}, in the audit's order: archive, verify, "
        "delete Deployments, delete Jobs, then delete volumes.",
    ]
    if ended is None:
        lines.append(
            f"The experiments are not marked as ended: pass --ended YYYY-MM-DD (the day the last run finished); "
            f"nothing may stay on the cluster beyond {RETENTION_DAYS} days after it."
        )
    else:
        deadline = ended + timedelta(days=RETENTION_DAYS)
        left = (deadline - now.date()).days
        when = f"{left} days left" if left >= 0 else f"OVERDUE by {-left} days"
        lines.append(
            f"The experiments ended on {ended.isoformat()}: delete everything by {deadline.isoformat()} ({when})."
        )

    lines += [
        "",
        f"Volumes (the cluster purges data unread for {PURGE_DAYS // 30} months; age is time since creation):",
    ]
    holds: dict[str, str] = {}
    to_archive: list[Volume] = []
    for volume in sorted(state.volumes, key=lambda v: (v.holds == "weights", v.name)):
        age = _days(now - volume.created)
        what = f"{volume.holds} ({volume.model})" if volume.model else volume.holds
        head = f"  {volume.name:34} {what:32} {volume.storage_class:16} {volume.size:>6}  {age:4d} days"
        model = registry.by_slug.get(volume.model or "")
        if volume.holds == "weights":
            source = model.weights_revision if model else "its model's source"
            lines.append(f"{head}  no archive needed: {source} can be downloaded again")
            continue
        receipt = _covering_receipt(volume, receipts)
        if receipt is None:
            to_archive.append(volume)
            holds[volume.name] = "no verified archive yet (steps 1 and 2)"
            lines.append(f"{head}  NOT ARCHIVED: archive and verify it before anything is deleted")
            continue
        note = f"verified archive {receipt.archive} ({receipt.files} files, verified {receipt.verified})"
        if ended is not None and receipt.created and datetime.fromisoformat(receipt.created).date() < ended:
            to_archive.append(volume)
            holds[volume.name] = f"its archive was made on {receipt.created[:10]}, before the experiments ended"
            note += "; made before the experiments ended: archive it again"
        if age >= PURGE_DAYS - 30:
            note += f"; within a month of the {PURGE_DAYS // 30}-month purge if nobody reads it"
        lines.append(f"{head}  {note}")

    lines += ["", "1. Archive each data volume without a verified archive, from the archive pod (read-only mounts):"]
    new_archives: list[str] = []
    if to_archive:
        lines.append("   kubectl apply -f deploy/archive-pod.yaml")
        lines.append(f"   kubectl -n {ns} wait --for=condition=Ready pod/{ARCHIVE_POD}")
        for volume in to_archive:
            name = default_archive_name(now).replace("grace-archive-", f"{volume.name}-")
            mount = ARCHIVE_MOUNTS.get(volume.holds)
            if mount is None:
                lines.append(f"   {volume.name}: mount it in deploy/archive-pod.yaml first (it holds {volume.holds})")
                continue
            lines.append(
                f"   kubectl -n {ns} exec {ARCHIVE_POD} -- grace archive --data-dir {mount} --volume {volume.name} "
                f"--out /archive/{name}"
            )
            lines.append(f"   kubectl -n {ns} cp {ARCHIVE_POD}:/archive/{name} ./{name}")
            new_archives.append(name)
        lines.append(f"   kubectl -n {ns} delete pod {ARCHIVE_POD}   # after the copies are verified")
    else:
        lines.append("   nothing: every data volume has a verified archive")

    lines += ["", "2. Verify each copy you keep (this writes the receipt the plan reads; it must print ok):"]
    pending = [f"   grace archive --verify {path}" for path in unverified]
    pending += [f"   grace archive --verify ./{name}" for name in new_archives]
    lines += pending or ["   nothing left to verify"]

    lines += ["", "3. Delete the Deployments (Dagster's through its release, then the model servers):"]
    dagster = [d for d in state.deployments if d.model is None]
    models = [d for d in state.deployments if d.model is not None]
    if dagster:
        lines.append(f"   helm uninstall {RELEASE} -n {ns}   # {', '.join(d.name for d in dagster)}")
    if models:
        lines.append(f"   kubectl -n {ns} delete deployment,service {' '.join(d.name for d in models)}")
    if not state.deployments:
        lines.append("   none left")

    lines += ["", "4. Delete the Jobs (finished runs; a running one is a run still going: cancel it in Dagster first):"]
    if state.jobs:
        running = [j.name for j in state.jobs if j.active]
        lines.append(f"   kubectl -n {ns} delete job {' '.join(j.name for j in state.jobs)}")
        if running:
            lines.append(f"   still running: {', '.join(running)}")
    else:
        lines.append("   none left")

    lines += ["", "5. Delete the volumes, last:"]
    deletable = [v.name for v in state.volumes if v.name not in holds]
    if deletable:
        lines.append(f"   kubectl -n {ns} delete pvc {' '.join(sorted(deletable))}")
    for name, why in sorted(holds.items()):
        lines.append(f"   HOLD {name}: {why}")
    if not state.volumes:
        lines.append("   none left")
    return lines


def unverified_archives(directory: Path, receipts: list[Receipt]) -> list[Path]:
    """Archives in `directory` that no intact receipt vouches for."""
    verified = {r.archive.name for r in receipts if r.intact}
    return sorted(p for p in directory.glob("*.tar.gz") if p.name not in verified)


def today() -> datetime:
    return datetime.now(UTC)
