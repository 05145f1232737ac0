"""A FAKE Kubernetes API server for the tests, over HTTP on 127.0.0.1, in front of the real `kubernetes` client.

No cluster is reachable from the development machines and no API server can be installed here, so this small
threaded server implements exactly the calls the project makes, and answers them the way a real API server does
where the code depends on it:

- the objects: the committed manifests under k8s/ (model Deployments, PersistentVolumeClaims), Jobs a test adds;
- reads: `GET` of one Deployment or its `scale`, and `GET` (list) of Deployments, PersistentVolumeClaims and Jobs in
  the namespace;
- writes: `PATCH` of a Deployment or its `scale`. A merge patch must be an object; every field in it is checked
  against the `kubernetes` client's models (V1Scale, V1Deployment): a wrong type is refused with 400, an unknown
  field with 400 under `fieldValidation=Strict` and otherwise dropped with a Warning header (the server's default);
- authorization: requests run as the service account `grace-run` and are checked against the rules of the Role that
  k8s/03-rbac.yaml binds to it (verb, API group, resource or subresource, resourceNames); anything else is 403
  Forbidden with the API server's message. `identity=None` stands for an operator with namespace-admin rights;
- load: while a scaled-up Deployment is rolling out, every `flaky_every`-th read of it is answered 429 Too Many
  Requests (with Retry-After, as API priority and fairness does) or 500, alternately (500 first: urllib3 itself
  waits out a 429's Retry-After of 1 s, which would slow every test);
- a rollout: a scaled-up Deployment reports its replica ready `ready_delay` seconds after the scale;
- `GET /v1/models` lists the served models of ready Deployments, standing in for the vLLM Services.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import kubernetes.client.models as k8s_models
import yaml

from grace_dagster.k8s.conventions import NAMESPACE, deployment_name
from grace_dagster.k8s.manifests import load_manifests
from grace_dagster.registry import load_registry

ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = ROOT / "k8s"
RBAC_FILE = K8S_DIR / "03-rbac.yaml"
REGISTRY = load_registry()
SERVICE_ACCOUNT = "grace-run"
CREATED = "2026-06-01T09:00:00Z"

# path -> (API group, resource, whether the path names one object, subresource)
_ROUTES = [
    (re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments$"), "apps", "deployments", False, None),
    (re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)$"), "apps", "deployments", True, None),
    (re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)/scale$"), "apps", "deployments", True, "scale"),
    (re.compile(r"^/api/v1/namespaces/([^/]+)/persistentvolumeclaims$"), "", "persistentvolumeclaims", False, None),
    (re.compile(r"^/apis/batch/v1/namespaces/([^/]+)/jobs$"), "batch", "jobs", False, None),
]
_KIND_OF = {"deployments": "Deployment", "persistentvolumeclaims": "PersistentVolumeClaim", "jobs": "Job"}
_LIST_VERSION = {"deployments": "apps/v1", "persistentvolumeclaims": "v1", "jobs": "batch/v1"}
_PATCH_MODEL = {None: "V1Deployment", "scale": "V1Scale"}
_MERGE_PATCHES = ("application/merge-patch+json", "application/strategic-merge-patch+json")


def status_body(code: int, reason: str, message: str, details: Mapping | None = None) -> dict:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = dict(details)
    return body


# --- what the kubernetes client's models accept ---------------------------------------------------------------------

_PRIMITIVES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "datetime": (str,)}
_GO_TYPES = {"str": "string", "int": "int32", "float": "float64", "bool": "bool", "datetime": "Time"}


def model_errors(value: object, type_name: str, path: str = "") -> list[str]:
    """How `value` (a patch fragment) disagrees with the client model `type_name`, in the API server's words."""
    if value is None:
        return []  # null in a merge patch removes the field
    if type_name.startswith("list["):
        if not isinstance(value, list):
            return [f"json: cannot unmarshal {_json_type(value)} into Go value of type []{type_name[5:-1]} ({path})"]
        return [e for i, item in enumerate(value) for e in model_errors(item, type_name[5:-1], f"{path}[{i}]")]
    if type_name.startswith("dict("):
        inner = type_name[type_name.index(",") + 1 : -1].strip()
        if not isinstance(value, dict):
            return [f"json: cannot unmarshal {_json_type(value)} into Go value of type map ({path})"]
        return [e for k, item in value.items() for e in model_errors(item, inner, f"{path}.{k}")]
    if type_name == "object":
        return []
    if type_name in _PRIMITIVES:
        wanted = _PRIMITIVES[type_name]
        if not isinstance(value, wanted) or (type_name != "bool" and isinstance(value, bool)):
            return [
                f"json: cannot unmarshal {_json_type(value)} into Go struct field {path} of type {_GO_TYPES[type_name]}"
            ]
        return []
    model = getattr(k8s_models, type_name)
    if not isinstance(value, dict):
        return [f"json: cannot unmarshal {_json_type(value)} into Go value of type {type_name} ({path})"]
    attribute_of = {json_name: attr for attr, json_name in model.attribute_map.items()}
    errors = []
    for key, item in value.items():
        field = f"{path}.{key}" if path else key
        if key not in attribute_of:
            errors.append(f'unknown field "{field}"')
        else:
            errors += model_errors(item, model.openapi_types[attribute_of[key]], field)
    return errors


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


# --- RBAC -----------------------------------------------------------------------------------------------------------


def role_rules(path: Path = RBAC_FILE, account: str = SERVICE_ACCOUNT) -> list[dict]:
    """The rules of every Role in `path` that a RoleBinding in it grants to the service account."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Role"}
    rules = []
    for binding in (d for d in docs if d["kind"] == "RoleBinding"):
        subjects = binding.get("subjects") or []
        if any(s.get("kind") == "ServiceAccount" and s.get("name") == account for s in subjects):
            rules += roles[binding["roleRef"]["name"]].get("rules") or []
    return rules


def allowed(rules: Iterable[Mapping], verb: str, group: str, resource: str, name: str | None) -> bool:
    for rule in rules:
        if not ({group, "*"} & set(rule.get("apiGroups") or [])):
            continue
        if not ({resource, "*"} & set(rule.get("resources") or [])):
            continue
        if not ({verb, "*"} & set(rule.get("verbs") or [])):
            continue
        names = rule.get("resourceNames") or []
        # resourceNames cannot restrict list (the request names no object), as in the real authorizer.
        if names and (name is None or name not in names):
            continue
        return True
    return False


class FakeCluster:
    """The Kubernetes API calls of grace_dagster.k8s, plus vLLM's /v1/models, over HTTP on 127.0.0.1. Its objects are
    the manifests in `manifests` (default: the committed k8s/), as `kubectl apply -R -f` would have created them."""

    def __init__(
        self,
        ready_delay: float = 0.3,
        identity: str | None = SERVICE_ACCOUNT,
        rules: list[dict] | None = None,
        flaky_every: int = 3,
        flaky_statuses: tuple[int, ...] = (500, 429),
        manifests: Path = K8S_DIR,
    ):
        self.ready_delay = ready_delay
        self.identity = identity
        self.rules = role_rules(manifests / RBAC_FILE.name) if rules is None else rules
        self.flaky_every = flaky_every
        self.flaky_statuses = flaky_statuses
        self.lock = threading.Lock()
        committed = [m.obj for m in load_manifests(manifests)]
        self.deployments = {o["metadata"]["name"]: copy.deepcopy(o) for o in committed if o["kind"] == "Deployment"}
        self.claims = {
            o["metadata"]["name"]: copy.deepcopy(o) for o in committed if o["kind"] == "PersistentVolumeClaim"
        }
        for obj in [*self.deployments.values(), *self.claims.values()]:
            obj["metadata"]["creationTimestamp"] = CREATED
        self.jobs: dict[str, dict] = {}
        self.scaled_at: dict[str, float] = {}
        self.never_ready: set[str] = set()
        self.not_serving: set[str] = set()  # ready, but /v1/models does not list the model (still loading)
        # Deployments scaled back to 0 on the first read during their rollout, as a racing idle scaler would.
        self.race_scale_down: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.scales: list[tuple[str, int]] = []
        self.refused: list[tuple[int, str]] = []  # (status, "VERB path") of every 4xx/5xx answered
        self.unexpected: list[str] = []
        self.warnings: list[str] = []  # unknown fields dropped from a non-strict patch
        self._rollout_reads = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def send(self, code: int, body: dict, headers: Mapping[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                fake.handle(self, "GET")

            def do_PATCH(self) -> None:
                fake.handle(self, "PATCH")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> FakeCluster:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- state ---------------------------------------------------------------------------------------------------

    def set_replicas(self, name: str, count: int, ready: bool = True) -> None:
        with self.lock:
            self.deployments[name]["spec"]["replicas"] = count
            self.scaled_at[name] = time.monotonic() - (self.ready_delay if ready else 0)

    def replicas(self, name: str) -> int:
        with self.lock:
            return self.deployments[name]["spec"]["replicas"]

    def add_job(self, name: str, created: str = CREATED, succeeded: bool = True) -> None:
        with self.lock:
            self.jobs[name] = {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {"name": name, "namespace": NAMESPACE, "creationTimestamp": created},
                "spec": {"template": {"spec": {"containers": [{"name": "run", "image": "x"}]}}},
                "status": {"succeeded": 1} if succeeded else {"active": 1},
            }

    def _status(self, name: str) -> dict:
        count = self.deployments[name]["spec"]["replicas"]
        rolled_out = time.monotonic() - self.scaled_at.get(name, 0.0) >= self.ready_delay
        ready = count if rolled_out and name not in self.never_ready else 0
        status: dict = {"observedGeneration": 1, "replicas": count}
        if ready:
            status["readyReplicas"] = status["availableReplicas"] = ready
        elif count:
            status["unavailableReplicas"] = count
            status["conditions"] = [
                {
                    "type": "Available",
                    "status": "False",
                    "reason": "MinimumReplicasUnavailable",
                    "message": "Deployment does not have minimum availability.",
                }
            ]
        return status

    def served(self) -> list[str]:
        by_name = {deployment_name(m.slug): m.served_name for m in REGISTRY.models}
        with self.lock:
            return [
                by_name[n]
                for n in self.deployments
                if self._status(n).get("readyReplicas") and n not in self.not_serving and n in by_name
            ]

    # --- HTTP ----------------------------------------------------------------------------------------------------

    def _refuse(self, request, code: int, reason: str, message: str, method: str, path: str, **kw) -> None:
        self.refused.append((code, f"{method} {path}"))
        request.send(code, status_body(code, reason, message, kw.get("details")), kw.get("headers"))

    def handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        path, _, query = request.path.partition("?")
        self.calls.append((method, path))
        if method == "GET" and path == "/v1/models":
            request.send(200, {"object": "list", "data": [{"id": s, "object": "model"} for s in self.served()]})
            return
        route = next(((r, g, res, one, sub) for r, g, res, one, sub in _ROUTES if r.match(path)), None)
        if route is None:
            self.unexpected.append(f"{method} {path}")
            self._refuse(request, 404, "NotFound", f"the fake does not serve {method} {path}", method, path)
            return
        pattern, group, resource, one, sub = route
        match = pattern.match(path)
        namespace, name = match.group(1), (match.group(2) if one else None)
        verb = {"GET": "get" if one else "list", "PATCH": "patch"}[method]
        full = f"{resource}/{sub}" if sub else resource
        if self.identity is not None and not allowed(self.rules, verb, group, full, name):
            what = f'{full.split("/")[0]}{"." + group if group else ""} "{name}"' if name else full
            user = f"system:serviceaccount:{NAMESPACE}:{self.identity}"
            self._refuse(
                request,
                403,
                "Forbidden",
                f'{what} is forbidden: User "{user}" cannot {verb} resource "{full}" in API group "{group}" '
                f'in the namespace "{namespace}"',
                method,
                path,
                details={"name": name, "group": group, "kind": resource} if name else {"group": group},
            )
            return
        if namespace != NAMESPACE:
            self._refuse(request, 404, "NotFound", f'namespaces "{namespace}" not found', method, path)
            return
        if not one:
            self._list(request, resource)
            return
        with self.lock:
            obj = self.deployments.get(name)
            if obj is None:
                self._refuse(request, 404, "NotFound", f'deployments.apps "{name}" not found', method, path)
                return
            if method == "GET":
                rolling = obj["spec"]["replicas"] > 0 and not self._status(name).get("readyReplicas")
                if rolling and self.flaky_every:
                    self._rollout_reads += 1
                    if self._rollout_reads % self.flaky_every == 0:
                        self._flake(request, method, path)
                        return
                if name in self.race_scale_down and obj["spec"]["replicas"] > 0:
                    self.race_scale_down.discard(name)
                    obj["spec"]["replicas"] = 0
                request.send(200, self._scale(name) if sub else {**obj, "status": self._status(name)})
                return
            self._patch(request, obj, name, sub, method, path, strict="fieldValidation=Strict" in query.split("&"))

    def _flake(self, request, method: str, path: str) -> None:
        status = self.flaky_statuses[(self._rollout_reads // self.flaky_every - 1) % len(self.flaky_statuses)]
        if status == 429:
            # urllib3 (under the kubernetes client) itself retries a 429 that carries Retry-After, after 1 s.
            message = "Too many requests, please try again later."
            self._refuse(request, 429, "TooManyRequests", message, method, path, headers={"Retry-After": "1"})
        else:
            message = "Internal error occurred: etcdserver: leader changed"
            self._refuse(request, status, "InternalError", message, method, path)

    def _patch(self, request, obj: dict, name: str, sub: str | None, method: str, path: str, strict: bool) -> None:
        content_type = request.headers.get("Content-Type", "").split(";")[0]
        raw = request.rfile.read(int(request.headers.get("Content-Length", 0)))
        try:
            patch = json.loads(raw)
        except ValueError as e:
            self._refuse(request, 400, "BadRequest", f"error decoding patch: {e}", method, path)
            return
        if content_type not in _MERGE_PATCHES or not isinstance(patch, dict):
            message = (
                f"the body of the request was in an unknown format - accepted media types include: {_MERGE_PATCHES}"
            )
            if content_type == "application/json-patch+json":
                message = "json: cannot unmarshal object into Go value of type jsonpatch.Patch"
            self._refuse(
                request, 415 if content_type not in _MERGE_PATCHES else 400, "BadRequest", message, method, path
            )
            return
        errors = model_errors(patch, _PATCH_MODEL[sub])
        unknown = [e for e in errors if e.startswith("unknown field")]
        if len(unknown) < len(errors) or (unknown and strict):
            self._refuse(request, 400, "BadRequest", "strict decoding error: " + ", ".join(errors), method, path)
            return
        self.warnings += unknown
        replicas = (patch.get("spec") or {}).get("replicas")
        if replicas is not None:
            obj["spec"]["replicas"] = replicas
            self.scaled_at[name] = time.monotonic()
            self.scales.append((name, replicas))
        request.send(200, self._scale(name) if sub else {**obj, "status": self._status(name)})

    def _scale(self, name: str) -> dict:
        count = self.deployments[name]["spec"]["replicas"]
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"replicas": count},
            "status": {"replicas": count, "selector": f"app.kubernetes.io/instance={name}"},
        }

    def _list(self, request, resource: str) -> None:
        with self.lock:
            items = {"deployments": self.deployments, "persistentvolumeclaims": self.claims, "jobs": self.jobs}[
                resource
            ]
            body = [
                {**o, "status": self._status(n)} if resource == "deployments" else copy.deepcopy(o)
                for n, o in sorted(items.items())
            ]
        request.send(
            200,
            {
                "apiVersion": _LIST_VERSION[resource],
                "kind": f"{_KIND_OF[resource]}List",
                "metadata": {"resourceVersion": "1"},
                "items": body,
            },
        )
