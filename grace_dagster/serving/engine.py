"""The inference engine of the embedded server, over llama-cpp-python's low-level API.

Why not `Llama.create_completion`: its echo logprobs are shifted by one token for models without a BOS token, it
sorts the whole vocabulary in Python at every position, and `Llama.scores` copies the full context × vocabulary
matrix. Here every logits row is read once, straight from llama.cpp's output buffer, and reduced on the spot to what
the response needs (the token's log-probability, its rank, the top-k).

Prompts of one request that share a prefix (the answer options of one trial) evaluate that prefix once, up to a
ubatch boundary; each prompt then evaluates only the rest after the KV cache is cut back. Quantized CPU kernels are
not batch-invariant (DESIGN section 6), so the cut is placed where a prompt evaluated alone would be split anyway:
shared-prefix scores equal single-prompt scores exactly. Every request starts from an empty cache, so results do
not depend on earlier requests.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from llama_cpp._internals import LlamaBatch, LlamaSampler

# Tokens per llama.cpp ubatch. Small enough that a shared prefix cut at a ubatch boundary leaves little to
# re-evaluate per prompt; measured here to cost nothing in prompt throughput against 512.
N_UBATCH = 32


def load_without_weight_repacking(**kwargs) -> llama_cpp.Llama:
    """llama.cpp repacks quantized weights into CPU-specific layouts by default; on this project's AVX-512 test machine
    a fresh build's repacked kernels killed the server on its first pipeline request (general protection fault in
    libggml-cpu, in the kernel log). The plain layout is the one the exactness tests were measured with.
    llama-cpp-python 0.3.36's `Llama` takes no `use_extra_bufts` argument, so its default model parameters are
    swapped for the one constructor call (the server loads one model, once, at start)."""
    default_params = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = default_params()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params
    try:
        return llama_cpp.Llama(**kwargs)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = default_params


class EngineError(ValueError):
    """A request the model cannot serve as asked (too long, bad token ids, bad schema): the client's to fix."""


@dataclass
class PositionLogprobs:
    """Log-probabilities for one prompt or generated position."""

    logprob: float
    rank: int | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    grammar: str | None = None  # GBNF
    logprobs: int | None = None  # top-k for generated tokens; None: no logprobs


@dataclass
class Result:
    prompt_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None  # None at position 0
    output_ids: list[int]
    output_text: str
    output_logprobs: list[PositionLogprobs]
    finish_reason: str  # "stop" | "length"


# llama-cpp-python's schema-to-grammar converter ignores numeric bounds; a bounded integer range this small is
# enforced exactly as an enum of its values instead.
MAX_ENUMERATED_RANGE = 1000
_UNENFORCEABLE = ("exclusiveMinimum", "exclusiveMaximum", "multipleOf")


def _enforceable(schema):
    """Rewrite a JSON schema so that every constraint in it is enforced by the grammar, or refuse it."""
    if isinstance(schema, list):
        return [_enforceable(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _enforceable(value) for key, value in schema.items()}
    bounded = "minimum" in out or "maximum" in out
    if out.get("type") == "integer" and bounded:
        low, high = out.get("minimum"), out.get("maximum")
        if low is None or high is None or high - low > MAX_ENUMERATED_RANGE:
            raise EngineError(
                "the embedded server enforces integer bounds only as a closed range of at most "
                f"{MAX_ENUMERATED_RANGE} values (give both minimum and maximum)"
            )
        rest = {k: v for k, v in out.items() if k not in ("type", "minimum", "maximum")}
        return {**rest, "enum": list(range(int(math.ceil(low)), int(math.floor(high)) + 1))}
    if bounded or any(key in out for key in _UNENFORCEABLE):
        raise EngineError(
            "the embedded server cannot enforce numeric bounds on non-integers "
            f"({', '.join(k for k in ('minimum', 'maximum', *_UNENFORCEABLE) if k in out)}); drop them from the schema"
        )
    return out


def _common_prefix_length(prompts: list[list[int]]) -> int:
    first = prompts[0]
    n = min(len(p) for p in prompts)
    for i in range(n):
        if any(p[i] != first[i] for p in prompts[1:]):
            return i
    return n


class Engine:
    """One GGUF model loaded in llama.cpp. Not thread-safe: the server (`app.in_engine`) runs one call at a time."""

    def __init__(
        self,
        model_path: Path,
        n_ctx: int,
        chat_template: str | None = None,
        n_threads: int | None = None,
        n_batch: int = 512,
        n_ubatch: int = N_UBATCH,
    ):
        self.llm = load_without_weight_repacking(
            model_path=str(model_path),
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_ubatch=n_ubatch,
            # The cores this process may use (a container's share, not the host's count).
            n_threads=n_threads or len(os.sched_getaffinity(0)),
            logits_all=False,
            verbose=False,
        )
        self.model = self.llm._model
        self.ctx = self.llm._ctx
        self.vocab = self.model.vocab
        self.n_ctx = self.llm.n_ctx()
        self.n_batch = n_batch
        self.n_ubatch = n_ubatch
        self.n_vocab = self.model.n_vocab()
        self.batch = LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1)
        self.tokens_evaluated = 0
        self._pieces: dict[int, bytes] = {}
        template = chat_template or self.llm.metadata.get("tokenizer.chat_template")
        self.chat_template = (
            ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
            if template
            else None
        )

    # Tokens and text

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        # Special-token text (e.g. "<|im_end|>") is parsed as the special token, as Hugging Face tokenizers do.
        return self.model.tokenize(text.encode("utf-8"), add_special, True)

    def piece(self, token: int) -> bytes:
        cached = self._pieces.get(token)
        if cached is None:
            size = 64
            while True:
                buf = ctypes.create_string_buffer(size)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, size, 0, True)
                if n >= 0:
                    break
                size = -n
            cached = self._pieces[token] = buf.raw[:n]
        return cached

    def token_text(self, token: int) -> str:
        return self.piece(token).decode("utf-8", errors="replace")

    def detokenize(self, tokens: list[int]) -> str:
        self.check_token_ids(tokens)
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def check_token_ids(self, tokens: list[int]) -> None:
        bad = [t for t in tokens if not 0 <= t < self.n_vocab]
        if bad:
            raise EngineError(f"token ids {bad[:5]} are outside the vocabulary (0..{self.n_vocab - 1})")

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise EngineError(
                "this model has no chat template (it is a base model): use /v1/completions with plain text, "
                "or name a chat_template for it in the registry"
            )

        def raise_exception(message: str):
            raise EngineError(f"the chat template refused the conversation: {message}")

        return self.chat_template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.token_text(self.model.token_bos()),
            eos_token=self.token_text(self.model.token_eos()),
            raise_exception=raise_exception,
        )

    @staticmethod
    def grammar_from_json_schema(schema: dict) -> str:
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        try:
            return json_schema_to_gbnf(json.dumps(_enforceable(schema)))
        except Exception as e:  # the converter raises bare Exceptions and KeyErrors on bad schemas
            raise EngineError(f"invalid json_schema: {type(e).__name__}: {e}") from None

    # Evaluation

    def _decode(self, tokens: list[int], start: int, all_logits: bool) -> None:
        self.batch.set_batch(tokens, start, all_logits)
        self.ctx.decode(self.batch)
        self.tokens_evaluated += len(tokens)

    def _row(self, index: int) -> np.ndarray:
        return np.ctypeslib.as_array(self.ctx.get_logits_ith(index), shape=(self.n_vocab,))

    @staticmethod
    def _logprobs(row: np.ndarray, token: int, top_k: int | None, want_rank: bool) -> PositionLogprobs:
        peak = float(row.max())
        log_norm = peak + float(np.log(np.sum(np.exp(row - peak), dtype=np.float64)))
        result = PositionLogprobs(logprob=float(row[token]) - log_norm)
        if want_rank:
            result.rank = int(np.count_nonzero(row > row[token])) + 1
        if top_k:
            top = np.argpartition(row, -top_k)[-top_k:]
            top = top[np.argsort(-row[top], kind="stable")]
            result.top = [(int(t), float(row[t]) - log_norm) for t in top]
        return result

    def _evaluate(
        self, tokens: list[int], start: int, next_tokens: list[int], top_k: int | None, want_rank: bool
    ) -> list[PositionLogprobs]:
        """Evaluate `tokens` at positions start.., scoring each position's row against `next_tokens[i]`.

        Afterwards the context's last output row predicts the token after `tokens`.
        """
        scores: list[PositionLogprobs] = []
        want_rows = bool(next_tokens)
        for offset in range(0, len(tokens), self.n_batch):
            chunk = tokens[offset : offset + self.n_batch]
            self._decode(chunk, start + offset, want_rows)
            if want_rows:
                for i in range(len(chunk)):
                    k = offset + i
                    if k < len(next_tokens):
                        scores.append(self._logprobs(self._row(i), next_tokens[k], top_k, want_rank))
        return scores

    def run(
        self, prompts: list[list[int]], prompt_logprobs: bool, top_k: int | None, sampling: Sampling
    ) -> list[Result]:
        """Score and/or continue each prompt."""
        for prompt in prompts:
            if not prompt:
                raise EngineError("a prompt is empty: nothing to evaluate")
            self.check_token_ids(prompt)
            if len(prompt) + sampling.max_tokens > self.n_ctx:
                raise EngineError(
                    f"This model's maximum context length is {self.n_ctx} tokens. However, you requested "
                    f"{len(prompt) + sampling.max_tokens} tokens ({len(prompt)} in the prompt, "
                    f"{sampling.max_tokens} for the completion). Shorten the prompt or lower max_tokens."
                )
        want_rank = prompt_logprobs
        n_shared = self._aligned_shared_prefix(prompts)
        self.ctx.kv_cache_clear()
        shared_scores: list[PositionLogprobs] = []
        last_row = None
        if n_shared:
            prefix = prompts[0][:n_shared]
            shared_scores = self._evaluate(prefix, 0, prefix[1:] if prompt_logprobs else [], top_k, want_rank)
            # Kept because each prompt's own evaluation overwrites the output buffer it lives in.
            last_row = self._row(-1).copy()
        results: list[Result] = []
        for prompt in prompts:
            self.ctx.kv_cache_seq_rm(0, n_shared, -1)
            scores = list(shared_scores)
            rest = prompt[n_shared:]  # never empty: see _aligned_shared_prefix
            if prompt_logprobs and last_row is not None:
                scores.append(self._logprobs(last_row, rest[0], top_k, want_rank))
            scores.extend(self._evaluate(rest, n_shared, rest[1:] if prompt_logprobs else [], top_k, want_rank))
            output_ids, text, output_logprobs, finish = self._generate(len(prompt), sampling)
            results.append(
                Result(
                    prompt_ids=prompt,
                    prompt_logprobs=[None, *scores] if prompt_logprobs else None,
                    output_ids=output_ids,
                    output_text=text,
                    output_logprobs=output_logprobs,
                    finish_reason=finish,
                )
            )
        return results

    def _aligned_shared_prefix(self, prompts: list[list[int]]) -> int:
        """How many leading tokens to evaluate once for all prompts: their common prefix, cut back to a ubatch
        boundary and short of the shortest prompt.

        llama.cpp evaluates a batch in ubatches of `n_ubatch` tokens, and quantized CPU kernels give slightly
        different logits for the same token in a different ubatch. Cutting the shared part at a ubatch boundary
        makes every prompt's remaining tokens go through exactly the ubatches they would if the prompt were
        evaluated alone, so a shared-prefix score equals a single-prompt score bit for bit. Each prompt keeps at
        least one token of its own, whose evaluation yields the row its generation starts from.
        """
        common = _common_prefix_length(prompts) if len(prompts) > 1 else len(prompts[0])
        shortest = min(len(p) for p in prompts)
        return (min(common, shortest - 1) // self.n_ubatch) * self.n_ubatch

    def _sampler(self, sampling: Sampling) -> LlamaSampler:
        sampler = LlamaSampler()
        if sampling.grammar:
            grammar = llama_cpp.LlamaGrammar.from_string(sampling.grammar, verbose=False)
            sampler.add_grammar(self.model, grammar)
        if sampling.temperature == 0:
            sampler.add_greedy()
        else:
            sampler.add_top_p(sampling.top_p, 1)
            sampler.add_temp(sampling.temperature)
            seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(4), "little")
            sampler.add_dist(seed & 0xFFFFFFFF)
        return sampler

    def _generate(self, position: int, sampling: Sampling) -> tuple[list[int], str, list[PositionLogprobs], str]:
        """Sample up to max_tokens after a prompt whose last logits row is the context's last output."""
        if sampling.max_tokens == 0:
            return [], "", [], "length"
        sampler = self._sampler(sampling)
        output: list[int] = []
        logprobs: list[PositionLogprobs] = []
        raw = b""
        finish = "length"
        while len(output) < sampling.max_tokens and position < self.n_ctx:
            row = self._row(-1)
            token = llama_cpp.llama_sampler_sample(sampler.sampler, self.ctx.ctx, -1)
            if sampling.logprobs is not None:
                logprobs.append(self._logprobs(row, token, sampling.logprobs, False))
            if llama_cpp.llama_vocab_is_eog(self.vocab, token):
                finish = "stop"
                break
            output.append(token)
            raw += self.piece(token)
            text = raw.decode("utf-8", errors="ignore")
            hit = min((text.find(s) for s in sampling.stop if s in text), default=-1)
            if hit >= 0:
                return output, text[:hit], logprobs, "stop"
            if len(output) < sampling.max_tokens:
                self._decode([token], position, False)
                position += 1
        return output, raw.decode("utf-8", errors="ignore"), logprobs, finish
