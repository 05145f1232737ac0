"""GPU governance: whether a model's vLLM Deployment may be brought up for a run, decided before any scale-up.

Three checks, all of which are evaluated so that one refusal lists every reason at once:

- **NRP policy** on the model's Deployment as the registry renders it and as it lives in the cluster (someone may
  have edited it with kubectl): `policy.check_objects`, the same rules `grace k8s lint` applies.
- **Namespace GPU quota**: the GPUs the namespace would hold after scaling this model from 0 to 1, against the
  `requests.nvidia.com/gpu` line of the quota rendered into `k8s/01-quota.yaml` (`conventions.QUOTA_HARD`). The
  GPUs in use are computed from the model Deployments themselves, `spec.replicas` × the GPUs one pod requests,
  rather than read from the ResourceQuota's `status.used`, because:
  `status.used` only counts pods that already exist, so a Deployment that another run scaled up a second ago
  (its pod not yet created) would be invisible and both runs would pass; and the run pods' RBAC grants `get` and
  `patch` on the model Deployments only (k8s/03-rbac.yaml), not on ResourceQuotas. Kubernetes' own quota stays the
  final backstop: a pod over it is never created, and the readiness wait reports the Deployment's ReplicaFailure.
- **Per-user limit** of concurrent GPU-backed runs (default 1, exceptions per user): the caller passes the user's
  other active runs (read from the Dagster instance by the resource; this module never imports Dagster).

Every refusal says the limit, the current count and what to do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from grace_dagster.k8s.conventions import GPU_RESOURCE, NAMESPACE, QUOTA_HARD, deployment_name
from grace_dagster.k8s.policy import Violation, check_objects, pod_spec
from grace_dagster.k8s.quantity import QuantityError, parse_quantity
from grace_dagster.k8s.render import deployment as render_deployment
from grace_dagster.registry.loader import Model, Registry

# Run tags the project sets on every run it launches (grace_dagster/runner.py); the model tag has the same key as
# the objects' model label on purpose.
TAG_MODEL = "grace/model"
TAG_USER = "grace/user"
TAG_STUDY = "grace/study"
# Dagster's own tag on a run of one multi-partition key: a run launched from the UI for a model × study partition
# carries it even without the project's tags.
TAG_PARTITION_MODEL = "dagster/partition/model"

QUOTA_GPU_KEY = f"requests.{GPU_RESOURCE}"
DEFAULT_GPU_QUOTA = int(parse_quantity(QUOTA_HARD[QUOTA_GPU_KEY]))
DEFAULT_USER_GPU_RUN_LIMIT = 1


class AdmissionRefused(RuntimeError):
    """The model may not be brought up for this run; the message lists each reason with what to do."""

    def __init__(self, model: str, reasons: Sequence[str]):
        self.model = model
        self.reasons = list(reasons)
        lines = "\n".join(f"  - {r}" for r in self.reasons)
        super().__init__(f"refusing to bring up model {model!r} on the cluster:\n{lines}")


@dataclass(frozen=True)
class ActiveRun:
    """Another run of the same user that holds a GPU-backed model (as read from the Dagster instance)."""

    run_id: str
    model: str
    status: str

    def __str__(self) -> str:
        return f"{self.run_id} ({self.model}, {self.status})"


@dataclass(frozen=True)
class Governance:
    """What admission needs to know beyond the cluster: who is asking, their limit, and their other runs."""

    user: str | None
    user_limit: int = DEFAULT_USER_GPU_RUN_LIMIT
    user_runs: Sequence[ActiveRun] = field(default_factory=tuple)
    gpu_quota: int = DEFAULT_GPU_QUOTA
    namespace: str = NAMESPACE


def is_gpu_backed(model: Model) -> bool:
    return model.resources.gpus > 0


def run_model(tags: Mapping[str, str]) -> str | None:
    """The registry slug a run works on, from its tags (the project's tag first, else Dagster's partition tag)."""
    return tags.get(TAG_MODEL) or tags.get(TAG_PARTITION_MODEL)


def user_limit(user: str | None, default: int, exceptions: Mapping[str, int]) -> int:
    return exceptions.get(user, default) if user is not None else default


def replicas(deployment: Mapping) -> int:
    value = (deployment.get("spec") or {}).get("replicas")
    # An unset spec.replicas means 1 to the Deployment controller.
    return 1 if value is None else int(value)


def gpus_per_pod(deployment: Mapping) -> int:
    """The GPUs one pod of a workload requests (what the quota counts): the sum over its containers."""
    spec = pod_spec(deployment) or {}
    total = Decimal(0)
    for container in spec.get("containers") or []:
        resources = container.get("resources") or {}
        # Extended resources such as GPUs may set only a limit; the request then defaults to it.
        amount = (resources.get("requests") or {}).get(GPU_RESOURCE, (resources.get("limits") or {}).get(GPU_RESOURCE))
        if amount is not None:
            try:
                total += parse_quantity(amount)
            except QuantityError:
                continue  # the policy check reports the malformed quantity
    return int(total)


def policy_reasons(model: Model, registry: Registry, live: Mapping | None) -> list[str]:
    """NRP violations of the model's Deployment, as rendered from the registry and as it lives in the cluster."""
    reasons: list[str] = []
    seen: set[tuple[str, str]] = set()
    sources = [("rendered from the registry", render_deployment(model))]
    if live is not None:
        sources.append(("live in the cluster", dict(live)))
    for where, obj in sources:
        for v in check_objects([obj], registry):
            if (v.rule, v.problem) in seen:
                continue
            seen.add((v.rule, v.problem))
            reasons.append(_policy_reason(v, where))
    return reasons


def _policy_reason(v: Violation, where: str) -> str:
    return f"NRP policy: {v.object} ({where}): [{v.rule}] {v.problem}. Fix: {v.fix}."


def quota_reason(model: Model, deployments: Mapping[str, Mapping | None], governance: Governance) -> str | None:
    """Why scaling the model from 0 to 1 would break the namespace GPU quota, or None when it fits."""
    name = deployment_name(model.slug)
    own = deployments.get(name)
    if own is not None and replicas(own) >= 1:
        return None  # already up: nothing is added
    needed = gpus_per_pod(own) if own is not None else model.resources.gpus
    holders = []
    in_use = 0
    for other_name, obj in sorted(deployments.items()):
        if obj is None or other_name == name:
            continue
        count, gpus = replicas(obj), gpus_per_pod(obj)
        if count > 0 and gpus > 0:
            in_use += count * gpus
            holders.append(f"{other_name}: {count} × {gpus}")
    if in_use + needed <= governance.gpu_quota:
        return None
    ns = governance.namespace
    held = ", ".join(holders) if holders else "none of the model Deployments"
    return (
        f"namespace GPU quota: the limit is {governance.gpu_quota} GPUs ({QUOTA_GPU_KEY} in k8s/01-quota.yaml) and "
        f"{in_use} are held ({held}); scaling {name} to 1 needs {needed} more, {in_use + needed} in all. "
        "What to do: wait for the runs using the other models to finish (the scale_idle_models sensor gives idle "
        f"models back), scale an idle model down yourself (`kubectl -n {ns} scale deployment <name> --replicas=0`), "
        "or ask the NRP admins for a larger quota"
    )


def user_reason(model: Model, governance: Governance) -> str | None:
    """Why the user may not start another GPU-backed run, or None when within their limit."""
    if governance.user is None:
        return (
            f"per-user GPU limit: no user is known for this run, so the limit of concurrent GPU-backed runs cannot "
            f"be applied to {model.slug!r}. What to do: launch it with the run tag {TAG_USER}=<you> (`grace run` "
            "sets it), or set GRACE_USER or the `user` field of the llm resource"
        )
    count = len(governance.user_runs)
    if count < governance.user_limit:
        return None
    runs = ", ".join(str(r) for r in governance.user_runs)
    return (
        f"per-user GPU limit: user {governance.user!r} may have {governance.user_limit} GPU-backed run(s) at a time "
        f"and has {count} running: {runs}. What to do: wait for it to finish or cancel it (Dagster UI, Runs), then "
        f"launch again; or, for a recorded reason, raise the limit for {governance.user!r} with the llm resource's "
        f"user_exceptions (e.g. {{{governance.user}: {governance.user_limit + 1}}})"
    )


def admission_reasons(
    model: Model,
    registry: Registry,
    live: Mapping | None,
    deployments: Mapping[str, Mapping | None],
    governance: Governance,
) -> list[str]:
    """Every reason to refuse bringing `model` up; an empty list admits it.

    `live` is the model's Deployment in the cluster; `deployments` maps every model Deployment name to its live
    object (None when absent), for the quota.
    """
    reasons = policy_reasons(model, registry, live)
    if is_gpu_backed(model):
        for reason in (quota_reason(model, deployments, governance), user_reason(model, governance)):
            if reason is not None:
                reasons.append(reason)
    return reasons


def admit(
    model: Model,
    registry: Registry,
    live: Mapping | None,
    deployments: Mapping[str, Mapping | None],
    governance: Governance,
) -> None:
    """Raise `AdmissionRefused` with every reason when the model may not be brought up for this run."""
    reasons = admission_reasons(model, registry, live, deployments, governance)
    if reasons:
        raise AdmissionRefused(model.slug, reasons)
