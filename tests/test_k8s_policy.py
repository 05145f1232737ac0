"""The NRP policy: the committed manifests pass with zero violations, and each rule of the audit refuses a
manifest that breaks it, with a message that names the object, the rule and the fix."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from grace_dagster.cli import main
from grace_dagster.k8s.conventions import NAMESPACE, deployment_name
from grace_dagster.k8s.manifests import dump, load_manifests
from grace_dagster.k8s.policy import RULES, check_objects, required_exceptions
from grace_dagster.k8s.quantity import QuantityError, format_cpu, format_gib, parse_quantity
from grace_dagster.k8s.render import served_models
from grace_dagster.k8s.schema import validate_object
from grace_dagster.registry import DEFAULT_REGISTRY_PATH, load_registry

ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = ROOT / "k8s"
REGISTRY = load_registry()
COMMITTED = [m.obj for m in load_manifests(K8S_DIR)]


def _fresh() -> list[dict]:
    return copy.deepcopy(COMMITTED)


def _get(objects, kind, name) -> dict:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def _server(objects, slug) -> dict:
    return _get(objects, "Deployment", deployment_name(slug))["spec"]["template"]["spec"]["containers"][0]


def _registry_without(tmp_path, slug, rule):
    raw = yaml.safe_load(DEFAULT_REGISTRY_PATH.read_text())
    entry = next(m for m in raw["models"] if m["slug"] == slug)
    entry["nrp_exceptions"] = [e for e in entry.get("nrp_exceptions", []) if e["rule"] != rule]
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _job(name, command, requests=None, limits=None, mounts=(), volumes=()) -> dict:
    """A Job as the pipeline would run one: Guaranteed QoS unless the case says otherwise."""
    requests = requests or {"cpu": "2", "memory": "4Gi"}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": "ghcr.io/example/grace-dagster:0.1.0",
                            "command": command,
                            "resources": {"requests": requests, "limits": dict(limits or requests)},
                            "volumeMounts": list(mounts),
                        }
                    ],
                    "volumes": list(volumes),
                }
            },
        },
    }


def _pod(name, deadline) -> dict:
    """An interactive pod like deploy/archive-pod.yaml, with the given activeDeadlineSeconds (None: unset)."""
    resources = {"cpu": "1", "memory": "2Gi"}
    spec: dict = {
        "restartPolicy": "Never",
        "containers": [
            {
                "name": "shell",
                "image": "ghcr.io/example/grace-dagster:0.1.0",
                "command": ["sleep", "21600"],
                "resources": {"requests": resources, "limits": dict(resources)},
            }
        ],
    }
    if deadline is not None:
        spec["activeDeadlineSeconds"] = deadline
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}


PYTHON_SLEEP_LOOP = "from grace_dagster.cli import main\nimport time\nmain(['run'])\nwhile True:\n    time.sleep(60)\n"

OUTPUT_VOLUME = {"name": "output", "persistentVolumeClaim": {"claimName": "grace-output"}}
INPUT_VOLUME = {"name": "input", "persistentVolumeClaim": {"claimName": "grace-input"}}


def test_a_well_formed_job_passes_schema_and_policy():
    # The control for the Job cases below: what they refuse is their mutation, not the helper.
    job = _job(
        "experiment",
        ["python", "-m", "grace_dagster.cli", "run"],
        mounts=[{"name": "output", "mountPath": "/data"}, {"name": "input", "mountPath": "/in", "readOnly": True}],
        volumes=[OUTPUT_VOLUME, INPUT_VOLUME],
    )
    assert validate_object(job) == []
    assert check_objects(_fresh() + [job], REGISTRY) == []


# --- the committed manifests ---------------------------------------------------------------------------------------


def test_committed_manifests_have_zero_violations():
    assert check_objects(COMMITTED, REGISTRY) == []


def test_each_deployment_passes_on_its_own_as_the_admission_check_sees_it():
    for model in served_models(REGISTRY):
        deployment = _get(COMMITTED, "Deployment", deployment_name(model.slug))
        assert check_objects([deployment], REGISTRY) == []
        scaled = copy.deepcopy(deployment)
        scaled["spec"]["replicas"] = 1
        assert check_objects([scaled], REGISTRY) == []


def test_exceptions_needed_are_exactly_those_the_registry_records():
    needed = {(n.model, n.rule) for n in required_exceptions(COMMITTED)}
    recorded = {(m.slug, e.rule) for m in REGISTRY.models for e in m.nrp_exceptions}
    assert needed == recorded
    assert ("llama-3.1-70b", "gpus-over-2") in needed
    # Right-sized from vLLM's documented needs, no model server asks for more than 32Gi of host memory any more.
    assert not any(rule == "memory-over-32gi" for _, rule in needed)


# --- mutations: each refused with its own message -------------------------------------------------------------------


@dataclass
class Case:
    id: str
    mutate: Callable  # (objects, tmp_path) -> (objects, registry)
    rule: str
    obj: str
    message: str  # a regex over the violation's problem text


def _m(fn):
    """A mutation of the objects only; the registry stays the shipped one."""

    def apply(objects, tmp_path):
        return fn(objects) or objects, REGISTRY

    return apply


def _statefulset(objects):
    d = _get(objects, "Deployment", "vllm-gemma-2-9b")
    d["kind"] = "StatefulSet"
    d["spec"]["serviceName"] = "vllm-gemma-2-9b"
    del d["spec"]["strategy"]


def _limits(slug, resource, value, container="containers"):
    def mutate(objects):
        pod = _get(objects, "Deployment", deployment_name(slug))["spec"]["template"]["spec"]
        pod[container][0]["resources"]["limits"][resource] = value

    return mutate


def _both(slug, resource, value):
    def mutate(objects):
        res = _server(objects, slug)["resources"]
        res["requests"][resource] = res["limits"][resource] = value

    return mutate


def _no_limits(objects):
    del _server(objects, "gemma-2-2b")["resources"]["limits"]


def _storage_class(name, storage_class, modes=None):
    def mutate(objects):
        spec = _get(objects, "PersistentVolumeClaim", name)["spec"]
        if storage_class is None:
            del spec["storageClassName"]
        else:
            spec["storageClassName"] = storage_class
        if modes:
            spec["accessModes"] = modes

    return mutate


def _add(*new):
    def mutate(objects):
        return objects + [copy.deepcopy(o) for o in new]

    return mutate


def _without_lifetime_exception(objects, tmp_path):
    return objects, load_registry(_registry_without(tmp_path, "gemma-2-9b", "deployment-lifetime-over-2-weeks"))


def _anonymous_deployment(objects):
    d = copy.deepcopy(_get(objects, "Deployment", "vllm-gemma-2-2b"))
    d["metadata"] = {"name": "scratch", "namespace": NAMESPACE}
    d["spec"]["selector"]["matchLabels"] = {"app": "scratch"}
    d["spec"]["template"]["metadata"]["labels"] = {"app": "scratch"}
    return objects + [d]


def _secret_value(objects):
    _get(objects, "Secret", "hf-token")["stringData"]["HF_TOKEN"] = "hf_not_a_real_token"


def _at_scale(objects):
    d = _get(objects, "Deployment", "vllm-gemma-2-2b")
    d["spec"]["replicas"] = 150
    d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "4500m"


def _too_many_claims(objects):
    output = _get(objects, "PersistentVolumeClaim", "grace-output")
    extra = []
    for i in range(21 - sum(1 for o in objects if o["kind"] == "PersistentVolumeClaim")):
        claim = copy.deepcopy(output)
        claim["metadata"]["name"] = f"scratch-{i}"
        extra.append(claim)
    return objects + extra


def _unknown_model(objects):
    d = _get(objects, "Deployment", "vllm-gemma-2-2b")
    d["metadata"]["labels"]["grace/model"] = "gemma-2-2b-typo"
    d["spec"]["template"]["metadata"]["labels"]["grace/model"] = "gemma-2-2b-typo"


CASES = [
    Case("statefulset model server", _m(_statefulset), "no-statefulset", "StatefulSet/vllm-gemma-2-9b",
         r"is a StatefulSet; the NRP audit requires long-running pods to be Deployments"),
    Case("limits at 2x requests", _m(_limits("gemma-2-9b", "cpu", "12")), "limits-within-20pct",
         "Deployment/vllm-gemma-2-9b", r"container 'vllm' cpu limit 12 is 200% of its request 6"),
    Case("init container limits at 2x requests", _m(_limits("gemma-2-9b", "memory", "8Gi", "initContainers")),
         "limits-within-20pct", "Deployment/vllm-gemma-2-9b",
         r"init container 'fetch-weights' memory limit 8Gi is 200% of its request 4Gi"),
    Case("limits missing", _m(_no_limits), "resources-set", "Deployment/vllm-gemma-2-2b",
         r"container 'vllm' requests cpu 6 but sets no limit \(unbounded\)"),
    Case("job limits differ from requests",
         _m(_add(_job("extract", ["python", "extract.py"], limits={"cpu": "2200m", "memory": "4Gi"}))),
         "job-guaranteed-qos", "Job/extract", r"cpu limit 2\.2 differs from its request 2; Jobs run with Guaranteed"),
    Case("job command ends in sleep infinity",
         _m(_add(_job("debug", ["sh", "-c", "python -m grace_dagster.cli run && sleep infinity"]))),
         "job-sleep", "Job/debug", r"ends its command with 'sleep infinity'"),
    Case("job argv is a bare sleep", _m(_add(_job("wait", ["sleep", "3600"]))), "job-sleep", "Job/wait",
         r"ends its command with 'sleep 3600'"),
    Case("4 GPUs without an exception", _m(_both("gemma-2-2b", "nvidia.com/gpu", "4")), "gpus-over-2",
         "Deployment/vllm-gemma-2-2b", r"4 GPUs per pod \(allowed: 2\).*model 'gemma-2-2b' has no gpus-over-2"),
    Case("160Gi memory without an exception", _m(_both("gemma-2-9b", "memory", "160Gi")), "memory-over-32gi",
         "Deployment/vllm-gemma-2-9b", r"160Gi of memory per pod \(allowed: 32Gi\)"),
    Case("24 CPUs without an exception", _m(_both("gemma-2-9b", "cpu", "24")), "cpu-over-16",
         "Deployment/vllm-gemma-2-9b", r"24 CPUs per pod \(allowed: 16\)"),
    Case("deployment without the lifetime exception", _without_lifetime_exception,
         "deployment-lifetime-over-2-weeks", "Deployment/vllm-gemma-2-9b",
         r"declared grace/lifetime: long-lived.*model 'gemma-2-9b' has no deployment-lifetime-over-2-weeks"),
    Case("deployment with no lifetime and no model", _m(_anonymous_deployment), "deployment-lifetime-over-2-weeks",
         "Deployment/scratch", r"no lifetime declared.*names no registry model"),
    Case("pvc on rook-cephfs-ucsd", _m(_storage_class("grace-output", "rook-cephfs-ucsd")), "storage-class",
         "PersistentVolumeClaim/grace-output", r"uses storage class rook-cephfs-ucsd: the NRP audit forbids"),
    Case("pvc without a storage class", _m(_storage_class("grace-input", None)), "storage-class",
         "PersistentVolumeClaim/grace-input", r"no storageClassName \(the cluster default\)"),
    Case("pip install into a cephfs mount",
         _m(_add(_job("setup", ["sh", "-c", "pip install --target /data/lib pandas && python run.py"],
                      mounts=[{"name": "output", "mountPath": "/data"}], volumes=[OUTPUT_VOLUME]))),
         "no-runtime-install", "Job/setup",
         r"'pip install' at run time in a pod that mounts CephFS \(claim 'grace-output' \(rook-cephfs\) at /data\)"),
    Case("weights on cephfs instead of rbd",
         _m(_storage_class("weights-gemma-2-9b", "rook-cephfs", ["ReadWriteMany"])), "weights-on-rbd",
         "PersistentVolumeClaim/weights-gemma-2-9b", r"holds model weights on rook-cephfs"),
    Case("server reads weights from a cephfs claim",
         _m(_storage_class("weights-gemma-2-9b", "rook-cephfs", ["ReadWriteMany"])), "weights-on-rbd",
         "Deployment/vllm-gemma-2-9b",
         r"container 'vllm' reads model weights at /models from claim 'weights-gemma-2-9b' on rook-cephfs"),
    Case("rbd volume shared between nodes", _m(_storage_class("weights-gemma-2-2b", "rook-ceph-block",
                                                             ["ReadWriteMany"])),
         "rbd-access-mode", "PersistentVolumeClaim/weights-gemma-2-2b", r"a block volume attaches to one node"),
    Case("fresh read-only-many cephfs claim", _m(_storage_class("grace-input", "rook-cephfs", ["ReadOnlyMany"])),
         "cephfs-access-mode", "PersistentVolumeClaim/grace-input", r"ceph-csi refuses to provision"),
    Case("input mounted writable",
         _m(_add(_job("reader", ["python", "run.py"], mounts=[{"name": "input", "mountPath": "/in"}],
                      volumes=[INPUT_VOLUME]))),
         "input-read-only", "Job/reader", r"mounts the input claim 'grace-input' at /in writable"),
    Case("secret with a value", _m(_secret_value), "secret-without-values", "Secret/hf-token",
         r"carries values for HF_TOKEN"),
    Case("150 replicas without guaranteed qos", _m(_at_scale), "guaranteed-qos-at-scale",
         "Deployment/vllm-gemma-2-2b", r"runs 150 pods and container 'vllm' cpu limit 4\.5 differs"),
    Case("more claims than the quota", _m(_too_many_claims), "quota", "ResourceQuota/grace-quota",
         r"claim 21 PersistentVolumeClaims; the quota allows 20"),
    Case("model label not in the registry", _m(_unknown_model), "unknown-model", "Deployment/vllm-gemma-2-2b",
         r"labelled grace/model: gemma-2-2b-typo, which is not in the registry"),
    # The policy's former blind spots (issue 16): installers other than pip/conda/apt, a Python sleep loop, bare pods.
    Case("uv sync at run time", _m(_add(_job("uv", ["sh", "-c", "uv sync --frozen && uv run grace run"]))),
         "no-runtime-install", "Job/uv", r"runs 'uv sync' at run time"),
    Case("uvx at run time", _m(_add(_job("uvx", ["uvx", "ruff", "check", "."]))),
         "no-runtime-install", "Job/uvx", r"runs 'uvx ruff' at run time"),
    Case("pipx install at run time", _m(_add(_job("pipx", ["sh", "-c", "pipx install grace-dagster && grace run"]))),
         "no-runtime-install", "Job/pipx", r"runs 'pipx install' at run time"),
    Case("poetry install at run time", _m(_add(_job("poetry", ["bash", "-c", "poetry install --no-root; make run"]))),
         "no-runtime-install", "Job/poetry", r"runs 'poetry install' at run time"),
    Case("npm install at run time",
         _m(_add(_job("npm", ["sh", "-c", "npm install -g @mermaid-js/mermaid-cli && mmdc -i plan.mmd"]))),
         "no-runtime-install", "Job/npm", r"runs 'npm install' at run time"),
    Case("conda install at run time",
         _m(_add(_job("conda", ["bash", "-lc", "conda install -y -c conda-forge r-lme4 && Rscript fit.R"]))),
         "no-runtime-install", "Job/conda", r"runs 'conda install' at run time"),
    Case("R install.packages at run time",
         _m(_add(_job("rscript", ["Rscript", "-e", "install.packages('lme4'); source('analysis.R')"]))),
         "no-runtime-install", "Job/rscript", r"runs 'install\.packages\(' at run time"),
    Case("job python script ends in a sleep loop", _m(_add(_job("keepalive", ["python", "-c", PYTHON_SLEEP_LOOP]))),
         "job-sleep", "Job/keepalive", r"ends its Python script with 'while True: time\.sleep\(60\)'"),
    Case("bare pod without a deadline", _m(_add(_pod("debug-shell", None))), "pod-deadline", "Pod/debug-shell",
         r"is a bare Pod without spec\.activeDeadlineSeconds; the NRP allows interactive pods at most 6 hours"),
    Case("bare pod living a day", _m(_add(_pod("notebook", 86400))), "pod-deadline", "Pod/notebook",
         r"is a bare Pod with spec\.activeDeadlineSeconds 86400"),
]  # fmt: skip


def _refusal(case: Case, tmp_path) -> str:
    objects, registry = case.mutate(_fresh(), tmp_path)
    violations = check_objects(objects, registry)
    hits = [v for v in violations if v.rule == case.rule and v.object == case.obj]
    assert hits, f"expected [{case.rule}] on {case.obj}; got:\n" + "\n".join(map(str, violations))
    matching = [v for v in hits if re.search(case.message, v.problem)]
    assert matching, f"no {case.rule} message matches {case.message!r}:\n" + "\n".join(map(str, hits))
    text = str(matching[0])
    assert text.startswith(f"{case.obj}: [{case.rule}] ") and ". Fix: " in text
    return matching[0].problem


def test_the_must_show_mutations_are_all_there():
    assert len(CASES) >= 10
    must_show = {
        "statefulset model server", "limits at 2x requests", "job limits differ from requests",
        "job command ends in sleep infinity", "4 GPUs without an exception", "160Gi memory without an exception",
        "pvc on rook-cephfs-ucsd", "pip install into a cephfs mount", "weights on cephfs instead of rbd",
        "deployment without the lifetime exception",
    }  # fmt: skip
    assert must_show <= {c.id for c in CASES}
    assert {c.rule for c in CASES} == set(RULES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_mutated_manifest_is_refused(case, tmp_path):
    _refusal(case, tmp_path)


def test_each_refusal_has_its_own_message(tmp_path):
    messages = [_refusal(case, tmp_path) for case in CASES]
    assert len(set(messages)) == len(messages)


def test_a_job_limit_within_20_percent_is_still_refused_only_for_guaranteed_qos():
    job = _job("extract", ["python", "extract.py"], limits={"cpu": "2200m", "memory": "4Gi"})
    assert [v.rule for v in check_objects([job], REGISTRY)] == ["job-guaranteed-qos"]


def test_a_single_mutated_deployment_is_refused_before_scale_up():
    deployment = copy.deepcopy(_get(COMMITTED, "Deployment", "vllm-gemma-2-2b"))
    res = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]
    res["requests"]["nvidia.com/gpu"] = res["limits"]["nvidia.com/gpu"] = "4"
    (violation,) = check_objects([deployment], REGISTRY)
    assert violation.rule == "gpus-over-2" and violation.object == "Deployment/vllm-gemma-2-2b"


@pytest.mark.parametrize(
    "command,sleeps",
    [
        (["sh", "-c", "python run.py; sleep 10"], True),
        (["bash", "-lc", "while true; do sleep 60; done"], True),
        (["sleep", "infinity"], True),
        (["sh", "-c", "python run.py\ntail -f /dev/null\n"], True),
        (["sh", "-c", "sleep infinity & python run.py"], True),
        (["python", "run.py"], False),
        (["sh", "-c", "sleep 5 && python run.py"], False),
        (["python3", "-u", "-c", "import time\nrun()\ntime.sleep(3600)"], True),
        (["sh", "-c", "python -c 'import time\nwhile 1:\n    time.sleep(5)'"], True),
        (["python", "-c", "import time\nwhile True:\n    if poll():\n        break\n    time.sleep(5)"], False),
        (["python", "-c", "import time; time.sleep(5); run()"], False),
    ],
)
def test_job_sleep_detection(command, sleeps):
    rules = [v.rule for v in check_objects([_job("j", command)], REGISTRY)]
    assert ("job-sleep" in rules) is sleeps


def test_interactive_pods_within_six_hours_and_jobs_without_installs_pass():
    # The controls for the new cases: a pod with a deadline, and commands that only look like installers.
    pods = [_pod("shell", 6 * 3600), _pod("short", 600)]
    jobs = [
        _job("r", ["Rscript", "-e", "source('analysis.R')"]),
        _job("node", ["sh", "-c", "npm run build && node dist/report.js"]),
        _job("uv", ["uv", "run", "--frozen", "--no-sync", "grace", "run"]),
        _job("conda", ["bash", "-lc", "conda activate grace && python run.py"]),
    ]
    assert check_objects(pods + jobs, REGISTRY) == []


def test_quantities_are_exact():
    assert parse_quantity("500m") == Decimal("0.5")
    assert parse_quantity("32Gi") == 32 * 2**30
    assert parse_quantity("1e3") == 1000 and parse_quantity("1E") == 10**18
    assert parse_quantity(16) == 16 and parse_quantity("2.5") == Decimal("2.5")
    with pytest.raises(QuantityError):
        parse_quantity("12GB")
    assert (format_cpu(0.5), format_cpu(4.0), format_gib(1.5), format_gib(64)) == ("500m", "4", "1536Mi", "64Gi")


# --- the commands ----------------------------------------------------------------------------------------------------


def _mutated_dir(tmp_path) -> Path:
    out = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, out)
    path = out / "models" / "gemma-2-9b.yaml"
    docs = list(yaml.safe_load_all(path.read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "12"
    path.write_text("---\n".join(dump(d) for d in docs))
    return out


def test_lint_passes_the_committed_manifests_and_fails_a_violation(tmp_path, capsys, monkeypatch):
    assert main(["k8s", "lint", str(K8S_DIR)]) == 0
    assert "0 problem(s)" in capsys.readouterr().out
    monkeypatch.chdir(ROOT)
    assert main(["k8s", "lint"]) == 0  # k8s/ by default
    capsys.readouterr()

    out = _mutated_dir(tmp_path)
    assert main(["k8s", "lint", str(out)]) == 1
    printed = capsys.readouterr()
    assert (
        f"{out / 'models' / 'gemma-2-9b.yaml'}: Deployment/vllm-gemma-2-9b: [limits-within-20pct] "
        "container 'vllm' cpu limit 12 is 200% of its request 6" in printed.out
    )
    assert "1 problem(s)" in printed.err


def test_lint_exit_codes_through_the_real_command(tmp_path):
    def lint(directory):
        return subprocess.run(
            [sys.executable, "-m", "grace_dagster.cli", "k8s", "lint", str(directory)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    ok = lint(K8S_DIR)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = lint(_mutated_dir(tmp_path))
    assert bad.returncode == 1 and "[limits-within-20pct]" in bad.stdout


def test_lint_refuses_unreadable_input(tmp_path, capsys):
    assert main(["k8s", "lint", str(tmp_path)]) == 2
    (tmp_path / "broken.yaml").write_text("kind: [\n")
    assert main(["k8s", "lint", str(tmp_path)]) == 2
    assert "broken.yaml: not valid YAML" in capsys.readouterr().err


def test_exceptions_prints_every_request_with_its_reason(capsys):
    assert main(["k8s", "exceptions"]) == 0
    out = capsys.readouterr().out
    assert "Deployment/vllm-llama-3-1-70b: gpus-over-2: 4 GPUs per pod (allowed: 2)" in out
    assert "Deployment/vllm-gpt-oss-120b: deployment-lifetime-over-2-weeks" in out
    for model in served_models(REGISTRY):
        for e in model.nrp_exceptions:
            assert e.reason in out
    count = sum(len(m.nrp_exceptions) for m in served_models(REGISTRY))
    assert f"{count} exception(s) for {len(served_models(REGISTRY))} model(s)." in out


def test_exceptions_fails_when_the_registry_lacks_one(tmp_path, capsys):
    path = _registry_without(tmp_path, "llama-3.1-70b", "gpus-over-2")
    assert main(["k8s", "exceptions", "--registry", str(path)]) == 1
    printed = capsys.readouterr()
    assert "why: MISSING" in printed.out
    assert "Deployment/vllm-llama-3-1-70b needs gpus-over-2 but model 'llama-3.1-70b' records no such" in printed.err
