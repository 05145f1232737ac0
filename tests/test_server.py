"""The embedded server against real models over HTTP: prompt logprobs equal llama.cpp's own logits, json_schema
output validates, malformed requests get 4xx, and the server survives them."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import llama_cpp
import numpy as np
import pytest
from llama_cpp import Llama
from llama_cpp._internals import LlamaSampler

from grace_dagster.llm.prompting import ANSWER_CUE
from grace_dagster.registry import load_registry
from grace_dagster.serving.engine import (
    N_UBATCH,
    Engine,
    Sampling,
    TokenSampler,
    evaluation_cuts,
    load_without_weight_repacking,
    logits_row,
)
from grace_dagster.serving.weights import gguf_path
from tests.conftest import LOCAL_MODELS, SERVED_NAMES
from tests.pipeline import server_counter

pytestmark = pytest.mark.slow

PROMPTS = [
    "Imagine that Ben baked a loaf of bread but was not sure how good it was.",
    "It wasn't bad.",
    'Nora calls you and says: "I have looked at 2 of the 3 jars. One of the jars has grown mold."',
    "How many of the 3 jars do you think have grown mold? Answer: 2",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Q: Does Omar know exactly how many bulbs have bloomed?\nA: yes",
    "<|im_start|>user\nHow was my poem?<|im_end|>\n<|im_start|>assistant\nIt was amazing",
    "10%, 20%, 30%, 40%, 50%, 60%, 70%, 80%, 90%, 100%",
    "Ünïcödé and emoji 🎉 survive tokenization.",
    "a",
    "Here's how Ava actually felt about the scarf, on a scale of 0 to 3 hearts: 2 hearts.",
    "   leading spaces and\ttabs\n\nand blank lines",
]


def _log_softmax(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    peak = row.max()
    return row - (peak + np.log(np.exp(row - peak).sum()))


@pytest.fixture(scope="module", params=LOCAL_MODELS)
def model_and_reference(request, servers):
    """The server and an in-process llama.cpp with every logits row kept (`logits_all`), configured alike."""
    slug = request.param
    model = load_registry().get(slug)
    reference = load_without_weight_repacking(
        model_path=str(gguf_path(model)),
        n_ctx=model.serving.context_length,
        n_batch=512,
        n_ubatch=N_UBATCH,
        logits_all=True,
        verbose=False,
    )
    yield slug, servers(slug), reference
    reference.close()


def _reference_logprobs(reference: Llama, tokens: list[int], cuts: list[int] | None = None) -> list[float]:
    """llama.cpp's log-probabilities of the prompt, evaluated in the ubatches of a lone evaluation on the server
    (`evaluation_cuts`), or in one `eval` (32-token ubatches from the start) when `cuts` is [len(tokens)]."""
    reference.reset()
    reference._ctx.kv_cache_clear()
    start = 0
    for end in cuts or evaluation_cuts(tokens, reference._model.vocab, N_UBATCH):
        reference.eval(tokens[start:end])
        start = end
    scores = reference.scores[: len(tokens)]
    return [float(_log_softmax(scores[i - 1])[tokens[i]]) for i in range(1, len(tokens))]


def test_prompt_logprobs_equal_llama_cpp_logits(model_and_reference):
    slug, server, reference = model_and_reference
    worst = 0.0
    for prompt in PROMPTS:
        body = httpx.post(
            f"{server.base_url}/v1/completions",
            json={
                "model": SERVED_NAMES[slug],
                "prompt": prompt,
                "max_tokens": 1,
                "temperature": 0,
                "echo": True,
                "logprobs": 0,
                "prompt_logprobs": 0,
            },
            timeout=120,
        ).json()
        choice = body["choices"][0]
        prompt_positions = choice["prompt_logprobs"]
        assert prompt_positions[0] is None, "the first prompt position has no logprob, as in vLLM"
        tokens = reference.tokenize(prompt.encode(), add_bos=True, special=True)
        assert [int(next(iter(p))) for p in prompt_positions[1:]] == tokens[1:]
        expected = _reference_logprobs(reference, tokens)
        served = [next(iter(p.values()))["logprob"] for p in prompt_positions[1:]]
        echo = choice["logprobs"]["token_logprobs"][1 : len(tokens)]
        assert choice["logprobs"]["token_logprobs"][0] is None
        np.testing.assert_allclose(served, expected, atol=1e-4, err_msg=f"{slug}: {prompt!r}")
        np.testing.assert_allclose(echo, expected, atol=1e-4)
        worst = max(worst, float(np.max(np.abs(np.array(served) - np.array(expected)))) if expected else 0.0)
    print(f"\n{slug}: max |served - llama.cpp| over {len(PROMPTS)} prompts = {worst:.2e} nats")


def test_shared_prefix_prompts_score_exactly_like_separate_evaluations(model_and_reference):
    """Options sent together share the context's evaluation, cut at a ubatch boundary, so each option's score is
    the one a lone full-context evaluation gives (no batch-split noise)."""
    slug, server, reference = model_and_reference
    context = PROMPTS[0] + ' Ben asked Ava: "How was my bread?" Ava said:'
    options = [f" It {neg} {word}." for neg in ("was", "wasn't") for word in ("terrible", "bad", "good", "amazing")]
    prompts = [context + o for o in options]
    body = httpx.post(
        f"{server.base_url}/v1/completions",
        json={"model": SERVED_NAMES[slug], "prompt": prompts, "max_tokens": 1, "prompt_logprobs": 0},
        timeout=120,
    ).json()
    worst = 0.0
    for prompt, choice in zip(prompts, sorted(body["choices"], key=lambda c: c["index"])):
        tokens = reference.tokenize(prompt.encode(), add_bos=True, special=True)
        served = [next(iter(p.values()))["logprob"] for p in choice["prompt_logprobs"][1:]]
        expected = _reference_logprobs(reference, tokens)
        worst = max(worst, float(np.max(np.abs(np.array(served) - np.array(expected)))))
    print(f"\n{slug}: shared-prefix vs one-shot evaluation, max per-token difference {worst:.2e} nats")
    assert worst < 1e-6


# A question's context and its answers as the pipeline sends them: each model's chat turns as its template writes
# them, with or without the tokenizer's BOS (the pipeline renders ChatML with its first <|im_start|> and sends it
# without BOS; Gemma's template starts with BOS), and a base model's plain text ending in the answer cue.
FORMATS = {
    ("chat", "smollm2-135m"): ("<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n", "{}<|im_end|>\n", False),
    ("chat", "gemma3-270m"): (
        "<start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n",
        "{}<end_of_turn>\n",
        True,
    ),
    ("plain", "smollm2-135m"): ("{}" + ANSWER_CUE, " {}\n", True),
    ("plain", "gemma3-270m"): ("{}" + ANSWER_CUE, " {}\n", True),
}


@pytest.mark.parametrize("text_format", ["chat", "plain"])
def test_answers_scored_after_a_context_evaluate_only_their_own_turn_or_line(model_and_reference, text_format):
    """A question's context and its answers, sent together as the pipeline scores them: the context is evaluated
    once and each answer from the start of the last turn (chat) or line (plain text) on, because a lone evaluation
    starts a ubatch there: the assistant's header or the answer cue, then the answer's own tokens. Each answer's
    scores equal llama.cpp's evaluation of that answer's prompt alone, logits bit for bit."""
    slug, server, reference = model_and_reference
    question, answer, add_bos = FORMATS[text_format, slug]
    context = question.format(" ".join(PROMPTS[:4]) + " Was the bread good?")  # past one ubatch, ending in another
    answers = [answer.format(f"It {neg} {word}.") for neg in ("was", "wasn't") for word in ("bad", "good")]
    prompts = [context] + [context + a for a in answers]
    before = server_counter(server.base_url, "grace_server_tokens_evaluated_total")
    body = httpx.post(
        f"{server.base_url}/v1/completions",
        json={
            "model": SERVED_NAMES[slug],
            "prompt": prompts,
            "max_tokens": 1,
            "prompt_logprobs": 0,
            "add_special_tokens": add_bos,
        },
        timeout=120,
    ).json()
    evaluated = server_counter(server.base_url, "grace_server_tokens_evaluated_total") - before
    tokens = [reference.tokenize(p.encode(), add_bos=add_bos, special=True) for p in prompts]
    restart = evaluation_cuts(tokens[0], reference._model.vocab, N_UBATCH)[-2]
    assert 0 < len(tokens[0]) - restart <= 3 and restart % N_UBATCH, "a restart in the header or cue, off the grid"
    assert evaluated == len(tokens[0]) + sum(len(t) - restart for t in tokens[1:])
    worst, worst_vs_32 = 0.0, 0.0
    for prompt_tokens, choice in zip(tokens, sorted(body["choices"], key=lambda c: c["index"])):
        served = np.array([next(iter(p.values()))["logprob"] for p in choice["prompt_logprobs"][1:]])
        worst = max(worst, np.max(np.abs(served - _reference_logprobs(reference, prompt_tokens))))
        in_32 = _reference_logprobs(reference, prompt_tokens, [len(prompt_tokens)])
        worst_vs_32 = max(worst_vs_32, np.max(np.abs(served - in_32)))
    print(
        f"\n{slug} {text_format}: {evaluated:.0f} tokens evaluated for {len(prompts)} prompts of "
        f"{sum(map(len, tokens))}; max difference from llama.cpp {worst:.2e} nats, from an evaluation in 32-token "
        f"ubatches only {worst_vs_32:.2e}"
    )
    # Identical logits; what is left is the two sides' log-softmax arithmetic (float32 rows, float64 sums).
    assert worst < 1e-6


def test_scores_and_seeded_samples_are_the_same_with_four_requests_in_flight(model_and_reference):
    """Continuous batching changes no number. Four seeded samples of one request (decoded together, the later three
    from a copy of the first one's evaluated prompt) run while scoring requests arrive: every prompt log-probability
    equals llama.cpp's own within the tolerance of a lone request, and each sample has the same tokens and the same
    log-probabilities as when it is asked alone afterwards."""
    slug, server, reference = model_and_reference
    # Longer than two ubatches, so that the samples share a copied prefix.
    story = " ".join(PROMPTS[:5])
    generation = {"model": SERVED_NAMES[slug], "prompt": story, "max_tokens": 24, "temperature": 1.0, "logprobs": 0}

    def sample(n: int, seed: int) -> list[tuple[str, list[float]]]:
        body = httpx.post(f"{server.base_url}/v1/completions", json={**generation, "n": n, "seed": seed}, timeout=300)
        choices = sorted(body.json()["choices"], key=lambda c: c["index"])
        return [(c["text"], c["logprobs"]["token_logprobs"]) for c in choices]

    def prompt_logprobs(prompt: str) -> list[float]:
        body = httpx.post(
            f"{server.base_url}/v1/completions",
            json={"model": SERVED_NAMES[slug], "prompt": prompt, "max_tokens": 1, "prompt_logprobs": 0},
            timeout=300,
        ).json()
        return [next(iter(p.values()))["logprob"] for p in body["choices"][0]["prompt_logprobs"][1:]]

    with ThreadPoolExecutor(4) as pool:
        together = pool.submit(sample, 4, 100)
        time.sleep(0.5)  # the samples are generating when the scoring requests arrive
        scored = list(pool.map(prompt_logprobs, PROMPTS[5:]))
        together = together.result()
    alone = [sample(1, 100 + i)[0] for i in range(4)]
    assert together == alone, "a seeded sample is the same whether decoded alone or together with others"
    assert len({text for text, _ in alone}) > 1, "four different samples"
    for prompt, served in zip(PROMPTS[5:], scored):
        expected = _reference_logprobs(reference, reference.tokenize(prompt.encode(), add_bos=True, special=True))
        np.testing.assert_allclose(served, expected, atol=1e-4, err_msg=f"{slug}: {prompt!r}")


EXTRACTION_SCHEMA = {
    "type": "object",
    "properties": {
        "negation": {"enum": ["was", "wasn't"]},
        "assessment": {"enum": ["terrible", "bad", "good", "amazing"]},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["negation", "assessment", "confidence"],
    "additionalProperties": False,
}
ANSWERS = [
    "It wasn't bad at all.",
    "Honestly, it was terrible.",
    "I'd say it was good.",
    "It was amazing!",
    "It wasn't amazing, sorry.",
    "Well... it wasn't good.",
    "It was bad, to be honest.",
    "It wasn't terrible.",
    "Amazing work, it was amazing.",
    "Not good, it wasn't.",
]


def _llama_cpp_chain(reference: Llama, sampling: Sampling) -> LlamaSampler:
    """The chain the engine samples with, run by llama.cpp's `llama_sampler_sample` alone."""
    chain = LlamaSampler()
    if sampling.grammar:
        chain.add_grammar(reference._model, llama_cpp.LlamaGrammar.from_string(sampling.grammar, verbose=False))
    if sampling.temperature == 0:
        chain.add_greedy()
    else:
        chain.add_top_p(sampling.top_p, 1)
        chain.add_temp(sampling.temperature)
        chain.add_dist(sampling.seed)
    return chain


def test_greedy_sampling_under_a_grammar_picks_what_llama_cpp_picks(model_and_reference):
    """Greedy under a grammar, the engine checks the best token against the grammar first and applies the grammar to
    the whole vocabulary only when it refuses that token (`TokenSampler`). Token for token, it must pick what
    llama.cpp's `llama_sampler_sample` picks with the grammar applied to every token, through JSON the grammar forces
    (the best token refused) and JSON the model would write anyway (the best token taken); and the same for the
    paths that do not take the shortcut."""
    slug, _, reference = model_and_reference
    grammar = Engine.grammar_from_json_schema(EXTRACTION_SCHEMA)
    prompt = reference.tokenize(f"Extract the utterance as JSON: {ANSWERS[0]}\n".encode(), add_bos=True, special=True)
    for sampling in [
        Sampling(temperature=0, grammar=grammar),
        Sampling(temperature=0),
        Sampling(temperature=0.7, seed=3, grammar=grammar),
    ]:
        reference.reset()
        reference._ctx.kv_cache_clear()
        reference.eval(prompt)
        expected_chain, sampler = _llama_cpp_chain(reference, sampling), TokenSampler(reference._model, sampling)
        best_refused = best_taken = 0
        for _ in range(40):
            best = int(np.argmax(logits_row(reference._ctx, -1, reference.n_vocab())))
            expected = llama_cpp.llama_sampler_sample(expected_chain.sampler, reference._ctx.ctx, -1)
            token = sampler.sample(reference._ctx, -1)
            assert token == expected, (
                f"{slug}, temperature {sampling.temperature}, grammar: {bool(sampling.grammar)}: "
                f"{token} instead of llama.cpp's {expected}"
            )
            best_taken += best == token
            best_refused += best != token
            if llama_cpp.llama_vocab_is_eog(reference._model.vocab, token):
                break
            reference.eval([token])
        expected_chain.close()
        sampler.close()
        if sampling.grammar and sampling.temperature == 0:
            assert best_refused and best_taken, f"{slug}: both ways of greedy sampling under a grammar were exercised"


@pytest.mark.parametrize("slug", LOCAL_MODELS)
def test_json_schema_chat_output_validates_20_of_20(slug, servers, gemma_with_chat_template):
    server = gemma_with_chat_template if slug == "gemma3-270m" else servers(slug)
    valid = 0
    for i in range(20):
        answer = ANSWERS[i % len(ANSWERS)]
        response = httpx.post(
            f"{server.base_url}/v1/chat/completions",
            json={
                "model": SERVED_NAMES[slug],
                "messages": [{"role": "user", "content": f"Extract the utterance from this answer as JSON: {answer}"}],
                "max_tokens": 120,
                "temperature": 0.7,
                "seed": i,
                "response_format": {"type": "json_schema", "json_schema": {"name": "u", "schema": EXTRACTION_SCHEMA}},
            },
            timeout=120,
        )
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "stop", f"truncated: {choice['message']['content']!r}"
        jsonschema.validate(json.loads(choice["message"]["content"]), EXTRACTION_SCHEMA)
        valid += 1
    assert valid == 20


def test_chat_on_base_model_without_template_says_so(servers):
    server = servers("gemma3-270m")
    response = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json={"model": "gemma-3-270m", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.status_code == 400
    assert "no chat template" in response.json()["error"]["message"]


MALFORMED = [
    ("unknown model", {"model": "gpt-4", "prompt": "hi"}, 404, "does not exist"),
    ("missing prompt", {"model": "SmolLM2-135M-Instruct"}, 400, "prompt"),
    ("missing model", {"prompt": "hi"}, 400, "model"),
    ("negative max_tokens", {"model": "SmolLM2-135M-Instruct", "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    (
        "prompt_logprobs_start below 1",
        {
            "model": "SmolLM2-135M-Instruct",
            "prompt": "hi",
            "max_tokens": 1,
            "prompt_logprobs": 0,
            "prompt_logprobs_start": 0,
        },
        400,
        "prompt_logprobs_start: Input should be greater than or equal to 1",
    ),
    (
        "prompt longer than the context",
        {"model": "SmolLM2-135M-Instruct", "prompt": "word " * 9000, "max_tokens": 1},
        400,
        "maximum context length is 8192",
    ),
    (
        "token id outside the vocabulary",
        {"model": "SmolLM2-135M-Instruct", "prompt": [1, 2, 10**9]},
        400,
        "outside the vocabulary",
    ),
    ("empty prompt list", {"model": "SmolLM2-135M-Instruct", "prompt": []}, 400, "empty"),
    (
        "temperature out of range",
        {"model": "SmolLM2-135M-Instruct", "prompt": "a", "temperature": 9},
        400,
        "temperature",
    ),
    ("logprobs above 20", {"model": "SmolLM2-135M-Instruct", "prompt": "a", "logprobs": 50}, 400, "logprobs"),
]
MALFORMED_CHAT = [
    (
        "invalid json_schema",
        {
            "model": "SmolLM2-135M-Instruct",
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "banana"}}},
        },
        400,
        "invalid json_schema",
    ),
    (
        "json_schema without a schema",
        {
            "model": "SmolLM2-135M-Instruct",
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema"},
        },
        400,
        "needs a `json_schema`",
    ),
    ("unknown role", {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("no messages", {"model": "SmolLM2-135M-Instruct", "messages": []}, 400, "messages"),
    (
        "float-bounded json_schema",
        {
            "model": "SmolLM2-135M-Instruct",
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "object", "properties": {"p": {"type": "number", "minimum": 0.5}}},
                },
            },
        },
        400,
        "cannot enforce numeric bounds on non-integers",
    ),
    (
        "chat longer than the context without max_tokens",
        {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "word " * 9000}]},
        400,
        "maximum context length is 8192",
    ),
]
MALFORMED_OTHER = [
    (
        "tokenize with neither prompt nor messages",
        "POST",
        "/tokenize",
        {"model": "SmolLM2-135M-Instruct"},
        400,
        "exactly one",
    ),
    ("tokenize with a number for a prompt", "POST", "/tokenize", {"prompt": 5}, 400, "prompt"),
    ("detokenize outside the vocabulary", "POST", "/detokenize", {"tokens": [1, 10**9]}, 400, "outside the vocabulary"),
    ("detokenize without tokens", "POST", "/detokenize", {}, 400, "tokens"),
    ("wrong method", "GET", "/v1/completions", None, 405, "Method Not Allowed"),
    ("unknown route", "POST", "/v1/embeddings", {"input": "hi"}, 404, "Not Found"),
]


@pytest.mark.parametrize(
    "method,path,body,status,fragment",
    [("POST", "/v1/completions", *case[1:]) for case in MALFORMED]
    + [("POST", "/v1/chat/completions", *c[1:]) for c in MALFORMED_CHAT]
    + [case[1:] for case in MALFORMED_OTHER],
    ids=[c[0] for c in MALFORMED + MALFORMED_CHAT + MALFORMED_OTHER],
)
def test_malformed_request_gets_4xx_with_message(servers, method, path, body, status, fragment):
    server = servers("smollm2-135m")
    response = httpx.request(method, f"{server.base_url}{path}", json=body, timeout=60)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]
    assert server.healthy() and server.process.poll() is None


def test_bad_json_body_gets_400_and_server_keeps_serving(servers):
    server = servers("smollm2-135m")
    response = httpx.post(
        f"{server.base_url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "invalid request" in response.json()["error"]["message"]
    ok = httpx.post(
        f"{server.base_url}/v1/completions",
        json={"model": "SmolLM2-135M-Instruct", "prompt": "Hello", "max_tokens": 2},
        timeout=60,
    )
    assert ok.status_code == 200


def test_models_tokenize_detokenize_metrics(servers):
    server = servers("smollm2-135m")
    models = httpx.get(f"{server.base_url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["SmolLM2-135M-Instruct"]
    tokens = httpx.post(f"{server.base_url}/tokenize", json={"prompt": "It wasn't bad."}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    text = httpx.post(f"{server.base_url}/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text == "It wasn't bad."
    chat = httpx.post(f"{server.base_url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    rendered = httpx.post(f"{server.base_url}/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    assert rendered.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    metrics = httpx.get(f"{server.base_url}/metrics").text
    assert 'grace_server_requests_total{code="200",route="/tokenize"}' in metrics
    assert "grace_server_tokens_evaluated_total" in metrics


def test_generation_respects_stop_and_max_tokens(servers):
    server = servers("smollm2-135m")
    base = {"model": "SmolLM2-135M-Instruct", "prompt": "Count: 1, 2, 3, 4, 5,", "temperature": 0}
    limited = httpx.post(f"{server.base_url}/v1/completions", json={**base, "max_tokens": 3}, timeout=60).json()
    assert limited["choices"][0]["finish_reason"] == "length"
    assert limited["usage"]["completion_tokens"] == 3
    stopped = httpx.post(
        f"{server.base_url}/v1/completions", json={**base, "max_tokens": 30, "stop": ["8"]}, timeout=60
    ).json()
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert "8" not in stopped["choices"][0]["text"]
    same_seed = [
        httpx.post(
            f"{server.base_url}/v1/completions",
            json={**base, "temperature": 0.9, "seed": 7, "max_tokens": 8},
            timeout=60,
        ).json()["choices"][0]["text"]
        for _ in range(2)
    ]
    assert same_seed[0] == same_seed[1], "a seed makes sampling reproducible"
    chat = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Say hi."}], "temperature": 0}
    short = httpx.post(f"{server.base_url}/v1/chat/completions", json={**chat, "max_tokens": 64}, timeout=60).json()
    assert short["choices"][0]["finish_reason"] == "stop", "the answer ends before the limit"
    forced = httpx.post(
        f"{server.base_url}/v1/chat/completions", json={**chat, "max_tokens": 64, "ignore_eos": True}, timeout=60
    ).json()
    assert forced["usage"]["completion_tokens"] == 64, "ignore_eos generates to max_tokens, as on vLLM"
    assert limited["usage"]["total_tokens"] == limited["usage"]["prompt_tokens"] + 3
