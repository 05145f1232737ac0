"""How far llama.cpp's numbers for a prompt move when it is evaluated in another batch layout: the measurement behind
the embedded server's rule that a prompt is evaluated alone, in fixed 32-token ubatches, and only decode steps are
batched across sequences (grace_dagster/serving/engine.py), and behind the layouts it does not use.

    .venv/bin/python -m benchmarks.bench_batch_invariance [--models smollm2-135m gemma3-270m]

For each local model, the first study 2 question's chat (as Experiment 2 scores it: the context up to the assistant's
turn, and the reply forms of its first answer, each closed by the template's end of turn) is evaluated in the
layouts below, each against its reference layout on the same context configuration. Reported per layout: the
largest difference over every logit of every compared row (`max_abs_logit`) and over the log-probabilities a scorer
reads, those of the prompt's own next tokens (`max_abs_logprob`, natural log); 0 means bit for bit.

Layouts (reference in brackets):
- `ubatch_1`, `ubatch_8`, `ubatch_512`: the prompt (context and one reply) in ubatches of that many tokens [32];
- `replies_together`: after the context, each in its own sequence, the replies' tokens in one decode call [each
  reply decoded alone after the context];
- `prompt_beside_decodes`: each 32-token ubatch of the prompt in one call with the next token of three other
  sequences, as llama-server batches a new prompt with running answers [the prompt's ubatches alone];
- `decodes_beside_prompt`: those three sequences' rows from the same calls [a decode step of the three alone].

Context configurations: `server` is the embedded server's (one KV stream per sequence, flash attention off);
`flash_attention` turns flash attention on; `flash_attention_unified` also puts every sequence in one shared KV cache,
as llama-server does. A call holds up to 512 tokens (n_ubatch 512): llama.cpp splits it only where one KV stream per
sequence makes it (one ubatch per step of the streams' tokens).
Results: benchmarks/results/batch_invariance.json.
"""

from __future__ import annotations

import argparse
import json
import sys

import llama_cpp
import numpy as np
from llama_cpp._internals import LlamaBatch, LlamaContext

from benchmarks.common import REPO, machine
from grace_dagster.llm import prompting
from grace_dagster.registry import load_registry
from grace_dagster.resources import ExperimentSettings
from grace_dagster.serving.engine import N_UBATCH, Engine, _position_logprobs, logits_row
from grace_dagster.serving.weights import gguf_path
from grace_dagster.studies import STUDIES

RESULTS = REPO / "benchmarks" / "results" / "batch_invariance.json"
MODELS = ["smollm2-135m", "gemma3-270m"]
CONFIGURATIONS = {
    "server": {"flash_attention": False, "unified": False},
    "flash_attention": {"flash_attention": True, "unified": False},
    "flash_attention_unified": {"flash_attention": True, "unified": True},
}
SEQUENCES = 4
CALL_TOKENS = 512


class Evaluator:
    """A llama.cpp context of one configuration; each `decode` is one call, one ubatch, its rows copied out."""

    def __init__(self, engine: Engine, n_ctx: int, flash_attention: bool, unified: bool):
        params = llama_cpp.llama_context_params.from_buffer_copy(engine.llm.context_params)
        params.n_ctx = n_ctx * SEQUENCES
        params.n_seq_max = SEQUENCES
        params.n_batch = params.n_ubatch = CALL_TOKENS
        params.kv_unified = unified
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attention else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        self.ctx = LlamaContext(model=engine.model, params=params, verbose=False)
        self.batch = LlamaBatch(n_tokens=CALL_TOKENS, embd=0, n_seq_max=1)
        self.n_vocab = engine.n_vocab

    def clear(self) -> None:
        for seq in range(SEQUENCES):
            self.ctx.kv_cache_seq_rm(seq, 0, -1)

    def decode(self, entries: list[tuple[int, int, int]]) -> list[np.ndarray]:
        """(token, position, sequence) entries in one call; every entry's logits row."""
        batch = self.batch.batch
        for i, (token, position, seq) in enumerate(entries):
            batch.token[i], batch.pos[i] = token, position
            batch.seq_id[i][0], batch.n_seq_id[i] = seq, 1
            batch.logits[i] = True
        batch.n_tokens = len(entries)
        self.ctx.decode(self.batch)
        return [logits_row(self.ctx, i, self.n_vocab).copy() for i in range(len(entries))]

    def evaluate(self, tokens: list[int], seq: int, start: int, ubatch: int) -> list[np.ndarray]:
        """Positions start.. of `tokens` in sequence `seq`, in ubatches of `ubatch` tokens; their rows."""
        rows = []
        for first in range(start, len(tokens), ubatch):
            last = min(first + ubatch, len(tokens))
            rows += self.decode([(tokens[p], p, seq) for p in range(first, last)])
        return rows


def predicted(tokens: list[int], start: int) -> list[int | None]:
    """The prompt token each row of positions start.. predicts (none after the last)."""
    return [*tokens[start + 1 :], None]


def difference(rows: list[np.ndarray], reference: list[np.ndarray], next_tokens: list[int | None]) -> dict:
    """Largest logit difference over the rows, and largest difference of the log-probability of each row's next
    prompt token as the server computes it (None: the row predicts no prompt token)."""
    logit = max(float(np.abs(a - b).max()) for a, b in zip(rows, reference, strict=True))
    logprob = max(
        (
            abs(_position_logprobs(a, t, None, False).logprob - _position_logprobs(b, t, None, False).logprob)
            for a, b, t in zip(rows, reference, next_tokens, strict=True)
            if t is not None
        ),
        default=0.0,
    )
    return {"max_abs_logit": round(logit, 4), "max_abs_logprob": round(logprob, 4)}


def question_tokens(engine: Engine, kind: str) -> tuple[list[int], list[list[int]]]:
    """The first study 2 question's context and its first answer's reply forms as Experiment 2 scores them (a chat's
    replies closed by the template's end of turn; a base model's plain text, each reply a line), as token ids."""
    study = STUDIES["study2"]
    trial = next(ExperimentSettings(trial_limit=1).subset(study.load()).itertuples(index=False))
    question = study.exp2_questions(trial)[0]
    if kind == "base":
        text = prompting.plain_text(question.messages)
        context = engine.tokenize(text, True)
        wholes = [engine.tokenize(f"{text} {form}\n", True) for form in question.variants[0]]
    else:
        context = engine.tokenize(engine.render_chat(question.messages), False)
        chats = [[*question.messages, {"role": "assistant", "content": form}] for form in question.variants[0]]
        wholes = [engine.tokenize(engine.render_chat(chat, add_generation_prompt=False), False) for chat in chats]
    if any(whole[: len(context)] != context for whole in wholes):
        raise SystemExit("a reply does not extend the context's tokens: no reply layout to compare")
    return context, [whole[len(context) :] for whole in wholes][:SEQUENCES]


def measure(evaluator: Evaluator, context: list[int], replies: list[list[int]]) -> dict:
    prompt = context + replies[0]
    out = {}

    evaluator.clear()
    reference = evaluator.evaluate(prompt, 0, 0, N_UBATCH)
    for ubatch in (1, 8, CALL_TOKENS):
        evaluator.clear()
        out[f"ubatch_{ubatch}"] = difference(evaluator.evaluate(prompt, 0, 0, ubatch), reference, predicted(prompt, 0))

    def with_context() -> None:
        evaluator.clear()
        for seq in range(len(replies)):
            evaluator.evaluate(context, seq, 0, N_UBATCH)

    with_context()
    alone = []
    for seq, reply in enumerate(replies):
        alone += evaluator.evaluate(context + reply, seq, len(context), N_UBATCH)
    with_context()
    together = evaluator.decode(
        [(token, len(context) + i, seq) for seq, reply in enumerate(replies) for i, token in enumerate(reply)]
    )
    following = [t for reply in replies for t in predicted(context + reply, len(context))]
    out["replies_together"] = difference(together, alone, following)

    others = [prompt[:n] for n in (40, 57, 23)]  # three running sequences: prefixes of the prompt, other lengths
    n_steps = -(-len(prompt) // N_UBATCH)  # one decode step of theirs per ubatch of the prompt

    def their_step(step: int) -> list[tuple[int, int, int]]:
        return [(prompt[len(t) + step], len(t) + step, seq) for seq, t in enumerate(others, start=1)]

    def with_others() -> None:
        evaluator.clear()
        for seq, tokens in enumerate(others, start=1):
            evaluator.evaluate(tokens, seq, 0, N_UBATCH)

    with_others()
    prompt_alone = evaluator.evaluate(prompt, 0, 0, N_UBATCH)
    steps_alone = [row for step in range(n_steps) for row in evaluator.decode(their_step(step))]
    with_others()
    prompt_mixed, steps_mixed = [], []
    for step in range(n_steps):
        ours = [(prompt[p], p, 0) for p in range(N_UBATCH * step, min(N_UBATCH * (step + 1), len(prompt)))]
        rows = evaluator.decode(ours + their_step(step))
        prompt_mixed += rows[: len(ours)]
        steps_mixed += rows[len(ours) :]
    out["prompt_beside_decodes"] = difference(prompt_mixed, prompt_alone, predicted(prompt, 0))
    steps_next = [prompt[len(t) + step + 1] for step in range(n_steps) for t in others]
    out["decodes_beside_prompt"] = difference(steps_mixed, steps_alone, steps_next)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=MODELS)
    args = parser.parse_args()
    registry = load_registry()
    result = {
        "machine": machine(),
        "command": " ".join(["python -m benchmarks.bench_batch_invariance", *sys.argv[1:]]),
        "llama_cpp_python": llama_cpp.__version__,
        "models": {},
    }
    for slug in args.models:
        model = registry.get(slug)
        engine = Engine(gguf_path(model), model.serving.context_length, n_slots=1)
        context, replies = question_tokens(engine, model.kind)
        result["models"][slug] = {"context_tokens": len(context), "reply_tokens": [len(r) for r in replies]}
        for name, configuration in CONFIGURATIONS.items():
            evaluator = Evaluator(engine, model.serving.context_length, **configuration)
            result["models"][slug][name] = measure(evaluator, context, replies)
            print(slug, name, json.dumps(result["models"][slug][name]), flush=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
