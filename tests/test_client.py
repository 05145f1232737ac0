"""The async client: exactly one result per request through a server crash, vLLM-shaped bodies parsed, retries only
where a retry can help."""

from __future__ import annotations

import asyncio
import copy
import json
import math
import time

import httpx
import pytest

from grace_dagster.llm import (
    LLMClient,
    LLMRequestError,
    LLMUnavailableError,
    RetryPolicy,
    ScoringError,
    score_options,
)
from grace_dagster.serving.process import EmbeddedServer
from tests import pipeline

FAST_RETRY = RetryPolicy(attempts=40, initial_backoff=0.2, max_backoff=1.0)


@pytest.mark.slow
def test_client_survives_server_kill_and_restart_mid_batch(tmp_path):
    """50 requests; the real server process is SIGKILLed after a few finish and restarted on the same port."""
    server = EmbeddedServer("smollm2-135m", log_dir=tmp_path).start()
    port = server.port
    restarted: list[EmbeddedServer] = []
    done: list[int] = []

    async def main():
        async with LLMClient(server.base_url, "SmolLM2-135M-Instruct", max_concurrency=4, retry=FAST_RETRY) as client:

            async def one(i: int):
                prompt = f"Item {i}: the number after {i} is"
                response = await client.complete(prompt, max_tokens=4, temperature=0, echo=True)
                done.append(i)
                return i, response

            async def crash_and_restart():
                while len(done) < 5:
                    await asyncio.sleep(0.02)
                killed_after = len(done)
                server.kill()
                await asyncio.sleep(1.0)  # requests fail with connection errors meanwhile and are retried
                restarted.append(EmbeddedServer("smollm2-135m", port=port, log_dir=tmp_path))
                await asyncio.to_thread(restarted[0].start)
                return killed_after

            results, killed_after = await asyncio.gather(
                asyncio.gather(*(one(i) for i in range(50))), crash_and_restart()
            )
            served = await asyncio.to_thread(_completions_served, server.base_url)
            return results, killed_after, client.stats, int(served)

    try:
        results, killed_after, stats, served_after = asyncio.run(main())
    finally:
        for s in [server, *restarted]:
            s.stop()
    assert 5 <= killed_after < 50, "the kill happened in the middle of the batch"
    # Each result answers its own request (the server echoes the prompt it was sent), none is an error or empty.
    assert all(r.choices[0].text.startswith(f"Item {i}: the number after {i} is") for i, r in results)
    assert all(len(r.choices[0].text) > len(f"Item {i}: the number after {i} is") for i, r in results)
    assert stats.retries > 0, "requests in flight at the kill were retried"
    assert stats.requests == 50
    # The restarted server answered each request whose result had not arrived before the kill once: nothing lost,
    # nothing asked twice. (Up to 4, the requests in flight, may have been answered by the dying server with the
    # reply still arriving after the count was taken.)
    assert 50 - killed_after - 4 <= served_after <= 50 - killed_after
    print(f"\nkilled after {killed_after} of 50 results; {stats.retries} retries; 50/50 results, no duplicates")


SERVED = "SmolLM2-135M-Instruct"
COUNTING = "Counting: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # a raw completion that runs to max_tokens


def _completions_served(url: str) -> float:
    return pipeline.server_counter(url, "grace_server_requests_total", code="200", route="/v1/completions")


def _engine_counters(url: str) -> tuple[float, float]:
    """Tokens the engine generated, and completions dropped unserved because their client had gone."""
    return (
        pipeline.server_counter(url, "grace_server_generation_tokens_total"),
        pipeline.server_counter(url, "grace_server_abandoned_total", route="/v1/completions"),
    )


def _timed_generation(url: str, max_tokens: int, together: int = 1) -> float:
    """Seconds the server takes for `together` COUNTING generations of exactly `max_tokens` tokens sent at once (with
    `together` equal to the server's slots: one full batch)."""
    body = {"model": SERVED, "prompt": COUNTING, "max_tokens": max_tokens, "temperature": 0}

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(together)))

    start = time.monotonic()
    replies = asyncio.run(main())
    assert [r.json()["usage"]["completion_tokens"] for r in replies] == [max_tokens] * together, (
        "the counting prompt ran to max_tokens"
    )
    return time.monotonic() - start


@pytest.mark.slow
def test_a_request_whose_client_gave_up_is_dropped_queued_or_running(servers):
    """With every slot of the server busy (four long generations), a fifth request whose client times out leaves the
    queue unserved, and one of the four whose client times out stops generating at the next step: the engine
    generates three long answers, part of the fourth and nothing of the fifth, and counts two abandoned requests."""
    url = servers("smollm2-135m").base_url
    long_tokens = 64
    while _timed_generation(url, long_tokens) < 2.0:
        long_tokens *= 2
    before = _engine_counters(url)
    body = {"model": SERVED, "prompt": COUNTING, "max_tokens": long_tokens, "temperature": 0}

    async def main():
        async with httpx.AsyncClient(base_url=url) as http:
            served = [asyncio.ensure_future(http.post("/v1/completions", json=body, timeout=120)) for _ in range(3)]
            await asyncio.sleep(0.5)  # the three hold three slots
            running = asyncio.ensure_future(http.post("/v1/completions", json=body, timeout=1.5))
            await asyncio.sleep(0.3)  # and this one the fourth, so the next waits in the queue
            with pytest.raises(httpx.ReadTimeout):
                await http.post("/v1/completions", json={**body, "max_tokens": 8}, timeout=1.0)
            with pytest.raises(httpx.ReadTimeout):
                await running
            return [(await reply).json() for reply in served]

    replies = asyncio.run(main())
    generated, abandoned = (now - then for now, then in zip(_engine_counters(url), before))
    assert [r["usage"]["completion_tokens"] for r in replies] == [long_tokens] * 3
    partial = generated - 3 * long_tokens
    print(f"\nthe running request whose client gave up: {partial:.0f} of {long_tokens} tokens generated")
    assert 0 < partial < long_tokens / 2, "the running request stopped soon after its client left"
    assert abandoned == 2


@pytest.mark.slow
def test_client_timeouts_count_no_queue_time_behind_the_embedded_server(servers):
    """The registry's client for an embedded model keeps as many requests in flight as the server decodes together,
    so none waits in the server's queue, where its timeout would count the wait. Eight requests, with a timeout of
    1.6 times what a full batch of four takes: through the registry's client (four in flight) each request takes
    about one batch's time and none is retried; with all eight in flight, the second four would wait a whole batch
    in the queue (about twice the batch's time) and time out."""
    from grace_dagster.registry import load_registry
    from grace_dagster.resources.endpoints import Endpoint, LLMEndpoints

    url = servers("smollm2-135m").base_url
    endpoint = Endpoint(load_registry().get("smollm2-135m"), url)
    slots = endpoint.model.serving.max_concurrency
    tokens = 16
    while (seconds := _timed_generation(url, tokens, together=slots)) < 1.0:
        tokens *= 2
    before = _completions_served(url)

    async def main():
        client = LLMEndpoints().client_for(endpoint, timeout=1.6 * seconds, retry=FAST_RETRY)
        async with client:
            replies = await asyncio.gather(
                *(client.complete(COUNTING, max_tokens=tokens, temperature=0) for _ in range(2 * slots))
            )
        return replies, client.stats

    replies, stats = asyncio.run(main())
    served = _completions_served(url) - before
    assert [r.usage.completion_tokens for r in replies] == [tokens] * (2 * slots)
    assert stats.retries == 0, "no request timed out"
    assert served == 2 * slots, "each request was served once"


# Response bodies in vLLM's documented format, replayed through httpx's mock transport to pin the parsing of fields real
# vLLM sends (tests/test_conformance.py sends the same requests to a real vLLM server).
VLLM_PROMPT_LOGPROBS_BODY = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 1,
    "model": "google/gemma-2-9b-it",
    "choices": [
        {
            "index": 0,
            "text": " yes",
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
            "prompt_token_ids": [2, 9413, 235292, 7778, 108],
            "prompt_logprobs": [
                None,
                {"9413": {"logprob": -3.25, "rank": 12, "decoded_token": "Answer"}},
                {"235292": {"logprob": -0.5, "rank": 1, "decoded_token": ":"}},
                {"7778": {"logprob": -0.25, "rank": 1, "decoded_token": " yes"}},
                {"108": {"logprob": -0.1, "rank": 1, "decoded_token": "\n"}},
            ],
        },
        {
            "index": 1,
            "text": " yes",
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
            "prompt_token_ids": [2, 9413, 235292, 793, 108],
            "prompt_logprobs": [
                None,
                {"9413": {"logprob": -3.25, "rank": 12, "decoded_token": "Answer"}},
                {"235292": {"logprob": -0.5, "rank": 1, "decoded_token": ":"}},
                {"793": {"logprob": -9999.0, "rank": 250000, "decoded_token": " no"}},
                {"108": {"logprob": -0.2, "rank": 1, "decoded_token": "\n"}},
            ],
        },
    ],
    "usage": {"prompt_tokens": 10, "total_tokens": 12, "completion_tokens": 2},
}
# vLLM's /tokenize of the context "Answer:" (BOS, "Answer", ":").
VLLM_TOKENIZE_BODY = {"tokens": [2, 9413, 235292], "count": 3, "max_model_len": 8192}

VLLM_ECHO_BODY = {
    "id": "cmpl-2",
    "object": "text_completion",
    "created": 1,
    "model": "google/gemma-2-9b-it",
    "choices": [
        {
            "index": 0,
            "text": "The step of boiling water is: 1",
            "logprobs": {
                "text_offset": [0, 3, 8],
                "token_logprobs": [None, -8.81, -1.55],
                "tokens": ["The", " step", "1"],
                "top_logprobs": [None, {" step": -8.81, " is": -0.78}, {"1": -1.55}],
            },
            "finish_reason": "length",
            "stop_reason": None,
            "prompt_logprobs": None,
        }
    ],
    "usage": {"prompt_tokens": 2, "total_tokens": 3, "completion_tokens": 1},
}


def _replay(*responses: tuple[int, dict]):
    calls = []
    queue = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(json.loads(request.content) if request.content else None)
        status, body = queue.pop(0) if len(queue) > 1 else queue[0]
        return httpx.Response(status, json=body)

    return httpx.MockTransport(handler), calls


def test_client_parses_vllm_echo_and_prompt_logprobs():
    transport, calls = _replay((200, VLLM_ECHO_BODY))

    async def main():
        async with LLMClient("http://vllm:8000/v1", "google/gemma-2-9b-it", transport=transport) as client:
            return await client.complete("The step of boiling water is:", max_tokens=1, echo=True, logprobs=1)

    response = asyncio.run(main())
    logprobs = response.choices[0].logprobs
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.tokens == ["The", " step", "1"]
    assert calls[0]["model"] == "google/gemma-2-9b-it" and calls[0]["echo"] is True


def test_scoring_reads_vllm_prompt_logprobs_and_minus_9999_as_zero_probability():
    """vLLM ignores `prompt_logprobs_start` (an embedded-server field) and returns every position; the scorer reads the
    options' own positions, after the context's tokens (from /tokenize) that each prompt's token ids start with."""
    transport, calls = _replay((200, VLLM_TOKENIZE_BODY), (200, VLLM_PROMPT_LOGPROBS_BODY))

    async def main():
        async with LLMClient("http://vllm:8000", "google/gemma-2-9b-it", transport=transport) as client:
            return await score_options(client, "Answer:", [" yes\n", " no\n"], add_special_tokens=True)

    scores = asyncio.run(main())
    assert calls[0]["prompt"] == "Answer:" and calls[0]["add_special_tokens"] is True
    assert calls[1]["prompt"] == ["Answer: yes\n", "Answer: no\n"]
    assert calls[1]["prompt_logprobs"] == 0 and calls[1]["add_special_tokens"] is True
    assert calls[1]["prompt_logprobs_start"] == 3 and calls[1]["return_token_ids"] is True
    assert scores.logprobs[0] == pytest.approx(-0.35)
    assert scores.logprobs[1] == -math.inf
    assert scores.probabilities == [1.0, 0.0]
    assert scores.captured_mass == pytest.approx(math.exp(-0.35))
    assert scores.n_tokens == [2, 2]


def test_scoring_without_prompt_token_ids_reads_them_from_every_position_or_refuses():
    """A server without `return_token_ids` (an older vLLM) that returns every position: the context's tokens are read
    from the entries. One that returns neither the ids nor the context's positions cannot be checked: refused."""
    every = copy.deepcopy(VLLM_PROMPT_LOGPROBS_BODY)
    for choice in every["choices"]:
        del choice["prompt_token_ids"]
    neither = copy.deepcopy(every)
    for choice in neither["choices"]:
        choice["prompt_logprobs"][1:3] = [None, None]

    async def score(body):
        transport, _ = _replay((200, VLLM_TOKENIZE_BODY), (200, body))
        async with LLMClient("http://vllm:8000", "google/gemma-2-9b-it", transport=transport) as client:
            return await score_options(client, "Answer:", [" yes\n", " no\n"], add_special_tokens=True)

    assert asyncio.run(score(every)).logprobs == asyncio.run(score(VLLM_PROMPT_LOGPROBS_BODY)).logprobs
    with pytest.raises(ScoringError, match="no prompt_token_ids"):
        asyncio.run(score(neither))


def test_retries_on_429_and_5xx_then_succeeds():
    busy = {"error": {"message": "busy", "type": "ServiceUnavailable", "code": 503}}
    transport, calls = _replay((429, busy), (503, busy), (500, busy), (200, VLLM_ECHO_BODY))

    async def main():
        retry = RetryPolicy(attempts=5, initial_backoff=0.01)
        async with LLMClient("http://vllm:8000", "m", transport=transport, retry=retry) as client:
            response = await client.complete("x", max_tokens=1)
            return response, client.stats

    response, stats = asyncio.run(main())
    assert len(calls) == 4 and stats.retries == 3 and stats.requests == 1
    assert response.choices[0].text.startswith("The step")


def test_4xx_is_not_retried_and_carries_the_servers_message():
    transport, calls = _replay((400, {"error": {"message": "max_tokens must be at least 0", "code": 400}}))

    async def main():
        async with LLMClient("http://vllm:8000", "m", transport=transport) as client:
            await client.complete("x", max_tokens=-1)

    with pytest.raises(LLMRequestError, match="answered 400: max_tokens must be at least 0"):
        asyncio.run(main())
    assert len(calls) == 1


def test_unreachable_server_fails_after_bounded_retries_with_advice():
    async def main():
        retry = RetryPolicy(attempts=3, initial_backoff=0.01)
        async with LLMClient("http://127.0.0.1:9", "m", retry=retry) as client:
            await client.complete("x")

    with pytest.raises(LLMUnavailableError, match="failed 3 times.*Check that the model server is running"):
        asyncio.run(main())


def test_scoring_accepts_sentencepiece_token_strings_but_refuses_a_misaligned_span():
    """vLLM's per-token strings for SentencePiece models carry '▁' for a leading space; a span shifted by one
    token still fails."""

    def body(tokens: list[list[tuple[int, str]]]) -> dict:
        choices = []
        for index, prompt in enumerate(tokens):
            positions = [None] + [{str(t): {"logprob": -0.5, "rank": 1, "decoded_token": s}} for t, s in prompt[1:]]
            ids = [t for t, _ in prompt]
            choices.append(
                {
                    "index": index,
                    "text": "",
                    "finish_reason": "length",
                    "prompt_logprobs": positions,
                    "prompt_token_ids": ids,
                }
            )
        return {
            "id": "x",
            "object": "text_completion",
            "created": 1,
            "model": "m",
            "choices": choices,
            "usage": {"prompt_tokens": 1, "total_tokens": 1},
        }

    context = [(2, "<bos>"), (10, "Answer"), (11, ":")]
    aligned = body([context + [(20, "▁yes"), (21, "\n")], context + [(22, "▁no"), (21, "\n")]])
    shifted = body([context + [(20, "▁yes"), (21, "\n")], context[:-1] + [(23, ":▁no"), (21, "\n")]])
    # The span itself misread: the option's text is not what its tokens spell.
    misread = body([context + [(20, "▁yes"), (21, "\n")], context + [(24, "▁nope"), (21, "\n")]])
    tokenized = {"tokens": [t for t, _ in context], "count": len(context), "max_model_len": 8192}

    async def score(replayed):
        transport, _ = _replay((200, tokenized), (200, replayed))
        async with LLMClient("http://vllm:8000", "m", transport=transport) as client:
            return await score_options(client, "Answer:", [" yes\n", " no\n"], add_special_tokens=True)

    assert asyncio.run(score(aligned)).probabilities == [0.5, 0.5]
    with pytest.raises(ScoringError, match="changes the tokenization of the context"):
        asyncio.run(score(shifted))
    with pytest.raises(ScoringError, match="its token span reads"):
        asyncio.run(score(misread))
