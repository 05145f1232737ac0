"""Exact option scoring that keeps vLLM's prefix cache (vLLM only).

`scoring.score_options` asks for prompt log-probabilities, and vLLM never reads its prefix cache for such a request
(`SamplingParams.skip_reading_prefix_cache` is set whenever `prompt_logprobs` is): each option re-evaluates the whole
question context. vLLM 0.32 can instead return the log-probabilities of chosen token ids at a *generated* position
(`logprob_token_ids`, raw log-softmax of the model's logits), which reads the cache like any generation. So each
option token is scored as the next token after the context plus the option's earlier tokens: one prompt per distinct
prefix, all of them starting with the cached context, in one request. The sum over an option's tokens is the same
quantity `score_options` computes, from the same canonical tokenization of context + option; tested against it in
float32 (in bfloat16 vLLM's CPU kernels are not batch-invariant, and either path moves by tenths of a nat with the
batch it lands in).

What it costs: more, shorter prompts (one per option token instead of one per option), and vLLM caches whole
blocks only (16 tokens on a GPU, 128 on a CPU by default), so each prompt still evaluates the tail of the context
past its last full block. The embedded server has no `logprob_token_ids`; it shares the context by itself.
"""

from __future__ import annotations

import asyncio
import math

from grace_dagster.llm.client import LLMClient
from grace_dagster.llm.protocol import MIN_LOGPROB
from grace_dagster.llm.scoring import OptionScores, ScoringError

# vLLM's limit on `logprob_token_ids` per request (vllm.sampling_params.MAX_LOGPROB_TOKEN_IDS).
MAX_TOKEN_IDS = 128


def _token_id(key: str) -> int:
    # With return_tokens_as_token_ids, vLLM names each token "token_id:<id>".
    return int(key.rsplit(":", 1)[1])


async def option_spans(
    client: LLMClient, context: str | list[int], options: list[str] | list[list[int]], add_special_tokens: bool
) -> tuple[list[int], list[list[int]]]:
    """The context's token ids and each option's own tokens: as given, or from the tokenization of context + option."""
    if isinstance(context, list):
        return context, [list(option) for option in options]
    context_ids, *fulls = await asyncio.gather(
        client.tokenize(prompt=context, add_special_tokens=add_special_tokens),
        *(client.tokenize(prompt=context + option, add_special_tokens=add_special_tokens) for option in options),
    )
    n = len(context_ids.tokens)
    spans = []
    for option, full in zip(options, fulls):
        if full.tokens[:n] != context_ids.tokens:
            raise ScoringError(
                f"option {option!r} changes the tokenization of the context: the option must start at a token "
                "boundary (start it with a space or end the context with a separator)"
            )
        if len(full.tokens) == n:
            raise ScoringError(f"option {option!r} adds no token to the context")
        spans.append(full.tokens[n:])
    return context_ids.tokens, spans


async def score_options_with_prefix_cache(
    client: LLMClient, context: str | list[int], options: list[str] | list[list[int]], add_special_tokens: bool
) -> OptionScores:
    """Score `options` as continuations of `context`: the numbers of `score_options`, computed so that vLLM reads the
    context from its prefix cache. Arguments as for `scoring.score_options`."""
    context_ids, spans = await option_spans(client, context, options, add_special_tokens)
    # One prompt per distinct option prefix (options often share their first tokens, e.g. "It was"/"It wasn't").
    prefixes = list(dict.fromkeys(tuple(span[:k]) for span in spans for k in range(len(span))))
    wanted = sorted({t for span in spans for t in span})
    table: dict[tuple[int, ...], dict[int, float]] = {prefix: {} for prefix in prefixes}
    for start in range(0, len(wanted), MAX_TOKEN_IDS):
        ids = wanted[start : start + MAX_TOKEN_IDS]
        response = await client.complete(
            [context_ids + list(prefix) for prefix in prefixes],
            max_tokens=1,
            temperature=0.0,
            logprobs=1,  # vLLM requires it set; with logprob_token_ids it returns exactly those ids (and the sample)
            logprob_token_ids=ids,
            return_tokens_as_token_ids=True,
        )
        for choice in response.choices:
            if choice.logprobs is None or not choice.logprobs.top_logprobs or choice.logprobs.top_logprobs[0] is None:
                raise ScoringError("the server returned no logprobs for logprob_token_ids; it must be vLLM >= 0.32")
            scored = {_token_id(k): v for k, v in choice.logprobs.top_logprobs[0].items()}
            table[prefixes[choice.index]].update({t: scored[t] for t in ids})
    logprobs = []
    for span in spans:
        steps = [table[tuple(span[:k])][token] for k, token in enumerate(span)]
        logprobs.append(-math.inf if any(lp <= MIN_LOGPROB for lp in steps) else sum(steps))
    return OptionScores.from_logprobs(options, logprobs, [len(span) for span in spans])
