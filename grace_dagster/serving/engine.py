"""The inference engine of the embedded server, over llama-cpp-python's low-level API.

Why not `Llama.create_completion`: its echo logprobs are shifted by one token for models without a BOS token, it
sorts the whole vocabulary in Python at every position, and `Llama.scores` copies the full context × vocabulary
matrix. Here every logits row is read once, straight from llama.cpp's output buffer, and reduced on the spot to what
the response needs (the token's log-probability, its rank if asked, the top-k if asked); rows of prompt positions the
request does not ask for (`prompt_logprobs_start`) are not computed at all.

Concurrent requests share the model by continuous batching, as vLLM and llama-server do: the context holds one KV
stream per slot (`n_slots` sequences, llama.cpp's non-unified cache), a scheduler thread evaluates each new prompt in
its slot and then decodes every generating sequence together, one token each per `decode` call; requests join
between steps and each sequence finishes on its own.

Exactness. Quantized CPU kernels are not batch-invariant (DESIGN section 6): the same token evaluated in a different
ubatch can get slightly different logits. So a prompt is always evaluated alone, in the ubatches it would go through
on an empty cache, and each slot has its own KV stream, so attention never sees another sequence's cells. A slot
keeps what it evaluated; a new prompt reuses the longest prefix it shares with a slot's cache (the answer options of
one question, the scenario of a trial), cut back to a ubatch boundary, so the rest still goes through the ubatches of
a lone evaluation and its scores equal single-prompt scores bit for bit. A lone evaluation's ubatches are 32 tokens
from the start, and the prompt's last turn (a chat) or last line (plain text) opens a new one (`evaluation_cuts`): a
question's context and each answer scored after it then share every ubatch but the answer's own. Only the decode steps
batch sequences together, one token per sequence each in its own stream; seeded samples come out the same tokens with
the same log-probabilities alone or batched (tests/test_server.py, both local models). The price of this rule: a
prompt is never evaluated in the same ubatch as other sequences' tokens, as llama-server does (see README,
Benchmarks); llama.cpp's non-unified cache would split such a batch anyway, one token per stream per ubatch.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from llama_cpp._internals import LlamaBatch, LlamaContext, LlamaSampler

# Tokens per llama.cpp ubatch. Small enough that a shared prefix cut at a ubatch boundary leaves little to
# re-evaluate per prompt; measured here to cost nothing in prompt throughput against 512.
N_UBATCH = 32
# Sequences served at once (KV streams). On 2 cores a decode step of four costs about twice one of a single sequence.
DEFAULT_SLOTS = 4


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
    ignore_eos: bool = False


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


def token_piece(vocab, token: int) -> bytes:
    """A token's text as llama.cpp writes it (special tokens included)."""
    size = 64
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, True)
        if n >= 0:
            return buf.raw[:n]
        size = -n


def evaluation_cuts(prompt: list[int], vocab, n_ubatch: int) -> list[int]:
    """Where the ubatches of a prompt's lone evaluation end: every `n_ubatch` tokens, counting again from the start of
    the prompt's last turn (right after its last turn-opening token: a control token other than the first token and
    other than an end-of-generation token, e.g. ChatML's <|im_start|> or Gemma's <start_of_turn>) or, in a prompt
    without turns, of its last line (right after its last token holding a line break, the final token aside).

    The restart is placed by the prompt alone, so a prompt's numbers never depend on what else is served. A question's
    context and every answer scored after it share it (the assistant's header of a chat, the answer cue's line of
    plain text), so each answer evaluates only that and its own tokens; without it the context's end past its last
    32-token boundary would be evaluated again with every answer."""

    def after_last(wanted) -> int | None:
        return next((i + 1 for i in range(len(prompt) - 2, 0, -1) if wanted(prompt[i])), None)

    restart = after_last(
        lambda t: llama_cpp.llama_vocab_is_control(vocab, t) and not llama_cpp.llama_vocab_is_eog(vocab, t)
    ) or after_last(lambda t: b"\n" in token_piece(vocab, t))
    starts = [0] if restart is None else [0, restart]
    cuts = []
    for start, end in zip(starts, [*starts[1:], len(prompt)]):
        cuts.extend(range(start + n_ubatch, end, n_ubatch))
        cuts.append(end)
    return cuts


def logits_row(ctx: LlamaContext, index: int, n_vocab: int) -> np.ndarray:
    """Output row `index` of the context's last decode, read in place from llama.cpp's buffer (valid until the next
    decode)."""
    return np.ctypeslib.as_array(ctx.get_logits_ith(index), shape=(n_vocab,))


class TokenSampler:
    """A sequence's llama.cpp sampler chain: the grammar if any, then top-p, temperature and a seeded draw, or greedy.

    Greedy under a grammar (the judge's and the extraction's JSON): the best token is checked against the grammar
    alone first, and the chain, which applies the grammar to every token of the vocabulary, runs only if the grammar
    refuses it, as llama.cpp's own common sampler does. The best token, when the grammar allows it, is also the best
    allowed token, so the choice is the chain's; checking the whole vocabulary costs about 5 ms per generated token
    for SmolLM2's 49k tokens and 23 ms for Gemma's 262k on this project's 2-core test machine, checking one costs
    nothing."""

    def __init__(self, model, sampling: Sampling):
        self.chain = LlamaSampler()
        self.n_vocab = model.n_vocab()
        self.grammar = None
        if sampling.grammar:
            self.chain.add_grammar(model, llama_cpp.LlamaGrammar.from_string(sampling.grammar, verbose=False))
            self.grammar = llama_cpp.llama_sampler_chain_get(self.chain.sampler, 0)
        if sampling.temperature == 0:
            self.chain.add_greedy()
        else:
            self.chain.add_top_p(sampling.top_p, 1)
            self.chain.add_temp(sampling.temperature)
            seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(4), "little")
            self.chain.add_dist(seed & 0xFFFFFFFF)
        self.best_first = self.grammar is not None and sampling.temperature == 0

    def sample(self, ctx: LlamaContext, index: int) -> int:
        """The next token from output row `index` of the context's last decode."""
        if self.best_first:
            row = logits_row(ctx, index, self.n_vocab)
            best = int(np.argmax(row))  # the first best token, as llama.cpp's greedy sampler picks
            if self._grammar_allows(best, float(row[best])):
                llama_cpp.llama_sampler_accept(self.chain.sampler, best)
                return best
        return llama_cpp.llama_sampler_sample(self.chain.sampler, ctx.ctx, index)

    def _grammar_allows(self, token: int, logit: float) -> bool:
        candidate = llama_cpp.llama_token_data(id=token, logit=logit, p=0.0)
        candidates = llama_cpp.llama_token_data_array(data=ctypes.pointer(candidate), size=1, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(candidates))
        return math.isfinite(candidate.logit)  # the grammar sets a refused token's logit to -inf

    def close(self) -> None:
        self.chain.close()


def _common_prefix_length(prompts: list[list[int]]) -> int:
    first = prompts[0]
    n = min(len(p) for p in prompts)
    for i in range(n):
        if any(p[i] != first[i] for p in prompts[1:]):
            return i
    return n


@dataclass
class Sequence:
    """One prompt of a request, scored and/or continued, and its progress."""

    prompt: list[int]
    cuts: list[int]  # evaluation_cuts(prompt)
    prompt_logprobs: bool
    score_from: int  # the first position scored; the logits rows of earlier positions are not even computed
    top_k: int | None
    want_rank: bool
    sampling: Sampling
    sampler: TokenSampler
    job: Job
    scores: list[PositionLogprobs | None] = field(default_factory=list)  # positions 1.., None where not scored
    output: list[int] = field(default_factory=list)
    output_logprobs: list[PositionLogprobs] = field(default_factory=list)
    raw: bytes = b""
    result: Result | None = None

    @property
    def score_key(self) -> tuple:
        return self.top_k, self.want_rank

    def scored(self, position: int) -> bool:
        return self.prompt_logprobs and self.score_from <= position < len(self.prompt)

    def score(self, position: int, row: np.ndarray) -> PositionLogprobs:
        """Position `position`'s scores from the logits row of the position before it."""
        return _position_logprobs(row, self.prompt[position], self.top_k, self.want_rank)

    def finish(self, reason: str, text: str | None = None) -> None:
        self.result = Result(
            prompt_ids=self.prompt,
            prompt_logprobs=[None, *self.scores] if self.prompt_logprobs else None,
            output_ids=self.output,
            output_text=self.raw.decode("utf-8", errors="ignore") if text is None else text,
            output_logprobs=self.output_logprobs,
            finish_reason=reason,
        )
        self.sampler.close()
        self.job.sequence_done()


class Job:
    """The sequences of one request; `future` gets their results in order once all are done."""

    def __init__(self):
        self.sequences: list[Sequence] = []
        self.future: Future[list[Result]] = Future()
        self.cancelled = False
        self._remaining = 0

    def cancel(self) -> None:
        """The client is gone: pending sequences are dropped and running ones stop at the next step."""
        self.cancelled = True

    def sequence_done(self) -> None:
        self._remaining -= 1
        if self._remaining == 0 and not self.future.done():
            self.future.set_result([s.result for s in self.sequences])

    def fail(self, error: BaseException) -> None:
        self.cancelled = True
        if not self.future.done():
            self.future.set_exception(error)


@dataclass
class Slot:
    """One KV stream of the context and what it holds, kept after its sequence finishes for the next to reuse."""

    id: int
    tokens: list[int] = field(default_factory=list)  # the stream's cells, position by position
    cuts: list[int] = field(default_factory=list)  # where the prompt ubatches that evaluated them ended
    scores: list[PositionLogprobs | None] = field(default_factory=list)  # scores of tokens[1:], None: not scored
    score_key: tuple | None = None
    rows: dict[int, np.ndarray] = field(default_factory=dict)  # logits rows kept at ubatch ends, by position
    sequence: Sequence | None = None
    next_token: int | None = None  # sampled, to be decoded at position len(tokens)
    last_used: int = 0

    def truncate(self, n: int) -> None:
        del self.tokens[n:]
        self.cuts = [c for c in self.cuts if c <= n]
        del self.scores[max(n - 1, 0) :]
        self.rows = {p: r for p, r in self.rows.items() if p < n}


class Engine:
    """One GGUF model loaded in llama.cpp, serving `n_slots` sequences at once from a scheduler thread.

    `submit` is thread-safe; tokenization, detokenization and chat rendering touch only the vocabulary and may run
    on any thread.
    """

    def __init__(
        self,
        model_path: Path,
        n_ctx: int,
        chat_template: str | None = None,
        n_threads: int | None = None,
        n_slots: int = DEFAULT_SLOTS,
        n_ubatch: int = N_UBATCH,
    ):
        self.llm = load_without_weight_repacking(
            model_path=str(model_path),
            n_ctx=n_ubatch,  # this context is replaced below
            n_batch=n_ubatch,  # each decode is one ubatch (evaluation_cuts) or one token per slot
            n_ubatch=n_ubatch,
            # The cores this process may use (a container's share, not the host's count).
            n_threads=n_threads or len(os.sched_getaffinity(0)),
            logits_all=False,
            verbose=False,
        )
        self.llm._ctx.close()
        self.model = self.llm._model
        # Llama's own context parameters (those of the tests' reference evaluation), with one KV stream per slot of
        # n_ctx cells each.
        params = llama_cpp.llama_context_params.from_buffer_copy(self.llm.context_params)
        params.n_ctx = n_ctx * n_slots
        params.n_seq_max = n_slots
        params.kv_unified = False
        self.ctx = LlamaContext(model=self.model, params=params, verbose=False)
        self.vocab = self.model.vocab
        self.n_ctx = self.ctx.n_ctx() // n_slots
        self.n_ubatch = n_ubatch
        self.n_vocab = self.model.n_vocab()
        self.batch = LlamaBatch(n_tokens=max(n_ubatch, n_slots), embd=0, n_seq_max=1)
        self.tokens_evaluated = 0
        self.logits_rows = 0
        self.tokens_generated = 0
        self._pieces: dict[int, bytes] = {}
        template = chat_template or self.llm.metadata.get("tokenizer.chat_template")
        self.chat_template = (
            ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
            if template
            else None
        )
        self.slots = [Slot(i) for i in range(n_slots)]
        self._pending: deque[Sequence] = deque()
        self._wake = threading.Condition()
        self._clock = 0
        threading.Thread(target=self._serve, daemon=True, name="engine-scheduler").start()

    # Tokens and text

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        # Special-token text (e.g. "<|im_end|>") is parsed as the special token, as Hugging Face tokenizers do.
        return self.model.tokenize(text.encode("utf-8"), add_special, True)

    def piece(self, token: int) -> bytes:
        cached = self._pieces.get(token)
        if cached is None:
            cached = self._pieces[token] = token_piece(self.vocab, token)
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

    # Requests

    def submit(
        self,
        prompts: list[tuple[list[int], Sampling]],
        prompt_logprobs: bool,
        top_k: int | None,
        want_rank: bool,
        score_from: int = 1,
    ) -> Job:
        """Queue one request: each prompt scored (if `prompt_logprobs`) from position `score_from` on and continued with
        its own sampling. A scorer that needs only an answer's tokens after a context skips the context's positions:
        their logits rows are not computed (for Gemma's 262k-token vocabulary, a row costs more than the rest of the
        model), and the rows that are computed come out the same, bit for bit, as when every row is.

        Prompts are checked here, on the caller's thread, so a bad request fails before it waits for the engine."""
        for prompt, sampling in prompts:
            if not prompt:
                raise EngineError("a prompt is empty: nothing to evaluate")
            self.check_token_ids(prompt)
            if len(prompt) + sampling.max_tokens > self.n_ctx:
                raise EngineError(
                    f"This model's maximum context length is {self.n_ctx} tokens. However, you requested "
                    f"{len(prompt) + sampling.max_tokens} tokens ({len(prompt)} in the prompt, "
                    f"{sampling.max_tokens} for the completion). Shorten the prompt or lower max_tokens."
                )
        job = Job()
        for prompt, sampling in prompts:
            sampler = TokenSampler(self.model, sampling)
            cuts = evaluation_cuts(prompt, self.vocab, self.n_ubatch)
            job.sequences.append(
                Sequence(prompt, cuts, prompt_logprobs, max(score_from, 1), top_k, want_rank, sampling, sampler, job)
            )
        job._remaining = len(job.sequences)
        if not job.sequences:
            job.future.set_result([])
        with self._wake:
            self._pending.extend(job.sequences)
            self._wake.notify()
        return job

    def _serve(self) -> None:
        """The scheduler: admit waiting prompts into free slots, then one decode step for all generating slots."""
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._pending or any(s.sequence for s in self.slots))
            for slot in self.slots:
                if slot.sequence is not None and slot.sequence.job.cancelled:
                    slot.sequence.sampler.close()
                    slot.sequence = slot.next_token = None
            while True:
                slot = next((s for s in self.slots if s.sequence is None), None)
                with self._wake:
                    sequence = self._pending.popleft() if self._pending and slot is not None else None
                if sequence is None:
                    break
                if not sequence.job.cancelled:
                    try:
                        self._admit(sequence)
                    except Exception as e:  # noqa: BLE001 - the request learns why; the engine serves on
                        sequence.job.fail(e)
                        self._fail([s for s in self.slots if s.sequence is sequence], e)
            generating = [s for s in self.slots if s.sequence is not None]
            if generating:
                try:
                    self._step(generating)
                except Exception as e:  # noqa: BLE001 - every request in the step learns why
                    self._fail(generating, e)

    def _fail(self, slots: list[Slot], error: Exception) -> None:
        """Fail the requests of these slots and empty the slots, whose caches are no longer known to be right."""
        for slot in slots:
            if slot.sequence is not None:
                slot.sequence.job.fail(error)
            self.ctx.kv_cache_seq_rm(slot.id, 0, -1)
            slot.truncate(0)
            slot.sequence = slot.next_token = None

    # Slots and prefix reuse

    def _reusable(self, slot: Slot, sequence: Sequence) -> int:
        """How many leading tokens of the sequence's prompt the slot's cache can stand in for, exactly: up to where the
        slot's evaluation and the prompt's lone one went through the same ubatches, within their common prefix, short
        of the prompt's last token (whose evaluation yields the row generation starts from). A scored prompt also needs
        the slot's scores of that prefix and the logits row at its end."""
        limit = min(_common_prefix_length([slot.tokens, sequence.prompt]), len(sequence.prompt) - 1)
        same_ubatches = sequence.cuts[: _common_prefix_length([slot.cuts, sequence.cuts])]
        for n in reversed(same_ubatches):
            if n > limit:
                continue
            if not sequence.prompt_logprobs:
                return n
            if slot.score_key == sequence.score_key and (n - 1) in slot.rows and len(slot.scores) >= n - 1:
                if all(slot.scores[p - 1] is not None for p in range(sequence.score_from, n)):
                    return n
        return 0

    def _admit(self, sequence: Sequence) -> None:
        """Evaluate the prompt in a free slot, reusing the longest exact prefix any slot holds, and sample."""
        reusable = {s.id: self._reusable(s, sequence) for s in self.slots}
        free = [s for s in self.slots if s.sequence is None]
        slot = max(free, key=lambda s: (reusable[s.id], -s.last_used))
        slot.sequence = sequence
        reuse = reusable[slot.id]
        source = max(self.slots, key=lambda s: reusable[s.id])
        if source is not slot and reusable[source.id] >= reuse + 2 * self.n_ubatch:
            # A running sequence's stream holds more of the prompt (the other samples of one request): copy the
            # whole stream (llama.cpp copies across streams only whole) rather than evaluate the prefix again.
            self.ctx.kv_cache_seq_cp(source.id, slot.id, -1, -1)
            reuse = reusable[source.id]
            slot.tokens, slot.cuts = list(source.tokens), list(source.cuts)
            slot.scores, slot.score_key, slot.rows = list(source.scores), source.score_key, dict(source.rows)
        self._clock += 1
        slot.last_used = self._clock
        self.ctx.kv_cache_seq_rm(slot.id, reuse, -1)
        slot.truncate(reuse)
        prompt = sequence.prompt
        if sequence.prompt_logprobs:
            # What the slot holds of positions this request does not ask for is not reported either.
            sequence.scores = [s if sequence.scored(p) else None for p, s in enumerate(slot.scores, start=1)]
            if reuse:
                sequence.scores.append(sequence.score(reuse, slot.rows[reuse - 1]) if sequence.scored(reuse) else None)
            slot.score_key = sequence.score_key
        start = reuse
        for end in (c for c in sequence.cuts if c > reuse):
            # The rows wanted: each scored position's predecessor; a scored prompt's ubatch end (kept for a later
            # prompt that shares this prefix: its first own token is scored there); the prompt's end (generation).
            rows = [
                p
                for p in range(start, end)
                if sequence.scored(p + 1) or (p + 1 == end and (sequence.prompt_logprobs or end == len(prompt)))
            ]
            # One decode per ubatch: llama.cpp would cut a longer batch every n_ubatch tokens, not at the turn.
            self._decode([(prompt[p], p, slot.id) for p in range(start, end)], [p - start for p in rows])
            slot.tokens.extend(prompt[start:end])
            if sequence.prompt_logprobs:
                for p in range(start + 1, min(end + 1, len(prompt))):
                    sequence.scores.append(sequence.score(p, self._row(p - 1 - start)) if sequence.scored(p) else None)
                slot.rows[end - 1] = self._row(end - 1 - start).copy()
            start = end
        slot.cuts = list(sequence.cuts)
        if sequence.prompt_logprobs:
            slot.scores = list(sequence.scores)
        self._next(slot, -1)

    # Evaluation

    def _decode(self, entries: list[tuple[int, int, int]], rows: list[int]) -> None:
        """One llama.cpp decode of (token, position, slot) entries, computing the logits rows of the entries at the
        indices `rows` only."""
        batch = self.batch.batch
        wanted = set(rows)
        for i, (token, position, seq_id) in enumerate(entries):
            batch.token[i], batch.pos[i] = token, position
            batch.seq_id[i][0], batch.n_seq_id[i] = seq_id, 1
            batch.logits[i] = i in wanted
        batch.n_tokens = len(entries)
        self.ctx.decode(self.batch)
        self.tokens_evaluated += len(entries)
        self.logits_rows += len(wanted)

    def _row(self, index: int) -> np.ndarray:
        return logits_row(self.ctx, index, self.n_vocab)

    def _step(self, generating: list[Slot]) -> None:
        """One token for every generating slot in one decode, each slot's token in its own stream."""
        self._decode([(s.next_token, len(s.tokens), s.id) for s in generating], list(range(len(generating))))
        for index, slot in enumerate(generating):
            slot.tokens.append(slot.next_token)
            self._next(slot, index)

    def _next(self, slot: Slot, index: int) -> None:
        """Sample the slot's next token from output row `index`; finish the sequence or queue the token."""
        sequence, sampling = slot.sequence, slot.sequence.sampling
        slot.next_token = None
        if len(sequence.output) >= sampling.max_tokens or len(slot.tokens) >= self.n_ctx:
            slot.sequence = None
            return sequence.finish("length")
        token = sequence.sampler.sample(self.ctx, index)
        if sampling.logprobs is not None:
            sequence.output_logprobs.append(_position_logprobs(self._row(index), token, sampling.logprobs, False))
        if llama_cpp.llama_vocab_is_eog(self.vocab, token) and not sampling.ignore_eos:
            slot.sequence = None
            return sequence.finish("stop")
        sequence.output.append(token)
        self.tokens_generated += 1
        sequence.raw += self.piece(token)
        text = sequence.raw.decode("utf-8", errors="ignore")
        hit = min((text.find(s) for s in sampling.stop if s in text), default=-1)
        if hit >= 0:
            slot.sequence = None
            return sequence.finish("stop", text[:hit])
        if len(sequence.output) >= sampling.max_tokens:
            slot.sequence = None
            return sequence.finish("length")
        slot.next_token = token


def _position_logprobs(row: np.ndarray, token: int, top_k: int | None, want_rank: bool) -> PositionLogprobs:
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
