"""Option scoring that keeps vLLM's prefix cache gives the numbers of plain prompt log-probabilities, on real vLLM.

Plain scoring (`score_options`, prompt_logprobs) never reads vLLM's prefix cache; the cached path
(`score_options_with_prefix_cache`, generation-time `logprob_token_ids`) does. Both are run on the questions of real
trials of both studies, rendered the pipeline's way, and compared option by option; vLLM's own counters show which
of the two read the cache.

The comparison runs on its own vLLM server computing in float32. In the registry's bfloat16, vLLM's CPU kernels are
not batch-invariant: measured here on the multi-turn study 1 questions (about 170 context tokens), the cached path
differed from the plain one by up to 0.47 nats per option, and plain scoring of the same prompts in one request by up
to 0.23 nats from one run to the next, so bf16 cannot tell a wrong token alignment from rounding. In float32 both
paths agree to the last printed digit and every difference left is a real one.
"""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from grace_dagster.llm import LLMClient, score_options
from grace_dagster.llm.cached_scoring import score_options_with_prefix_cache
from grace_dagster.llm.prompting import OptionScorer
from grace_dagster.registry import load_registry
from grace_dagster.serving.vllm import VllmServer
from grace_dagster.studies import STUDIES
from tests.conftest import VLLM_MODEL

SERVED = "SmolLM2-135M-Instruct"
END_OF_TURN = "<|im_end|>\n"  # SmolLM2's ChatML: each option is the assistant's whole reply
# Measured on vLLM 0.32 (CPU, float32, eager): identical to the last bit. A bound, not zero, so that a kernel that is
# not batch-invariant fails only on a real difference.
MAX_LOGPROB_DIFFERENCE = 1e-3


def _cached_tokens(base_url: str) -> tuple[float, float]:
    """vLLM's counters: prompt tokens received, and those read from the prefix cache."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))

    return total("vllm:prompt_tokens_total"), total("vllm:prompt_tokens_cached_total")


def _questions() -> list:
    study1 = next(STUDIES["study1"].load().itertuples(index=False))
    study2 = list(STUDIES["study2"].load().head(3).itertuples(index=False))
    return [
        *STUDIES["study1"].exp2_questions(study1),
        *(q for t in study2 for q in STUDIES["study2"].exp2_questions(t)),
    ]


@pytest.fixture(scope="module")
def float32_vllm(tmp_path_factory):
    """The registry's local vLLM entry computing in float32 (`--dtype` given again: the last one counts)."""
    server = VllmServer(
        load_registry().get(VLLM_MODEL),
        log_dir=tmp_path_factory.mktemp("vllm-float32"),
        extra_args=["--dtype", "float32"],
    ).start()
    yield server
    server.stop()


@pytest.mark.slow
def test_prefix_cached_scoring_gives_the_prompt_logprob_numbers_and_reads_the_cache(float32_vllm):
    url = float32_vllm.base_url
    questions = _questions()

    async def score(method):
        async with LLMClient(url, SERVED, max_concurrency=1) as client:
            results = []
            for question in questions:
                context = await client.render_chat(question.messages)
                options = [option + END_OF_TURN for option in question.options]
                results.append(await method(client, context, options, add_special_tokens=False))
            return results

    async def the_pipeline_way():
        """As the asset scores: the chat rendered and tokenized once by the server, sent as token ids."""
        async with LLMClient(url, SERVED, max_concurrency=1) as client:
            scorer = OptionScorer(client, "instruct", prefix_cache=True)
            return [await scorer.score(question.messages, question.options) for question in questions]

    before = _cached_tokens(url)
    plain = asyncio.run(score(score_options))
    middle = _cached_tokens(url)
    cached = asyncio.run(score(score_options_with_prefix_cache))
    after = _cached_tokens(url)
    pipeline = asyncio.run(the_pipeline_way())

    for name, other in [("prefix-cached", cached), ("prefix-cached from token ids", pipeline)]:
        worst = 0.0
        for question, p, c in zip(questions, plain, other):
            assert p.n_tokens == c.n_tokens, f"{question.key}: the same option tokens"
            worst = max(worst, *(abs(a - b) for a, b in zip(p.logprobs, c.logprobs)))
        print(f"\n{len(questions)} questions: max |logprob difference| plain vs {name} {worst:.2e}")
        assert worst <= MAX_LOGPROB_DIFFERENCE
    assert middle[1] - before[1] == 0, "prompt log-probability requests never read the prefix cache"
    assert after[1] - middle[1] > 0, "the prefix-cached path reads the context from the cache"
