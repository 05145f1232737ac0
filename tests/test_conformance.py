"""One contract, two servers: every request shape the pipeline sends, against the embedded server and real vLLM.

Each test runs unchanged against both (parametrized `server`) and asserts the fields the client reads
(`grace_dagster.llm.protocol`, `client.py`, `scoring.py`, `extraction.py`). Both serve SmolLM2-135M-Instruct: the
embedded server from the packaged Q4_1 GGUF, vLLM from the same weights de-quantized to bf16, so token ids and chat
rendering must agree exactly between them (checked across servers at the end), and log-probabilities closely.
Where vLLM answered differently, the embedded server was changed, not these tests.
"""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field

from grace_dagster.llm import LLMClient, LLMRequestError, score_options
from grace_dagster.llm.extraction import response_format
from grace_dagster.registry import load_registry
from tests.conftest import VLLM_MODEL

SERVED = "SmolLM2-135M-Instruct"
SLUGS = {"embedded": "smollm2-135m", "vllm": VLLM_MODEL}
TEXT = "It was terrible"
MESSAGES = [{"role": "user", "content": "Was the cake good? Answer in one sentence."}]


@pytest.fixture(params=["embedded", "vllm"])
def server(request) -> tuple[str, str]:
    """(kind, base URL) of a running server for SmolLM2."""
    if request.param == "embedded":
        return "embedded", request.getfixturevalue("servers")(SLUGS["embedded"]).base_url
    return "vllm", request.getfixturevalue("vllm_server").base_url


def _run(base_url: str, work, **client_kwargs):
    async def main():
        async with LLMClient(base_url, SERVED, **client_kwargs) as client:
            return await work(client), client.stats

    return asyncio.run(main())


def _post(base_url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base_url}{path}", json=body, timeout=300)


pytestmark = pytest.mark.slow


def test_models_health_and_version(server):
    kind, url = server

    async def work(client):
        return await client.models(), await client.version()

    (models, version), _ = _run(url, work)
    assert [m.id for m in models.data] == [SERVED]
    assert models.data[0].max_model_len == load_registry().get(SLUGS[kind]).serving.context_length
    assert isinstance(version, str) and version
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_tokenize_text_and_messages_and_detokenize_round_trip(server):
    _, url = server

    async def work(client):
        text = await client.tokenize(prompt=TEXT, add_special_tokens=False)
        chat = await client.tokenize(messages=MESSAGES, add_generation_prompt=True)
        return text, chat, await client.detokenize(text.tokens), await client.render_chat(MESSAGES)

    (text, chat, back, rendered), _ = _run(url, work)
    assert text.count == len(text.tokens) > 0 and text.max_model_len > 0
    assert back.prompt == TEXT
    assert chat.count == len(chat.tokens) > text.count
    # The template's own special tokens are in the text, and the generation prompt opens the assistant turn.
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_start|>assistant\n")
    assert MESSAGES[0]["content"] in rendered


def test_completions_with_a_prompt_list_and_token_id_prompts(server):
    _, url = server
    prompts = ["It was", "The cake tasted"]

    async def work(client):
        ids = [(await client.tokenize(prompt=p)).tokens for p in prompts]
        by_text = await client.complete(prompts, max_tokens=4, temperature=0)
        by_ids = await client.complete(ids, max_tokens=4, temperature=0)
        single = await client.complete(ids[1], max_tokens=4, temperature=0)
        return ids, by_text, by_ids, single

    (ids, by_text, by_ids, single), _ = _run(url, work)
    assert [c.index for c in by_text.choices] == [0, 1]
    assert all(c.finish_reason == "length" and c.text for c in by_text.choices)
    # Greedy continuations do not depend on whether the prompt came as text or as its token ids.
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    assert single.choices[0].text == by_text.choices[1].text
    usage = by_text.usage
    assert usage.prompt_tokens == sum(len(i) for i in ids)
    assert usage.completion_tokens == 8 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_prompt_logprobs_give_each_prompt_token_its_logprob_rank_and_text(server):
    _, url = server
    prompts = ["It was", TEXT]

    async def work(client):
        ids = [(await client.tokenize(prompt=p)).tokens for p in prompts]
        plain = await client.complete(prompts, max_tokens=1, temperature=0, prompt_logprobs=0)
        top = await client.complete(TEXT, max_tokens=1, temperature=0, prompt_logprobs=2)
        return ids, plain, top

    (ids, plain, top), _ = _run(url, work)
    for prompt, prompt_ids, choice in zip(prompts, ids, plain.choices):
        entries = choice.prompt_logprobs
        assert entries is not None and len(entries) == len(prompt_ids)
        assert entries[0] is None, "the first prompt token has nothing before it"
        for token, entry in zip(prompt_ids[1:], entries[1:]):
            assert list(entry) == [str(token)], "prompt_logprobs=0: exactly the prompt's own token"
            assert entry[str(token)].logprob < 0 and entry[str(token)].rank >= 1
        decoded = "".join(e[str(t)].decoded_token for t, e in zip(prompt_ids[1:], entries[1:]))
        assert decoded == prompt.removeprefix("It"), "each entry's text is its token's"
    # The same prompt scores the same inside a list and alone.
    assert plain.choices[1].prompt_logprobs[1] == plain.choices[0].prompt_logprobs[1]
    for token, entry in zip(ids[1][1:], top.choices[0].prompt_logprobs[1:]):
        keys = list(entry)
        assert keys[0] == str(token), "the prompt's own token comes first, then the top k"
        assert len(entry) in (2, 3) and {entry[k].rank for k in keys[1:]} <= {1, 2}
        best = max(e.logprob for e in entry.values())
        assert entry[str(token)].rank == 1 or entry[str(token)].logprob < best


def test_prompt_token_ids_and_logprobs_from_a_start_position(server):
    """What `score_options` asks: each prompt's token ids back (vLLM's `return_token_ids`) and log-probabilities from
    one position on (`prompt_logprobs_start`, the embedded server's own field). The embedded server returns null before
    it and computes nothing there; vLLM ignores the field and returns every position. Either way the positions asked
    for are those of a request for all of them (the embedded server: bit for bit)."""
    kind, url = server
    start = 2

    async def work(client):
        ids = (await client.tokenize(prompt=TEXT)).tokens
        every = await client.complete(TEXT, max_tokens=1, temperature=0, prompt_logprobs=0)
        tail = await client.complete(
            TEXT, max_tokens=1, temperature=0, prompt_logprobs=0, prompt_logprobs_start=start, return_token_ids=True
        )
        return ids, every.choices[0], tail.choices[0]

    (ids, every, tail), _ = _run(url, work)
    assert len(ids) > start and tail.prompt_token_ids == ids
    assert every.prompt_token_ids is None, "token ids only when asked for"
    assert len(tail.prompt_logprobs) == len(ids)
    if kind == "embedded":
        assert tail.prompt_logprobs[:start] == [None] * start
        assert tail.prompt_logprobs[start:] == every.prompt_logprobs[start:]
    else:
        logprob = lambda entry: next(iter(entry.values())).logprob  # noqa: E731
        assert tail.prompt_logprobs[0] is None and all(e is not None for e in tail.prompt_logprobs[1:])
        assert [logprob(e) for e in tail.prompt_logprobs[1:]] == pytest.approx(
            [logprob(e) for e in every.prompt_logprobs[1:]], abs=1e-5
        )


def test_echo_with_max_tokens_zero_scores_the_prompt_without_generating(server):
    _, url = server

    async def work(client):
        echo = await client.complete(TEXT, max_tokens=0, echo=True, logprobs=0, temperature=0)
        scored = await client.complete(TEXT, max_tokens=1, prompt_logprobs=0, temperature=0)
        return echo, scored

    (echo, scored), _ = _run(url, work)
    choice = echo.choices[0]
    assert choice.text == TEXT, "echo without generation returns the prompt alone"
    assert choice.logprobs is not None and choice.logprobs.token_logprobs[0] is None
    assert "".join(choice.logprobs.tokens) == TEXT
    assert choice.logprobs.text_offset[0] == 0 and choice.logprobs.text_offset[1] == len(choice.logprobs.tokens[0])
    reference = [next(iter(e.values())).logprob for e in scored.choices[0].prompt_logprobs[1:]]
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(reference, abs=1e-5)
    assert echo.usage.prompt_tokens == len(choice.logprobs.tokens)


def test_score_options_the_pipeline_way_sums_each_option_over_its_tokens(server):
    """Experiment 2's request through `score_options`: the rendered chat, each option a whole reply."""
    _, url = server
    options = ["It was terrible<|im_end|>\n", "It wasn't terrible<|im_end|>\n", "It was amazing<|im_end|>\n"]

    async def work(client):
        context = await client.render_chat(MESSAGES)
        return await score_options(client, context, options, add_special_tokens=False)

    scores, stats = _run(url, work)
    assert stats.model_requests == 1, "all options of a question go in one request"
    assert all(n >= 3 for n in scores.n_tokens) and all(lp < 0 for lp in scores.logprobs)
    assert sum(scores.probabilities) == pytest.approx(1.0)
    assert 0 < scores.captured_mass < 1


def _common_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_seeded_sampling_with_n_gives_samples_each_reproducible_from_seed_plus_index(server):
    """vLLM seeds sample i of a request with seed + i (vllm/v1/engine/parallel_sampling.py); so does the embedded
    server. The same request gives the same samples. Sample i asked alone with seed + i follows the same random
    stream, but on vLLM a different batch (1 sequence instead of 6) changes bf16 logits slightly, so a near-tie can
    flip a later token: sample i must agree with the lone seed + i sample longer than with any other sample (on the
    embedded server they are equal)."""
    kind, url = server
    params = dict(max_tokens=12, temperature=1.0, seed=1234)
    prompts = ["Once upon a time", "The best cake is"]

    async def work(client):
        many = await client.complete(prompts, n=3, **params)
        again = await client.complete(prompts, n=3, **params)
        singles = [
            [await client.complete(p, **{**params, "seed": params["seed"] + i}) for i in range(3)] for p in prompts
        ]
        chat = await client.chat(MESSAGES, n=2, **params)
        chat_again = await client.chat(MESSAGES, n=2, **params)
        return many, again, singles, chat, chat_again

    (many, again, singles, chat, chat_again), _ = _run(url, work)
    assert [c.index for c in many.choices] == list(range(6)), "every sample of the first prompt, then the next"
    texts = [c.text for c in many.choices]
    assert texts == [c.text for c in again.choices], "the same request gives the same samples"
    assert len(set(texts[:3])) > 1, "the samples of one prompt are not copies of each other"
    alone = [s.choices[0].text for per_prompt in singles for s in per_prompt]
    for p in range(len(prompts)):
        for i in range(3):
            k = 3 * p + i
            agree = _common_prefix(alone[k], texts[k])
            others = [_common_prefix(alone[k], texts[3 * p + j]) for j in range(3) if j != i]
            assert agree > max(others), f"sample {i} of prompt {p} is the one seeded with seed + {i}"
            if kind == "embedded":
                assert alone[k] == texts[k]
    assert many.usage.prompt_tokens == sum(s[0].usage.prompt_tokens for s in singles), "each prompt counted once"
    assert [c.index for c in chat.choices] == [0, 1]
    assert [c.message.content for c in chat.choices] == [c.message.content for c in chat_again.choices]
    assert chat.choices[0].message.content != chat.choices[1].message.content


def test_many_seeded_requests_at_once_are_all_answered(server):
    """Experiment 1 sends its seeded requests many at a time. vLLM 0.32 on a CPU kills its engine when chunked prefill
    splits the prompt of a seeded request (16 such requests did it here), so the registry's local vLLM entry turns
    chunked prefill off; this pins that every request is answered and the server lives on."""
    _, url = server
    story = "The cake at the party was dry, and everyone was too polite to say so. " * 20

    async def work(client):
        return await asyncio.gather(
            *(
                client.chat(
                    [{"role": "user", "content": f"Guest {i}: {story} How was the cake?"}],
                    max_tokens=8,
                    temperature=0.7,
                    seed=i,
                )
                for i in range(16)
            )
        )

    replies, stats = _run(url, work, max_concurrency=16)
    assert len(replies) == 16 and all(r.choices[0].finish_reason in ("stop", "length") for r in replies)
    assert stats.retries == 0
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


class JudgeReading(BaseModel):
    """The shape of a judge's answer: integer bounds, and an explicit abstention (null) for an unanswered field."""

    prior: int | None = Field(ge=0, le=3, description="0 to 3, or null if the reply does not say")
    bet: int = Field(ge=0, le=100)
    knows: bool | None = None


def test_chat_with_json_schema_enforces_anyof_null_and_integer_bounds(server):
    _, url = server
    schema = JudgeReading.model_json_schema()
    assert {"type": "null"} in schema["properties"]["prior"]["anyOf"], "the abstention is an anyOf with null"
    messages = [{"role": "user", "content": "Reply in JSON: prior is 7, bet is 250, knows is maybe."}]

    async def work(client):
        # The judge's own temperature (0), and sampled replies that wander further from the schema's happy path.
        return [
            await client.chat(
                messages,
                max_tokens=100,
                temperature=t,
                seed=seed,
                response_format=response_format(schema, JudgeReading.__name__),
            )
            for t, seed in [(0.0, 0), (1.0, 1), (1.0, 2), (1.0, 3)]
        ]

    replies, _ = _run(url, work)
    for reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", f"the JSON was closed before max_tokens: {choice.message.content!r}"
        value = json.loads(choice.message.content)
        jsonschema.validate(value, schema)
        JudgeReading.model_validate(value)


def test_unknown_model_is_a_404_that_names_it_and_is_not_retried(server):
    _, url = server
    for path, body in [
        ("/v1/completions", {"prompt": "x", "max_tokens": 1}),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1}),
        ("/tokenize", {"prompt": "x"}),
    ]:
        response = _post(url, path, {"model": "no-such-model", **body})
        assert response.status_code == 404, path
        error = response.json()["error"]
        assert error["type"] == "NotFoundError" and error["code"] == 404 and error["param"] == "model"
        assert "no-such-model" in error["message"]

    async def work(client):
        client.model = "no-such-model"
        with pytest.raises(LLMRequestError) as raised:
            await client.complete("x", max_tokens=1)
        return raised.value

    error, stats = _run(url, work)
    assert error.status == 404 and "no-such-model" in str(error) and stats.retries == 0


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),  # 0 only with echo
        ({"prompt": "x", "max_tokens": 1, "prompt_logprobs": 21}, "prompt_logprobs"),  # vLLM's --max-logprobs 20
        ({"prompt": "x", "max_tokens": 1, "logprobs": "many"}, "logprobs"),
    ],
    ids=["temperature", "top_p", "max_tokens-negative", "max_tokens-zero", "prompt_logprobs-21", "logprobs-str"],
)
def test_bad_parameters_are_a_400_that_names_the_parameter(server, body, param):
    _, url = server
    response = _post(url, "/v1/completions", {"model": SERVED, **body})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400 and error["param"] == param
    assert param in error["message"] or param.replace("_", " ") in error["message"]


def test_a_request_longer_than_the_context_is_a_400_not_a_retry(server):
    kind, url = server
    context_length = load_registry().get(SLUGS[kind]).serving.context_length

    async def work(client):
        with pytest.raises(LLMRequestError) as raised:
            await client.complete("x", max_tokens=context_length + 1)
        return raised.value

    error, stats = _run(url, work)
    assert error.status == 400 and str(context_length) in str(error) and stats.retries == 0


def test_both_servers_tokenize_render_and_score_alike(servers, vllm_server):
    """Same weights, same tokenizer: identical token ids and chat rendering on both servers, and log-probabilities
    within what bf16 against Q4_1 kernels allows (measured here: about 0.1 nats per token)."""
    results = {}
    for kind, url in [("embedded", servers(SLUGS["embedded"]).base_url), ("vllm", vllm_server.base_url)]:

        async def work(client):
            rendered = await client.render_chat(MESSAGES)
            tokens = (await client.tokenize(prompt=rendered + TEXT, add_special_tokens=False)).tokens
            scored = await client.complete([tokens], max_tokens=1, temperature=0, prompt_logprobs=0)
            return rendered, tokens, [next(iter(e.values())).logprob for e in scored.choices[0].prompt_logprobs[1:]]

        results[kind], _ = _run(url, work)
    (rendered_e, tokens_e, lps_e), (rendered_v, tokens_v, lps_v) = results["embedded"], results["vllm"]
    assert rendered_e == rendered_v and tokens_e == tokens_v
    differences = [abs(a - b) for a, b in zip(lps_e, lps_v)]
    print(
        f"\nper-token |logprob difference| embedded vs vLLM: max {max(differences):.3f}, "
        f"mean {sum(differences) / len(differences):.3f} over {len(differences)} tokens"
    )
    assert math.fsum(differences) / len(differences) < 0.5
