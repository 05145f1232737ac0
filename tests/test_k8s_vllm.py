"""The k8s endpoint mode end to end: a run scales the model's Deployment through the Kubernetes API, waits for its
rollout, and materializes a partition through vLLM.

The Kubernetes API is the tests' FAKE (tests/k8s_fake.py: no API server can run here), holding the manifests
rendered for a registry with one more cluster model; the model's Service URL points at the REAL vLLM server of the
test session, which serves that model's weights (SmolLM2 on the CPU build), so every scoring request is real vLLM's.
"""

from __future__ import annotations

import pandas as pd
import pytest
import yaml
from dagster import DagsterInstance

from grace_dagster.assets import exp2_probabilities
from grace_dagster.k8s import cluster as cluster_module
from grace_dagster.k8s.conventions import deployment_name
from grace_dagster.k8s.manifests import to_files, write_files
from grace_dagster.k8s.render import render_objects
from grace_dagster.registry import load_registry
from grace_dagster.registry.loader import DEFAULT_REGISTRY_PATH
from grace_dagster.resources import LLMEndpoints
from tests import pipeline
from tests.k8s_fake import FakeCluster

MODEL = "smollm2-on-cluster"
ENTRY = {
    "slug": MODEL,
    "served_name": "SmolLM2-135M-Instruct",
    "kind": "instruct",
    "roles": ["participant"],
    "weights": {"source": "huggingface", "repo": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "main"},
    "serving": {
        "backend": "vllm",
        "context_length": 2048,
        "args": ["--dtype", "bfloat16"],
        "gpu_products": ["NVIDIA-A10"],
    },
    "resources": {"gpus": 1, "cpu": 6, "memory_gib": 12, "storage_gib": 5},
    "nrp_exceptions": [
        {"rule": "deployment-lifetime-over-2-weeks", "reason": "Scaled to zero between runs; the object stays."}
    ],
}


@pytest.mark.slow
def test_a_run_in_k8s_mode_scales_the_deployment_waits_and_scores_through_vllm(tmp_path, vllm_server, monkeypatch):
    monkeypatch.setattr(cluster_module, "RETRY_BASE_DELAY", 0.01)
    monkeypatch.setattr(cluster_module, "RETRY_MAX_DELAY", 0.02)
    raw = yaml.safe_load(DEFAULT_REGISTRY_PATH.read_text())
    raw["models"].append(ENTRY)
    registry_path = tmp_path / "models.yaml"
    registry_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    manifests = tmp_path / "k8s"
    write_files(to_files(render_objects(load_registry(registry_path))), manifests)

    with FakeCluster(ready_delay=0.5, manifests=manifests) as fake:
        name = deployment_name(MODEL)
        assert fake.replicas(name) == 0
        instance = DagsterInstance.ephemeral()
        res = pipeline.resources(tmp_path, trial_limit=2)
        res["llm"] = LLMEndpoints(
            mode="k8s",
            api_host=fake.url,
            registry_path=str(registry_path),
            base_urls={MODEL: vllm_server.base_url},  # the model's Service, reached from here
            poll_interval=0.05,
            ready_timeout=60,
        )
        pipeline.prepare(instance, res, [MODEL], studies=("study2",))
        monkeypatch.setenv("GRACE_USER", "alice")
        result = pipeline.run(instance, res, exp2_probabilities.key, MODEL, "study2")
        assert result.success, [e.step_failure_data.error.message for e in result.all_events if e.is_step_failure]
        assert fake.scales == [(name, 1)], "scaled once from 0 to 1 through deployments/scale"
        assert fake.replicas(name) == 1, "left up for the next run; the idle sensor scales it down"
        assert not fake.unexpected and not [call for code, call in fake.refused if code == 403]
    meta = pipeline.metadata(result, exp2_probabilities.key)
    assert all(e.passed for e in result.get_asset_check_evaluations() if e.severity.value == "ERROR")
    table = pd.read_parquet(tmp_path / "data" / "exp2" / "probabilities" / MODEL / "study2.parquet")
    # One request per question through vLLM: the utterance question of each trial (8 options) and the
    # literal-meaning questions of an informative trial.
    questions = table.groupby(["trial_id", "question"]).ngroups
    assert "0.32" in meta["server_version"] and meta["requests_made"] == meta["distinct_questions"] == questions
    utterances = table[table.question == "utterance"]
    assert len(utterances.drop_duplicates(["trial_id", "option"])) == 2 * 8
