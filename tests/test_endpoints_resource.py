"""LLMEndpoints in local mode: a real server per model for the run, none left after it."""

import asyncio
import os

import pytest
from dagster import DagsterInstance, asset, materialize

from grace_dagster.resources.endpoints import Endpoint, EndpointError, LLMEndpoints


@pytest.mark.slow
def test_local_endpoint_serves_during_the_run_and_is_stopped_after(tmp_path):
    seen: dict[str, object] = {}

    @asset
    def probe(llm: LLMEndpoints) -> None:
        endpoint = llm.endpoint("smollm2-135m")
        assert llm.endpoint("smollm2-135m").base_url == endpoint.base_url, "one server per model per run"
        server = llm._servers["smollm2-135m"]
        seen["pid"] = server.process.pid

        async def ask():
            async with llm.client("smollm2-135m") as client:
                return (await client.models()).data[0].id

        seen["model"] = asyncio.run(ask())

    result = materialize(
        [probe], resources={"llm": LLMEndpoints(log_dir=str(tmp_path))}, instance=DagsterInstance.ephemeral()
    )
    assert result.success
    assert seen["model"] == "SmolLM2-135M-Instruct"
    with pytest.raises(ProcessLookupError):
        os.kill(seen["pid"], 0)


def test_cluster_model_in_local_mode_is_refused_with_advice():
    with pytest.raises(EndpointError, match="gemma-2-9b.*served by vllm on the cluster.*k8s endpoint mode"):
        LLMEndpoints().endpoint("gemma-2-9b")


def test_external_model_needs_its_api_key_from_the_environment(monkeypatch):
    monkeypatch.delenv("DEEPSEEK_API_KEY", raising=False)
    with pytest.raises(EndpointError, match="set the environment variable DEEPSEEK_API_KEY"):
        LLMEndpoints().endpoint("deepseek-chat-api")
    monkeypatch.setenv("DEEPSEEK_API_KEY", "sk-test-secret")
    endpoint = LLMEndpoints().endpoint("deepseek-chat-api")
    assert endpoint.base_url == "https://api.deepseek.com/v1" and endpoint.api_key == "sk-test-secret"
    assert "sk-test-secret" not in repr(endpoint), "the key never appears in logs or reprs"


def test_client_concurrency_comes_from_the_registry_unless_the_resource_overrides_it():
    registry = LLMEndpoints().registry()

    def concurrency(resource: LLMEndpoints, slug: str) -> int:
        client = resource.client_for(Endpoint(registry.get(slug), "http://127.0.0.1:9"))
        asyncio.run(client.aclose())
        return client._semaphore._value

    assert concurrency(LLMEndpoints(), "smollm2-135m") == 4, "as many as the embedded server decodes together"
    assert concurrency(LLMEndpoints(), "smollm2-135m-vllm") == 64, "enough in flight to keep vLLM busy"
    assert concurrency(LLMEndpoints(max_concurrency=8), "smollm2-135m-vllm") == 8


def test_local_vllm_without_its_environment_names_the_way_out(tmp_path):
    with pytest.raises(EndpointError, match=r"no vLLM environment at .*run `make vllm`"):
        LLMEndpoints(vllm_python=str(tmp_path / "missing" / "python")).endpoint("smollm2-135m-vllm")
