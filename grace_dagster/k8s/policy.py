"""The NRP's rules (the compliance audit of DESIGN section 8) as code, over any set of Kubernetes objects.

Plain Python on plain dicts, so the same check runs over the rendered manifests (`grace k8s lint`), over the
committed files in a test, and over a single live Deployment right before the pipeline scales it up. Exceptions
(more than 2 GPUs, 32 GiB or 16 CPUs per pod, Deployments meant to live beyond 2 weeks) are granted only by the
model registry: an object names its model with the `grace/model` label, and the model's `nrp_exceptions` decide.
Every violation names the object, the rule and the fix.
"""

from __future__ import annotations

import ast
import posixpath
import re
import shlex
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal

from grace_dagster.k8s.conventions import (
    ANNOTATION_LIFETIME,
    GPU_RESOURCE,
    LABEL_MODEL,
    LABEL_VOLUME,
    LIFETIME_SHORT,
    STORAGE_CEPHFS,
    STORAGE_FORBIDDEN,
    STORAGE_RBD,
    WEIGHTS_MOUNT,
)
from grace_dagster.k8s.quantity import GIB, QuantityError, describe, parse_quantity
from grace_dagster.registry.loader import Model, Registry

# The NRP's limits per pod without an exception, and the allowed headroom of limits over requests.
MAX_GPUS_PER_POD = Decimal(2)
MAX_MEMORY_PER_POD = 32 * GIB
MAX_CPU_PER_POD = Decimal(16)
LIMIT_HEADROOM = Decimal("1.2")
# Above this many pods of one workload the NRP wants limits equal to requests.
MANY_PODS = 100
# Interactive (bare) pods live at most 6 hours on the NRP.
MAX_POD_SECONDS = 6 * 3600

RULES = {
    "no-statefulset": "long-running pods are Deployments, never StatefulSets",
    "resources-set": "every container sets cpu and memory requests and limits, as valid quantities",
    "limits-within-20pct": "limits are at most 20% above requests (containers and init containers)",
    "job-guaranteed-qos": "Jobs set limits equal to requests (Guaranteed QoS)",
    "guaranteed-qos-at-scale": f"workloads of more than {MANY_PODS} pods set limits equal to requests",
    "gpus-over-2": "more than 2 GPUs per pod needs a registry exception",
    "memory-over-32gi": "more than 32 GiB of memory per pod needs a registry exception",
    "cpu-over-16": "more than 16 CPUs per pod needs a registry exception",
    "deployment-lifetime-over-2-weeks": "a Deployment meant to live beyond 2 weeks needs a registry exception",
    "job-sleep": "no Job command or Python script ends in sleep (or sleeps forever)",
    "pod-deadline": f"bare Pods (interactive) set activeDeadlineSeconds of at most {MAX_POD_SECONDS} s (6 hours)",
    "storage-class": f"volumes use {STORAGE_RBD} or {STORAGE_CEPHFS}, never {', '.join(STORAGE_FORBIDDEN)}",
    "rbd-access-mode": f"{STORAGE_RBD} volumes are ReadWriteOnce",
    "cephfs-access-mode": f"{STORAGE_CEPHFS} volumes are ReadWriteMany, or ReadOnlyMany cloned from a source",
    "weights-on-rbd": f"model weights live on {STORAGE_RBD}, never on CephFS",
    "no-runtime-install": "no package installs at run time (never onto shared volumes): packages live in the image",
    "input-read-only": "pods mount the shared input volume read-only",
    "secret-without-values": "committed Secrets are templates without values",
    "quota": "the objects fit the namespace ResourceQuota",
    "unknown-model": "an object's grace/model label names a registry model",
}

EXCEPTION_RULES = ("gpus-over-2", "memory-over-32gi", "cpu-over-16", "deployment-lifetime-over-2-weeks")

_POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "ReplicationController", "Job"}
_JOB_KINDS = {"Job", "CronJob"}
_SHELLS = {"sh", "bash", "ash", "dash", "zsh", "ksh"}
# Package installers of every ecosystem a researcher may reach for, each in the forms that fetch and install.
_INSTALL = re.compile(
    r"\b(?:pip3?|python[0-9.]*\s+-m\s+pip)\s+install\b"
    r"|\buv\s+(?:pip\s+(?:install|sync)|add|sync|tool\s+install|run\s+--with)\b|\buvx\s+\S+"
    r"|\bpipx\s+(?:install|inject|run|upgrade)\b"
    r"|\bpoetry\s+(?:install|add|update)\b"
    r"|\b(?:npm|pnpm)\s+(?:install|i|ci|add)\b|\byarn\s+(?:install|add)\b|\bnpx\s+\S+"
    r"|\b(?:conda|mamba|micromamba)\s+(?:install|create|update|env\s+(?:create|update))\b"
    r"|\b(?:apt-get|apt|yum|dnf|apk)\s+(?:install|add)\b"
    r"|\binstall\.packages\s*\(|\b(?:remotes|devtools|BiocManager|pak)::(?:install\w*|pkg_install)\s*\("
)
_PYTHON = re.compile(r"^python[0-9.]*$")
_SLEEP_STATEMENT = re.compile(r"^(?:sleep\b|tail\s+-f\s+/dev/null\b)")
_SLEEP_FOREVER = re.compile(r"\bsleep\s+inf(?:inity)?\b")


@dataclass(frozen=True)
class Violation:
    """One broken rule: which object, which rule, what is wrong and how to fix it."""

    kind: str
    name: str
    rule: str
    problem: str
    fix: str
    source: str | None = None

    @property
    def object(self) -> str:
        return f"{self.kind}/{self.name}"

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return f"{where}{self.object}: [{self.rule}] {self.problem}. Fix: {self.fix}."


@dataclass(frozen=True)
class ExceptionNeed:
    """An NRP exception an object needs: what the admins are asked to allow, and for which model."""

    kind: str
    name: str
    model: str | None
    rule: str
    detail: str

    @property
    def object(self) -> str:
        return f"{self.kind}/{self.name}"


# --- reading objects ---------------------------------------------------------------------------------------------


def _name(obj: Mapping) -> str:
    return str((obj.get("metadata") or {}).get("name", "?"))


def pod_spec(obj: Mapping) -> Mapping | None:
    """The pod spec inside a workload object (None for objects without pods)."""
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        spec = ((spec.get("jobTemplate") or {}).get("spec")) or {}
        return ((spec.get("template") or {}).get("spec")) or {}
    if kind in _POD_TEMPLATE_KINDS:
        return ((spec.get("template") or {}).get("spec")) or {}
    return None


def model_slug(obj: Mapping) -> str | None:
    """The registry model an object belongs to: its own label, else its pod template's."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    if LABEL_MODEL in labels:
        return str(labels[LABEL_MODEL])
    template = ((obj.get("spec") or {}).get("template") or {}).get("metadata") or {}
    slug = (template.get("labels") or {}).get(LABEL_MODEL)
    return str(slug) if slug is not None else None


def _containers(spec: Mapping) -> Iterator[tuple[str, Mapping]]:
    for field, what in (("initContainers", "init container"), ("containers", "container")):
        for c in spec.get(field) or []:
            yield f"{what} {c.get('name', '?')!r}", c


def _argv(container: Mapping) -> list[str]:
    return [str(a) for a in (container.get("command") or []) + (container.get("args") or [])]


def _command_texts(container: Mapping) -> list[str]:
    """What the container runs, as shell text: the `-c` script of a shell, else the joined argv."""
    argv = _argv(container)
    if argv and posixpath.basename(argv[0]) in _SHELLS:
        for i, arg in enumerate(argv[1:-1], start=1):
            if arg.startswith("-") and not arg.startswith("--") and "c" in arg:
                return [argv[i + 1]]
    return [shlex.join(argv)] if argv else []


def _resources(container: Mapping) -> tuple[dict[str, Decimal], dict[str, Decimal], list[str]]:
    res = container.get("resources") or {}
    parsed: list[dict[str, Decimal]] = [{}, {}]
    errors = []
    for i, field in enumerate(("requests", "limits")):
        for key, value in (res.get(field) or {}).items():
            try:
                parsed[i][key] = parse_quantity(value)
            except QuantityError as e:
                errors.append(f"{field}.{key}: {e}")
    return parsed[0], parsed[1], errors


def _pod_totals(spec: Mapping) -> dict[str, Decimal]:
    """What one pod reserves: the sum over its containers, or the largest init container if that is more.

    The larger of request and limit counts, since a pod may use up to its limit.
    """
    totals: dict[str, Decimal] = {}
    init_peak: dict[str, Decimal] = {}
    for field, target in (("containers", totals), ("initContainers", init_peak)):
        for c in spec.get(field) or []:
            requests, limits, _ = _resources(c)
            for key in set(requests) | set(limits):
                amount = max(requests.get(key, Decimal(0)), limits.get(key, Decimal(0)))
                if field == "containers":
                    target[key] = target.get(key, Decimal(0)) + amount
                else:
                    target[key] = max(target.get(key, Decimal(0)), amount)
    for key, amount in init_peak.items():
        totals[key] = max(totals.get(key, Decimal(0)), amount)
    return totals


def _pod_count(obj: Mapping) -> int:
    spec = obj.get("spec") or {}
    if obj.get("kind") in _JOB_KINDS:
        spec = ((spec.get("jobTemplate") or {}).get("spec") or {}) if obj.get("kind") == "CronJob" else spec
        count = spec.get("parallelism")
    else:
        count = spec.get("replicas")
    # A malformed count is the schema validation's to report; here it only decides the at-scale rule.
    return count if isinstance(count, int) and not isinstance(count, bool) else 1


# --- exceptions --------------------------------------------------------------------------------------------------


def required_exceptions(objects: Iterable[Mapping]) -> list[ExceptionNeed]:
    """The NRP exceptions the objects need, whether or not the registry grants them."""
    needs = []
    for obj in objects:
        kind, name, slug = str(obj.get("kind")), _name(obj), model_slug(obj)
        spec = pod_spec(obj)
        if spec is not None:
            totals = _pod_totals(spec)
            gpus = totals.get(GPU_RESOURCE, Decimal(0))
            memory = totals.get("memory", Decimal(0))
            cpu = totals.get("cpu", Decimal(0))
            if gpus > MAX_GPUS_PER_POD:
                needs.append(
                    ExceptionNeed(
                        kind, name, slug, "gpus-over-2", f"{describe(GPU_RESOURCE, gpus)} GPUs per pod (allowed: 2)"
                    )
                )
            if memory > MAX_MEMORY_PER_POD:
                needs.append(
                    ExceptionNeed(
                        kind,
                        name,
                        slug,
                        "memory-over-32gi",
                        f"{describe('memory', memory)} of memory per pod (allowed: 32Gi)",
                    )
                )
            if cpu > MAX_CPU_PER_POD:
                needs.append(
                    ExceptionNeed(kind, name, slug, "cpu-over-16", f"{describe('cpu', cpu)} CPUs per pod (allowed: 16)")
                )
        if kind == "Deployment":
            lifetime = ((obj.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_LIFETIME)
            if lifetime != LIFETIME_SHORT:
                declared = f"declared {ANNOTATION_LIFETIME}: {lifetime}" if lifetime else "no lifetime declared"
                needs.append(
                    ExceptionNeed(
                        kind,
                        name,
                        slug,
                        "deployment-lifetime-over-2-weeks",
                        f"a Deployment living beyond 2 weeks ({declared})",
                    )
                )
    return needs


def _exception_violations(objects: list[Mapping], registry: Registry) -> Iterator[Violation]:
    for need in required_exceptions(objects):
        model: Model | None = registry.by_slug.get(need.model) if need.model else None
        if model is not None and model.has_exception(need.rule):
            continue
        if need.model is None:
            problem = f"needs {need.detail}, which takes an NRP exception, and names no registry model"
            fix = (
                f"label it {LABEL_MODEL}: <slug> of a registry model whose nrp_exceptions include "
                f"{need.rule}, or stay within the limit"
            )
        else:
            problem = (
                f"needs {need.detail}, which takes an NRP exception, and model {need.model!r} has no "
                f"{need.rule} exception in the registry"
            )
            fix = (
                f"add {{rule: {need.rule}, reason: ...}} to nrp_exceptions of {need.model!r} in models.yaml and "
                "send the request from `grace k8s exceptions` to the NRP admins, or stay within the limit"
            )
        if need.rule == "deployment-lifetime-over-2-weeks":
            fix += (
                f" (annotate {ANNOTATION_LIFETIME}: {LIFETIME_SHORT} only if the Deployment is deleted within 2 weeks)"
            )
        yield Violation(need.kind, need.name, need.rule, problem, fix)


# --- the rules ---------------------------------------------------------------------------------------------------


def _workload_kind(obj: Mapping) -> Iterator[Violation]:
    if obj.get("kind") == "StatefulSet":
        yield Violation(
            "StatefulSet",
            _name(obj),
            "no-statefulset",
            "is a StatefulSet; the NRP audit requires long-running pods to be Deployments",
            "make it a Deployment (strategy Recreate for a ReadWriteOnce volume) and move its "
            "volumeClaimTemplates into a PersistentVolumeClaim",
        )


def _container_resources(obj: Mapping, spec: Mapping) -> Iterator[Violation]:
    kind, name = str(obj.get("kind")), _name(obj)
    is_job = kind in _JOB_KINDS
    many = not is_job and _pod_count(obj) > MANY_PODS
    for where, c in _containers(spec):
        requests, limits, errors = _resources(c)
        for error in errors:
            yield Violation(
                kind,
                name,
                "resources-set",
                f"{where}: {error}",
                "write quantities as Kubernetes expects them, e.g. 500m, 4, 16Gi",
            )
        for key in ("cpu", "memory"):
            if key not in requests and key not in limits:
                yield Violation(
                    kind,
                    name,
                    "resources-set",
                    f"{where} sets no {key} request or limit",
                    f"set resources.requests.{key} and resources.limits.{key} (limit within 20%)",
                )
        for key in sorted(set(requests) | set(limits)):
            request = requests.get(key, limits.get(key))
            limit = limits.get(key)
            if limit is None:
                yield Violation(
                    kind,
                    name,
                    "resources-set",
                    f"{where} requests {key} {describe(key, request)} but sets no limit (unbounded)",
                    f"set resources.limits.{key} to at most 1.2 × the request",
                )
                continue
            assert request is not None
            if limit < request:
                yield Violation(
                    kind,
                    name,
                    "resources-set",
                    f"{where} {key} limit {describe(key, limit)} is below its request {describe(key, request)}",
                    "raise the limit to the request",
                )
            elif limit > request * LIMIT_HEADROOM:
                pct = (limit / request * 100).quantize(Decimal(1)) if request else "∞"
                yield Violation(
                    kind,
                    name,
                    "limits-within-20pct",
                    f"{where} {key} limit {describe(key, limit)} is {pct}% of its request "
                    f"{describe(key, request)}; the NRP allows at most 120%",
                    f"set the {key} limit to at most {describe(key, request * LIMIT_HEADROOM)}, or raise the request",
                )
            if is_job and limit != request:
                yield Violation(
                    kind,
                    name,
                    "job-guaranteed-qos",
                    f"{where} {key} limit {describe(key, limit)} differs from its request "
                    f"{describe(key, request)}; Jobs run with Guaranteed QoS",
                    f"set the {key} limit equal to the request",
                )
            elif many and limit != request:
                yield Violation(
                    kind,
                    name,
                    "guaranteed-qos-at-scale",
                    f"runs {_pod_count(obj)} pods and {where} {key} limit {describe(key, limit)} "
                    f"differs from its request {describe(key, request)}",
                    f"above {MANY_PODS} pods set every limit equal to its request",
                )


def _python_scripts(container: Mapping) -> list[str]:
    """The `python -c` scripts a container runs, given as its argv or inside its shell script."""
    candidates = [_argv(container)]
    for text in _command_texts(container):
        try:
            candidates.append(shlex.split(text))
        except ValueError:
            continue  # unbalanced quotes: the shell would refuse it too
    scripts: list[str] = []
    for words in candidates:
        for i, word in enumerate(words):
            if not _PYTHON.match(posixpath.basename(word)):
                continue
            j = i + 1
            while j < len(words) and words[j].startswith("-") and words[j] != "-c":
                j += 1  # interpreter options such as -u
            if j + 1 < len(words) and words[j] == "-c" and words[j + 1] not in scripts:
                scripts.append(words[j + 1])
    return scripts


def _is_sleep_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    return (isinstance(func, ast.Attribute) and func.attr == "sleep") or (
        isinstance(func, ast.Name) and func.id == "sleep"
    )


def _python_sleep_ending(script: str) -> str | None:
    """How a Python script ends by sleeping (`while True: time.sleep(...)`, a final sleep), or None."""
    try:
        body = ast.parse(script).body
    except SyntaxError:
        return None
    if not body:
        return None
    last = body[-1]
    if isinstance(last, ast.Expr) and _is_sleep_call(last.value):
        return ast.unparse(last)
    if isinstance(last, ast.While) and isinstance(last.test, ast.Constant) and last.test.value:
        inner = list(ast.walk(last))
        if any(isinstance(n, ast.Break) for n in inner):
            return None
        sleep = next((n for n in inner if _is_sleep_call(n)), None)
        if sleep is not None:
            return f"while {ast.unparse(last.test)}: {ast.unparse(sleep)}"
    return None


def _job_sleep(obj: Mapping, spec: Mapping) -> Iterator[Violation]:
    if obj.get("kind") not in _JOB_KINDS:
        return
    for c in spec.get("containers") or []:
        found = []
        for text in _command_texts(c):
            statements = [s.strip() for s in re.split(r";|&&|\|\||\||&|\n", text) if s.strip()]
            while statements and statements[-1] in ("done", "fi", "esac", "}", ")"):
                statements.pop()
            last = re.sub(r"^(?:do|then|else|exec)\s+", "", statements[-1]) if statements else ""
            forever = _SLEEP_FOREVER.search(text)
            if _SLEEP_STATEMENT.match(last):
                found.append(f"ends its command with {last!r}")
            elif forever:
                found.append(f"runs {forever.group(0)!r} in its command")
        for script in _python_scripts(c):
            ending = _python_sleep_ending(script)
            if ending is not None:
                found.append(f"ends its Python script with {ending!r}")
        for what in found[:1]:
            yield Violation(
                str(obj.get("kind")),
                _name(obj),
                "job-sleep",
                f"container {c.get('name', '?')!r} {what}; a Job that sleeps holds its resources idle, "
                "which gets the namespace banned",
                "let the Job exit when its work is done (use a Deployment, or an interactive pod "
                "for at most 6 hours, to keep a shell around)",
            )


def _pod_deadline(obj: Mapping, spec: Mapping) -> Iterator[Violation]:
    """A bare Pod is an interactive pod to the NRP: it must end by itself within 6 hours."""
    if obj.get("kind") != "Pod":
        return
    deadline = spec.get("activeDeadlineSeconds")
    if isinstance(deadline, int) and not isinstance(deadline, bool) and 0 < deadline <= MAX_POD_SECONDS:
        return
    problem = (
        "is a bare Pod without spec.activeDeadlineSeconds"
        if deadline is None
        else f"is a bare Pod with spec.activeDeadlineSeconds {deadline!r}"
    )
    yield Violation(
        "Pod",
        _name(obj),
        "pod-deadline",
        f"{problem}; the NRP allows interactive pods at most {MAX_POD_SECONDS // 3600} hours",
        f"set spec.activeDeadlineSeconds to at most {MAX_POD_SECONDS} (6 hours), or run the work as a Job "
        "that exits when done",
    )


def _claims(objects: list[Mapping]) -> dict[str, Mapping]:
    """PersistentVolumeClaims by name, from the objects at hand."""
    return {_name(o): o for o in objects if o.get("kind") == "PersistentVolumeClaim"}


def _volume_classes(spec: Mapping, claims: Mapping[str, Mapping]) -> dict[str, tuple[str, str | None]]:
    """Pod volume name -> (claim name, storage class if known)."""
    classes: dict[str, tuple[str, str | None]] = {}
    for v in spec.get("volumes") or []:
        if "persistentVolumeClaim" in v:
            claim = str(v["persistentVolumeClaim"].get("claimName"))
            claim_spec = (claims.get(claim) or {}).get("spec") or {}
            classes[v.get("name")] = (claim, claim_spec.get("storageClassName"))
        elif "ephemeral" in v:
            template = ((v["ephemeral"].get("volumeClaimTemplate") or {}).get("spec")) or {}
            classes[v.get("name")] = (f"{v.get('name')} (ephemeral)", template.get("storageClassName"))
    return classes


def _is_cephfs(storage_class: str | None) -> bool:
    return bool(storage_class) and "cephfs" in str(storage_class)


def _pod_volumes(obj: Mapping, spec: Mapping, claims: Mapping[str, Mapping]) -> Iterator[Violation]:
    kind, name = str(obj.get("kind")), _name(obj)
    classes = _volume_classes(spec, claims)
    for where, c in _containers(spec):
        mounts = c.get("volumeMounts") or []
        cephfs = [
            (m, classes[m.get("name")])
            for m in mounts
            if m.get("name") in classes and _is_cephfs(classes[m["name"]][1])
        ]
        for m in mounts:
            path = str(m.get("mountPath", ""))
            holds_weights = m.get("name") == "weights" or path == WEIGHTS_MOUNT or path.startswith(WEIGHTS_MOUNT + "/")
            claim, storage_class = classes.get(m.get("name"), (None, None))
            if holds_weights and storage_class and storage_class != STORAGE_RBD:
                yield Violation(
                    kind,
                    name,
                    "weights-on-rbd",
                    f"{where} reads model weights at {path} from claim {claim!r} on {storage_class}",
                    f"keep weights on a ReadWriteOnce {STORAGE_RBD} claim (one per model), never on CephFS",
                )
            claim_labels = ((claims.get(claim or "") or {}).get("metadata") or {}).get("labels") or {}
            if claim_labels.get(LABEL_VOLUME) == "input" and not m.get("readOnly"):
                yield Violation(
                    kind,
                    name,
                    "input-read-only",
                    f"{where} mounts the input claim {claim!r} at {path} writable",
                    "mount it with readOnly: true; the study inputs are written only by an operator",
                )
        for text in _command_texts(c):
            match = _INSTALL.search(text)
            if not match:
                continue
            if cephfs:
                onto = ", ".join(f"claim {cl!r} ({sc}) at {m.get('mountPath')}" for m, (cl, sc) in cephfs)
                problem = (
                    f"{where} runs {match.group(0)!r} at run time in a pod that mounts CephFS ({onto}); "
                    "installs onto shared volumes are banned on the NRP"
                )
            else:
                problem = f"{where} runs {match.group(0)!r} at run time"
            yield Violation(
                kind,
                name,
                "no-runtime-install",
                problem,
                "install packages into the image (deploy/Dockerfile) and remove the install from the command",
            )


def _claim_spec(kind: str, name: str, spec: Mapping, labels: Mapping) -> Iterator[Violation]:
    storage_class = spec.get("storageClassName")
    modes = set(spec.get("accessModes") or [])
    holds = labels.get(LABEL_VOLUME)
    is_weights = holds == "weights" or name.startswith("weights-")
    if storage_class in STORAGE_FORBIDDEN:
        yield Violation(
            kind,
            name,
            "storage-class",
            f"uses storage class {storage_class}: {STORAGE_FORBIDDEN[storage_class]}",
            f"set storageClassName to {STORAGE_RBD if is_weights else STORAGE_CEPHFS}",
        )
    elif storage_class not in (STORAGE_RBD, STORAGE_CEPHFS):
        got = f"storage class {storage_class!r}" if storage_class else "no storageClassName (the cluster default)"
        yield Violation(
            kind,
            name,
            "storage-class",
            f"uses {got}",
            f"set storageClassName to {STORAGE_RBD} (weights, one writer) or {STORAGE_CEPHFS} (shared data)",
        )
    if is_weights and storage_class != STORAGE_RBD:
        yield Violation(
            kind,
            name,
            "weights-on-rbd",
            f"holds model weights on {storage_class or 'the default storage class'}",
            f"put weights on {STORAGE_RBD} with accessModes [ReadWriteOnce]",
        )
    if storage_class == STORAGE_RBD and modes != {"ReadWriteOnce"}:
        yield Violation(
            kind,
            name,
            "rbd-access-mode",
            f"asks {STORAGE_RBD} for {sorted(modes)}; a block volume attaches to one node",
            "use accessModes [ReadWriteOnce], or rook-cephfs for data shared between pods",
        )
    if storage_class == STORAGE_CEPHFS and not is_weights:
        if not modes or not modes <= {"ReadWriteMany", "ReadOnlyMany"}:
            yield Violation(
                kind,
                name,
                "cephfs-access-mode",
                f"asks {STORAGE_CEPHFS} for {sorted(modes)}; shared data is ReadWriteMany or ReadOnlyMany",
                f"use accessModes [ReadWriteMany], or {STORAGE_RBD} for one writer",
            )
        elif modes == {"ReadOnlyMany"} and not (spec.get("dataSource") or spec.get("dataSourceRef")):
            yield Violation(
                kind,
                name,
                "cephfs-access-mode",
                "asks for a fresh ReadOnlyMany CephFS volume, which ceph-csi refuses to provision "
                "(read-only only for a claim cloned from a data source)",
                "use ReadWriteMany and mount it with readOnly: true, or clone it from a dataSource",
            )


def _storage(obj: Mapping) -> Iterator[Violation]:
    kind, name = str(obj.get("kind")), _name(obj)
    labels = (obj.get("metadata") or {}).get("labels") or {}
    if kind == "PersistentVolumeClaim":
        yield from _claim_spec(kind, name, obj.get("spec") or {}, labels)
    if kind == "StatefulSet":
        for t in (obj.get("spec") or {}).get("volumeClaimTemplates") or []:
            t_meta = t.get("metadata") or {}
            yield from _claim_spec(
                kind, f"{name} (claim template {t_meta.get('name')})", t.get("spec") or {}, t_meta.get("labels") or {}
            )
    spec = pod_spec(obj)
    for v in (spec or {}).get("volumes") or []:
        if "ephemeral" in v:
            template = v["ephemeral"].get("volumeClaimTemplate") or {}
            yield from _claim_spec(
                kind,
                f"{name} (ephemeral volume {v.get('name')})",
                template.get("spec") or {},
                (template.get("metadata") or {}).get("labels") or {},
            )


def _secret_values(obj: Mapping) -> Iterator[Violation]:
    if obj.get("kind") != "Secret":
        return
    filled = sorted(k for field in ("data", "stringData") for k, v in (obj.get(field) or {}).items() if v)
    if filled:
        yield Violation(
            "Secret",
            _name(obj),
            "secret-without-values",
            f"carries values for {', '.join(filled)}; secrets must never be committed",
            "empty the values in the template and create the real Secret with kubectl",
        )


def _quota(objects: list[Mapping]) -> Iterator[Violation]:
    for quota in (o for o in objects if o.get("kind") == "ResourceQuota"):
        hard = ((quota.get("spec") or {}).get("hard")) or {}
        ns = (quota.get("metadata") or {}).get("namespace")
        same_ns = [o for o in objects if (o.get("metadata") or {}).get("namespace") == ns]
        if "persistentvolumeclaims" in hard:
            count = sum(1 for o in same_ns if o.get("kind") == "PersistentVolumeClaim")
            allowed = int(parse_quantity(hard["persistentvolumeclaims"]))
            if count > allowed:
                yield Violation(
                    "ResourceQuota",
                    _name(quota),
                    "quota",
                    f"the manifests claim {count} PersistentVolumeClaims; the quota allows {allowed}",
                    "drop unused claims (models no longer served) or ask the admins for a larger quota",
                )
        gpu_key = f"requests.{GPU_RESOURCE}"
        if gpu_key in hard:
            allowed_gpus = parse_quantity(hard[gpu_key])
            for o in same_ns:
                spec = pod_spec(o)
                gpus = _pod_totals(spec).get(GPU_RESOURCE, Decimal(0)) if spec is not None else Decimal(0)
                if gpus > allowed_gpus:
                    yield Violation(
                        str(o.get("kind")),
                        _name(o),
                        "quota",
                        f"one pod requests {describe(GPU_RESOURCE, gpus)} GPUs; the namespace quota "
                        f"is {describe(GPU_RESOURCE, allowed_gpus)}, so it can never start",
                        "lower the model's resources.gpus",
                    )


def _unknown_model(obj: Mapping, registry: Registry) -> Iterator[Violation]:
    slug = model_slug(obj)
    if slug is not None and slug not in registry.by_slug:
        known = ", ".join(sorted(registry.by_slug))
        yield Violation(
            str(obj.get("kind")),
            _name(obj),
            "unknown-model",
            f"is labelled {LABEL_MODEL}: {slug}, which is not in the registry {registry.source}",
            f"use one of: {known}; or add the model to the registry and render again",
        )


def check_objects(objects: Iterable[Mapping], registry: Registry) -> list[Violation]:
    """Every NRP rule over `objects`; an empty list means they may be applied.

    Works on any subset: a single Deployment is checked on its own (volumes whose claims are not among the objects
    are judged by what is known), so the admission check can call this right before a scale-up.
    """
    objects = list(objects)
    claims = _claims(objects)
    violations: list[Violation] = []
    for obj in objects:
        violations += _workload_kind(obj)
        violations += _storage(obj)
        violations += _secret_values(obj)
        violations += _unknown_model(obj, registry)
        spec = pod_spec(obj)
        if spec is not None:
            violations += _container_resources(obj, spec)
            violations += _job_sleep(obj, spec)
            violations += _pod_deadline(obj, spec)
            violations += _pod_volumes(obj, spec, claims)
    violations += _exception_violations(objects, registry)
    violations += _quota(objects)
    return violations
