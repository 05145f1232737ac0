"""Exact option scoring: the model's probability of every allowed answer, from prompt log-probabilities.

For each option the log-probability of the whole option continuation given the context, summed over its tokens,
with the canonical tokenization of context + option. All options of a trial go in one request (the server shares
the context's evaluation). Never top-k first-token logprobs: "1" is the first token of "10%" and "100%".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from grace_dagster.llm.client import LLMClient, LLMError
from grace_dagster.llm.protocol import MIN_LOGPROB, CompletionChoice


class ScoringError(LLMError):
    """An option's token span could not be aligned with its text: the score would be wrong, so none is given."""


@dataclass(frozen=True)
class OptionScores:
    options: list[str]
    logprobs: list[float]  # summed over each option's tokens; -inf where the server reported -9999
    n_tokens: list[int]
    captured_mass: float  # Σ exp(logprob): how much of the model's probability the option set holds
    probabilities: list[float]  # renormalized over the options

    @classmethod
    def from_logprobs(cls, options: list[str], logprobs: list[float], n_tokens: list[int]) -> OptionScores:
        finite = [lp for lp in logprobs if lp != -math.inf]
        if not finite:
            nan = [math.nan] * len(options)
            return cls(options, logprobs, n_tokens, 0.0, nan)
        peak = max(finite)
        weights = [math.exp(lp - peak) if lp != -math.inf else 0.0 for lp in logprobs]
        total = sum(weights)
        return cls(
            options=options,
            logprobs=logprobs,
            n_tokens=n_tokens,
            captured_mass=math.exp(peak) * total,
            probabilities=[w / total for w in weights],
        )


@dataclass(frozen=True)
class AnswerScores:
    """Scores of answers that each have several surface forms ("yes", "Yes.", ...). The forms are distinct whole
    replies, so an answer's probability is the sum over its forms; captured mass is over every form of every answer.
    Log-probabilities are natural logs (nats)."""

    variants: list[list[str]]
    variant_logprobs: list[list[float]]
    variant_tokens: list[list[int]]
    logprobs: list[float]  # per answer: log of the summed probability of its forms
    captured_mass: float
    probabilities: list[float]  # per answer, renormalized over the answers

    @classmethod
    def merge(cls, scores: OptionScores, counts: list[int]) -> AnswerScores:
        groups, start = [], 0
        for count in counts:
            groups.append(range(start, start + count))
            start += count
        logprobs = [_logsumexp([scores.logprobs[i] for i in group]) for group in groups]
        merged = OptionScores.from_logprobs([scores.options[g[0]] for g in groups], logprobs, [0] * len(groups))
        return cls(
            variants=[[scores.options[i] for i in group] for group in groups],
            variant_logprobs=[[scores.logprobs[i] for i in group] for group in groups],
            variant_tokens=[[scores.n_tokens[i] for i in group] for group in groups],
            logprobs=logprobs,
            captured_mass=merged.captured_mass,
            probabilities=merged.probabilities,
        )


def _logsumexp(values: list[float]) -> float:
    finite = [v for v in values if v != -math.inf]
    if not finite:
        return -math.inf
    peak = max(finite)
    return peak + math.log(sum(math.exp(v - peak) for v in finite))


# Tokenizer markers some servers leave in per-token strings (SentencePiece "▁", byte-level BPE "Ġ" and "Ċ").
_MARKERS = str.maketrans({"▁": " ", "Ġ": " ", "Ċ": "\n"})


def _same_text(decoded: str, option: str) -> bool:
    """Does the span's per-token text spell the option? Exact, or equal up to whitespace once tokenizer markers
    are mapped back: vLLM decodes each prompt token on its own, which can drop or mark a leading space. A
    misaligned span changes the visible characters, so it still fails."""
    if decoded == option:
        return True
    squeeze = lambda text: "".join(text.translate(_MARKERS).split())  # noqa: E731
    return squeeze(decoded) == squeeze(option)


def _span(choice: CompletionChoice, start: int) -> list[tuple[int, float, str]]:
    """(token id, logprob, decoded text) for prompt positions `start`.. (the positions the scorer asked for)."""
    if choice.prompt_logprobs is None or any(entry is None for entry in choice.prompt_logprobs[start:]):
        raise ScoringError("the server returned no prompt_logprobs; it must support vLLM's prompt_logprobs field")
    out = []
    for entry in choice.prompt_logprobs[start:]:
        # With prompt_logprobs=0 each position holds exactly the prompt token.
        ((token, logprob),) = entry.items()
        out.append((int(token), logprob.logprob, logprob.decoded_token or ""))
    return out


def _prompt_ids(choice: CompletionChoice) -> list[int]:
    """The prompt's token ids at positions 1..: vLLM's `return_token_ids`, or, from a server without it (an older vLLM)
    that returned every position's log-probability, each entry's own token."""
    if choice.prompt_token_ids is not None:
        return choice.prompt_token_ids[1:]
    try:
        return [token for token, _, _ in _span(choice, 1)]
    except ScoringError:
        raise ScoringError("the server returned no prompt_token_ids; it must support vLLM's return_token_ids") from None


async def score_options(
    client: LLMClient, context: str | list[int], options: list[str] | list[list[int]], add_special_tokens: bool
) -> OptionScores:
    """Score `options` as continuations of `context` in one request.

    As text, the server tokenizes context + option, and an option that changes the context's own tokenization
    (learned first, from `/tokenize`) is refused. As token ids (`prompting.OptionScorer` gives a chat's context and
    replies that way, already the canonical tokenization of context + option) the prompts are sent as they are.
    Only the options' positions are asked for (`prompt_logprobs_start`): the embedded server then computes no logits
    for the context's positions; vLLM returns them all, and they are not read.
    `add_special_tokens` is True for plain-text prompts of base models (the tokenizer adds BOS if the model wants
    one) and False for chat-rendered text, which already holds its special tokens (else vLLM adds a second BOS).
    """
    as_ids = isinstance(context, list)
    if as_ids:
        context_ids = context
    else:
        context_ids = (await client.tokenize(prompt=context, add_special_tokens=add_special_tokens)).tokens
    n_context = len(context_ids)
    response = await client.complete(
        [context + option for option in options],
        max_tokens=1,
        temperature=0.0,
        prompt_logprobs=0,
        prompt_logprobs_start=n_context,
        return_token_ids=not as_ids,
        add_special_tokens=add_special_tokens,
    )
    choices = sorted(response.choices, key=lambda c: c.index)
    logprobs, n_tokens = [], []
    for option, choice in zip(options, choices, strict=True):
        if not as_ids and _prompt_ids(choice)[: n_context - 1] != context_ids[1:]:
            raise ScoringError(
                f"option {option!r} changes the tokenization of the context: the option must start at a token "
                "boundary (start it with a space or end the context with a separator)"
            )
        span = _span(choice, n_context)
        read = [p[0] for p in span] if as_ids else "".join(p[2] for p in span)
        if not span or not (read == option if as_ids else _same_text(read, option)):
            raise ScoringError(f"option {option!r}: its token span reads {read!r}; scores would be misaligned")
        total = sum(p[1] for p in span)
        logprobs.append(-math.inf if any(p[1] <= MIN_LOGPROB for p in span) else total)
        n_tokens.append(len(span))
    return OptionScores.from_logprobs(options, logprobs, n_tokens)
