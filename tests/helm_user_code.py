"""The Dagster chart's user-code subchart, emulated for the tests: what it renders from our values, and which of our
keys it reads at all.

There is no helm here, so the templates are transliterated, function by function, from the chart's source
(helm/dagster/charts/dagster-user-deployments/templates/ and the parent's configmap-workspace.yaml in
dagster-io/dagster; each function names its template). Only the objects and fields this project relies on are
rendered in full; the rest of each template is read (so its keys count as read) but not built.

Values are read through `Values`, a view that records every key a template touches. A key in our values that no
template reads is a key the chart ignores, silently: its schema does not refuse unknown keys (a `serviceAccount`
inside one entry of `deployments` passed it for that reason while the code server ran under the chart's own
account). `unread_keys` lists them.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

CHART_NAME = "dagster-user-deployments"

# The subchart's own defaults (its values.yaml), for the keys the transliterated templates read. Helm merges the
# parent's `dagster-user-deployments:` block onto these, then copies the parent's `global` in.
SUBCHART_DEFAULTS: dict[str, Any] = {
    "dagsterHome": "/opt/dagster/dagster_home",
    "postgresqlSecretName": "dagster-postgresql-secret",
    "celeryConfigSecretName": "dagster-celery-config-secret",
    "imagePullSecrets": [],
    "serviceAccount": {"create": True, "name": "", "annotations": {}},
    "rbacEnabled": True,
    "extraManifests": [],
}


@dataclass
class ReadLog:
    """Key paths a template read: `read` for a key looked at, `whole` for a value used whole (toYaml)."""

    read: set[str] = field(default_factory=set)
    whole: set[str] = field(default_factory=set)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _wrap(value: Any, path: str, log: ReadLog) -> Any:
    if isinstance(value, Mapping):
        return Values(value, path, log)
    if isinstance(value, list):
        return ValuesList(value, path, log)
    return value


class Values(Mapping):
    """A read-only view of helm values that records each key read through it."""

    def __init__(self, data: Mapping, path: str = "", log: ReadLog | None = None):
        self._data = data
        self._path = path
        self.log = log if log is not None else ReadLog()

    def __getitem__(self, key: str) -> Any:
        path = _join(self._path, key)
        self.log.read.add(path)
        return _wrap(self._data[key], path, self.log)

    def get(self, key: str, default: Any = None) -> Any:
        self.log.read.add(_join(self._path, key))
        return self[key] if key in self._data else default

    def __contains__(self, key: object) -> bool:  # a template's `hasKey`
        self.log.read.add(_join(self._path, str(key)))
        return key in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __bool__(self) -> bool:
        return bool(self._data)

    def whole(self) -> dict:
        self.log.whole.add(self._path)
        return copy.deepcopy(dict(self._data))


class ValuesList(list):
    """A list inside the values: its items share one path (`deployments[]`), as every entry has the same keys."""

    def __init__(self, data: list, path: str, log: ReadLog):
        super().__init__(_wrap(item, f"{path}[]", log) for item in data)
        self._raw = data
        self._path = path
        self.log = log

    def whole(self) -> list:
        self.log.whole.add(self._path)
        return copy.deepcopy(self._raw)


def to_yaml(value: Any) -> Any:
    """`toYaml`: the whole value, recorded as read in full."""
    return value.whole() if isinstance(value, Values | ValuesList) else copy.deepcopy(value)


def unread_keys(data: Any, log: ReadLog, path: str = "") -> list[str]:
    """Every key path in `data` that no template read (neither looked at nor used whole)."""
    if path in log.whole:
        return []
    unread: list[str] = []
    if isinstance(data, Mapping):
        for key, value in data.items():
            child = _join(path, key)
            if child in log.whole:
                continue
            if child not in log.read:
                unread.append(child)
            elif isinstance(value, Mapping | list):
                unread += unread_keys(value, log, child)
    elif isinstance(data, list):
        for item in data:
            unread += [p for p in unread_keys(item, log, f"{path}[]") if p not in unread]
    return unread


def helm_merge(defaults: Mapping, overrides: Mapping) -> dict:
    """Helm's merge of user values onto chart defaults: maps merge key by key, anything else replaces, null deletes."""
    merged = copy.deepcopy(dict(defaults))
    for key, value in overrides.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = helm_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def subchart_values(parent: Mapping) -> dict:
    """What the subchart's templates see as `.Values`: its defaults, our block over them, the parent's globals."""
    values = helm_merge(SUBCHART_DEFAULTS, parent[CHART_NAME])
    values["global"] = copy.deepcopy(parent["global"])
    return values


# --- helpers/_helpers.tpl ------------------------------------------------------------------------------------------


def fullname(v: Values, release: str) -> str:
    """ "dagster.fullname" of the subchart: the release name, or release-chart when it does not contain the chart."""
    override = v["global"].get("fullnameOverride") or v.get("fullnameOverride")
    if override:
        return str(override)[:63]
    name = v["global"].get("nameOverride") or v.get("nameOverride") or CHART_NAME
    return (release if name in release else f"{release}-{name}")[:63]


def service_account_name(v: Values, release: str) -> str:
    """ "dagsterUserDeployments.serviceAccountName"."""
    account = v.get("serviceAccount") or {}
    return v["global"]["serviceAccountName"] or account.get("name") or f"{fullname(v, release)}-user-deployments"


def _image(image: Values) -> str:
    """ "dagster.dagsterImage.name" (the tag defaults to the chart version, which these values never rely on)."""
    return f"{image['repository']}:{image['tag']}"


# --- templates/deployment-user.yaml --------------------------------------------------------------------------------


def _probe(deployment: Values, key: str) -> dict | None:
    probe = deployment.get(key)
    default = {"exec": {"command": ["dagster", "api", "grpc-health-check", "-p", str(deployment["port"])]}}
    if key == "readinessProbe":
        if not probe:
            return {**default, "periodSeconds": 20, "timeoutSeconds": 10, "successThreshold": 1, "failureThreshold": 15}
        if probe.get("enabled") is False:
            return None
    elif key == "startupProbe":
        if not probe or not probe.get("enabled"):
            return None
    elif not probe:
        return None
    if probe.get("exec"):
        return {k: w for k, w in to_yaml(probe).items() if k != "enabled"}
    fields = ("initialDelaySeconds", "periodSeconds", "timeoutSeconds", "successThreshold", "failureThreshold")
    return {**default, **{f: probe[f] for f in fields if f in probe}}


def code_server_deployment(v: Values, deployment: Values, release: str) -> dict:
    """One code-server Deployment as templates/deployment-user.yaml renders it."""
    name = f"{fullname(v, release)}-{deployment['name']}"
    image = _image(deployment["image"])
    port = deployment["port"]
    env: list[dict] = [
        {"name": "DAGSTER_CURRENT_IMAGE", "value": image},
        {
            "name": "DAGSTER_PG_PASSWORD",
            "valueFrom": {
                "secretKeyRef": {
                    "name": v["global"]["postgresqlSecretName"] or v["postgresqlSecretName"],
                    "key": "postgresql-password",
                }
            },
        },
    ]
    include = deployment.get("includeConfigInLaunchedRuns") or {"enabled": True}
    if include["enabled"]:
        context = json.dumps(container_context(v, deployment, release))
        grpc = deployment.get("dagsterApiGrpcArgs")
        key = "DAGSTER_CLI_API_GRPC_CONTAINER_CONTEXT" if grpc else "DAGSTER_CONTAINER_CONTEXT"
        env.append({"name": key, "value": context})
    user_env = deployment.get("env")
    if isinstance(user_env, ValuesList) and user_env:
        env += to_yaml(user_env)
    env_from = [
        {"configMapRef": {"name": f"{fullname(v, release)}-user-deployments-shared-env"}},
        {"configMapRef": {"name": f"{fullname(v, release)}-{deployment['name']}-user-env"}},
        *({"configMapRef": to_yaml(c)} for c in deployment.get("envConfigMaps") or []),
        *({"secretRef": to_yaml(s)} for s in deployment.get("envSecrets") or []),
    ]
    celery = v["global"].get("celeryConfigSecretName") or v["celeryConfigSecretName"]
    if celery:
        env_from.append({"secretRef": {"name": celery, "optional": True}})
    listen = ["-h", "0.0.0.0", "-p", str(port)]
    if deployment.get("dagsterApiGrpcArgs"):
        args = ["dagster", "api", "grpc", *listen, *to_yaml(deployment["dagsterApiGrpcArgs"])]
    elif deployment.get("codeServerArgs"):
        args = ["dagster", "code-server", "start", *listen, *to_yaml(deployment["codeServerArgs"])]
    else:
        args = None
    container: dict[str, Any] = {
        "name": CHART_NAME,
        "securityContext": to_yaml(deployment.get("securityContext")),
        "imagePullPolicy": deployment["image"]["pullPolicy"],
        "image": image,
        **({"args": args} if args else {}),
        "env": env,
        "envFrom": env_from,
        "resources": to_yaml(deployment.get("resources")),
    }
    for key in ("readinessProbe", "livenessProbe", "startupProbe"):
        probe = _probe(deployment, key)
        if probe is not None:
            container[key] = probe
    if deployment.get("volumeMounts"):
        container["volumeMounts"] = to_yaml(deployment["volumeMounts"])
    labels = {
        "app.kubernetes.io/name": CHART_NAME,
        "app.kubernetes.io/instance": release,
        "component": "user-deployments",
        "deployment": deployment["name"],
    }
    pod_spec: dict[str, Any] = {
        "imagePullSecrets": to_yaml(v["imagePullSecrets"]),
        # The one line this module exists for: the entry's own serviceAccount is not consulted, only the chart's.
        "serviceAccountName": service_account_name(v, release),
        "automountServiceAccountToken": True,
        "securityContext": to_yaml(deployment.get("podSecurityContext")),
        **({"initContainers": to_yaml(deployment["initContainers"])} if deployment.get("initContainers") else {}),
        "containers": [container, *to_yaml(deployment.get("sidecarContainers") or [])],
        "nodeSelector": to_yaml(deployment.get("nodeSelector")),
        "affinity": to_yaml(deployment.get("affinity")),
        "tolerations": to_yaml(deployment.get("tolerations")),
        **({"volumes": to_yaml(deployment["volumes"])} if deployment.get("volumes") else {}),
        **({"schedulerName": deployment["schedulerName"]} if deployment.get("schedulerName") else {}),
    }
    # A null renders as an absent field; an empty map stays.
    pod_spec = {k: w for k, w in pod_spec.items() if w is not None}
    for key in [k for k, w in container.items() if w is None]:
        del container[key]
    extra_labels = to_yaml(deployment.get("labels")) or {}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "labels": {**labels, **extra_labels},
            "annotations": to_yaml(deployment.get("annotations")) or {},
        },
        "spec": {
            "replicas": 1,
            **({"strategy": to_yaml(deployment["deploymentStrategy"])} if deployment.get("deploymentStrategy") else {}),
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": {**labels, **extra_labels}}, "spec": pod_spec},
        },
    }


def container_context(v: Values, deployment: Values, release: str) -> dict:
    """ "dagsterUserDeployments.k8sContainerContext": what the code server passes to the runs it launches."""
    k8s: dict[str, Any] = {
        "image_pull_policy": deployment["image"]["pullPolicy"],
        "env_config_maps": [f"{fullname(v, release)}-{deployment['name']}-user-env"]
        + [c["name"] for c in deployment.get("envConfigMaps") or [] if "name" in c],
        "namespace": "grace",
        "service_account_name": service_account_name(v, release),
    }
    if v["imagePullSecrets"]:
        k8s["image_pull_secrets"] = to_yaml(v["imagePullSecrets"])
    if deployment.get("envSecrets"):
        k8s["env_secrets"] = [s["name"] for s in deployment["envSecrets"] if "name" in s]
    for key, name in (
        ("volumeMounts", "volume_mounts"),
        ("volumes", "volumes"),
        ("labels", "labels"),
        ("resources", "resources"),
        ("schedulerName", "scheduler_name"),
    ):
        if deployment.get(key):
            k8s[name] = to_yaml(deployment[key])
    if isinstance(deployment.get("env"), ValuesList) and deployment["env"]:
        k8s["env"] = to_yaml(deployment["env"])
    return {"k8s": k8s}


# --- the other templates that read our keys ------------------------------------------------------------------------


def user_env_configmap(v: Values, deployment: Values, release: str) -> dict:
    """templates/configmap-env-user.yaml: `env` given as a map (the older form) becomes a ConfigMap."""
    user_env = deployment.get("env")
    data = {str(k): str(w) for k, w in to_yaml(user_env).items()} if isinstance(user_env, Values) else {}
    name = f"{fullname(v, release)}-{deployment['name']}-user-env"
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}


def code_server_service(deployment: Values) -> dict:
    """templates/service-user.yaml."""
    service = deployment.get("service") or {}
    annotations = to_yaml(service["annotations"]) if "annotations" in service else {}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": deployment["name"], "annotations": annotations},
        "spec": {"type": "ClusterIP", "ports": [{"port": deployment["port"], "protocol": "TCP", "name": "grpc"}]},
    }


def disruption_budget(deployment: Values) -> dict | None:
    """templates/pdb-user.yaml."""
    return {"kind": "PodDisruptionBudget", "spec": to_yaml(deployment["pdb"])} if deployment.get("pdb") else None


def subchart_service_account(v: Values, release: str) -> dict | None:
    """templates/serviceaccount.yaml: created unless `create` is false or a global account name is set."""
    if not v["serviceAccount"]["create"] or v["global"]["serviceAccountName"]:
        return None
    name = service_account_name(v, release)
    annotations = to_yaml(v["serviceAccount"]["annotations"])
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "annotations": annotations}}


def subchart_rbac(v: Values, release: str) -> list[dict]:
    """templates/role.yaml and rolebinding.yaml: the chart's own Role (jobs and pods), bound to its account."""
    if not v["rbacEnabled"]:
        return []
    role = f"{fullname(v, release)}-role"
    subject = {"kind": "ServiceAccount", "name": service_account_name(v, release)}
    return [
        {"kind": "Role", "metadata": {"name": role}},
        {"kind": "RoleBinding", "metadata": {"name": f"{role}binding"}, "subjects": [subject]},
    ]


def workspace_servers(parent_block: Values) -> list[dict]:
    """The parent chart's templates/configmap-workspace.yaml: one gRPC server per entry, when `enabled`."""
    if not parent_block["enabled"]:
        return []
    servers = []
    for deployment in parent_block["deployments"]:
        server = {"host": deployment["name"], "port": deployment["port"], "location_name": deployment["name"]}
        if deployment.get("ssl"):
            server["ssl"] = deployment["ssl"]
        servers.append(server)
    return servers


@dataclass
class Rendered:
    """What the chart makes of the `dagster-user-deployments` block, and which of its keys it read."""

    deployments: list[dict]
    objects: list[dict]
    unread: list[str]


def render_user_code(parent: Mapping, ours: Mapping, release: str) -> Rendered:
    """Render the subchart from the merged parent values; report the keys of `ours` (our block) no template read."""
    log = ReadLog()
    # The parent chart reads `enabled` and `enableSubchart` (Chart.yaml's dependency condition) itself.
    parent_block = Values(parent[CHART_NAME], "", log)
    workspace_servers(parent_block)
    objects: list[dict] = []
    deployments: list[dict] = []
    if parent_block["enableSubchart"]:
        v = Values(subchart_values(parent), "", log)
        for deployment in v["deployments"]:
            deployments.append(code_server_deployment(v, deployment, release))
            objects += [user_env_configmap(v, deployment, release), code_server_service(deployment)]
            budget = disruption_budget(deployment)
            if budget:
                objects.append(budget)
        account = subchart_service_account(v, release)
        objects += [account] if account else []
        objects += subchart_rbac(v, release)
    return Rendered(deployments, objects, unread_keys(ours, log))
