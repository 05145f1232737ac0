"""Names, labels and NRP facts shared by the renderer, the policy and (later) the k8s endpoint resource.

They live apart from `render.py` so that the policy and the admission check can read a live object's labels without
importing the renderer, and so that a renamed label cannot silently split the renderer from the checks.
"""

from __future__ import annotations

import re

NAMESPACE = "grace"
PART_OF = "grace"

# Label and annotation keys carried by the rendered objects.
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
# The registry slug of the model an object serves: how the policy finds the model's NRP exceptions.
LABEL_MODEL = "grace/model"
# What a PVC holds: weights | input | output. Weights must be on RBD, shared data on CephFS.
LABEL_VOLUME = "grace/volume"
# Pods allowed to reach the model servers through the NetworkPolicy (the Dagster run and step pods).
LABEL_MODEL_CLIENT = "grace/model-client"

# How a Deployment declares its intended lifetime. The NRP needs an exception for Deployments meant to live more
# than 2 weeks, so a Deployment says either that it is removed within 2 weeks, or that it is long-lived, and then
# its model must carry the `deployment-lifetime-over-2-weeks` exception in the registry. A Deployment without the
# annotation is treated as long-lived: nothing in it promises that it will be removed.
ANNOTATION_LIFETIME = "grace/lifetime"
LIFETIME_LONG = "long-lived"
LIFETIME_SHORT = "under-2-weeks"
# Informational only (the policy reads the registry, never this): the exceptions the registry grants the model.
ANNOTATION_EXCEPTIONS = "grace/nrp-exceptions"
ANNOTATION_WEIGHTS = "grace/weights"

STORAGE_RBD = "rook-ceph-block"
STORAGE_CEPHFS = "rook-cephfs"
# Storage classes the project must never use, with the reason shown in the violation.
STORAGE_FORBIDDEN = {
    "rook-cephfs-ucsd": "the NRP audit forbids rook-cephfs-ucsd for this project; shared data goes on rook-cephfs",
}

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"

# The namespace quota (DESIGN section 8): the cluster-wide GPU cap of the admission control is the GPU line.
QUOTA_HARD = {
    "requests.nvidia.com/gpu": "15",
    "requests.cpu": "200",
    "requests.memory": "800Gi",
    "persistentvolumeclaims": "20",
    "pods": "50",
}

WEIGHTS_MOUNT = "/models"
VLLM_PORT = 8000

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def k8s_name(slug: str) -> str:
    """The object-name form of a registry slug.

    Slugs may contain '.', which Service names (DNS-1035 labels) may not, so every object of a model uses the same
    dotless form.
    """
    return slug.replace(".", "-")


def deployment_name(slug: str) -> str:
    return f"vllm-{k8s_name(slug)}"


def service_name(slug: str) -> str:
    """The Service in front of a model's Deployment: `http://<name>.<namespace>.svc:8000/v1` is its base URL."""
    return deployment_name(slug)


def weights_pvc_name(slug: str) -> str:
    return f"weights-{k8s_name(slug)}"


def is_dns_label(name: str) -> bool:
    return len(name) <= 63 and bool(_DNS_LABEL.match(name))
