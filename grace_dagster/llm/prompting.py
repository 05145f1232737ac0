"""How a study's conversation reaches a model: chat template for instruct models, plain text for base models.

Both experiments go through here, so a model's prompt style is decided in one place (the registry's `kind`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Literal

from grace_dagster.llm.cached_scoring import score_options_with_prefix_cache
from grace_dagster.llm.client import LLMClient, LLMError
from grace_dagster.llm.scoring import AnswerScores, OptionScores, ScoringError, score_options

Kind = Literal["instruct", "base"]
Messages = list[dict[str, str]]
# Base models see the conversation as text followed by this cue; their answer is what follows it.
ANSWER_CUE = "\nAnswer:"
BASE_MODEL_STOP = ["\n\n"]


def plain_text(messages: Messages) -> str:
    """A conversation as plain text for a base model: each question, and each earlier answer after the cue."""
    parts: list[str] = []
    for message in messages:
        if message["role"] == "assistant":
            parts[-1] += f"{ANSWER_CUE} {message['content'].strip()}"
        else:
            parts.append(message["content"])
    return "\n\n".join(parts) + ANSWER_CUE


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str | None
    prompt_tokens: int  # the prompt this answer was sampled after
    completion_tokens: int | None  # this answer's own tokens; None if the server gave no per-answer count


async def generate_answer(
    client: LLMClient,
    kind: Kind,
    messages: Messages,
    max_tokens: int,
    temperature: float,
    seed: int,
    n: int = 1,
) -> list[Answer]:
    """`n` free-text answers to one conversation (Experiment 1), in one request.

    Answer i is sampled with seed + i (vLLM's rule for `n`, which the embedded server follows), so each answer can
    be asked again on its own, with n=1 and its own seed, and comes back the same. The usage block sums over the
    request's answers, so each answer's own token count is read from its token log-probabilities (one entry per
    generated token on both servers).
    """
    params = dict(max_tokens=max_tokens, temperature=temperature, seed=seed, n=n)
    if kind == "instruct":
        chat = await client.chat(messages, logprobs=True, top_logprobs=0, **params)
        usage, choices = chat.usage, sorted(chat.choices, key=lambda c: c.index)
        texts = [choice.message.content or "" for choice in choices]
        counts = [len(c.logprobs.content or []) if c.logprobs else None for c in choices]
    else:
        completion = await client.complete(plain_text(messages), stop=BASE_MODEL_STOP, logprobs=0, **params)
        usage, choices = completion.usage, sorted(completion.choices, key=lambda c: c.index)
        texts = [choice.text.strip() for choice in choices]
        counts = [len(c.logprobs.tokens) if c.logprobs else None for c in choices]
    if len(choices) != n:
        raise LLMError(f"asked for {n} answers, the server returned {len(choices)}")
    if n == 1 and counts[0] is None:
        counts = [usage.completion_tokens]  # one answer: the usage block is its own
    return [
        Answer(text, choice.finish_reason, usage.prompt_tokens, count)
        for choice, text, count in zip(choices, texts, counts)
    ]


@dataclass(frozen=True)
class ChatReplies:
    """How a model's chat template frames an assistant reply, learned once per model from a probe conversation."""

    opened: str  # the probe rendered up to where the assistant's reply starts
    opened_ids: list[int]
    generation_prompt: list[int]  # the tokens that open the assistant's turn, ending every scored context
    end_of_turn: str  # what the template writes after a reply (e.g. "<|im_end|>\n")


class OptionScorer:
    """Scores the options of a question as the model's answer (Experiment 2).

    Instruct models: the context is the conversation rendered by the model's chat template up to the start of the
    assistant turn, and each option is the assistant's whole reply, closed by the template's end-of-turn text; so
    no option is a prefix of another and the probability covers the answer ending there. Base models: plain text
    ending in the answer cue, each option a line of its own.

    A chat is rendered and tokenized once, by the server (`/tokenize` with the messages), and scored as token ids:
    two requests per question. Each reply's tokens are learned once per model and checked once to be how the
    tokenizer splits the generation prompt followed by that reply. Every context ends with the same generation
    prompt, which opens with the template's turn token, where tokenizers split, so the check stands for every
    conversation and the ids sent are the canonical tokenization of context + reply.

    On vLLM (`prefix_cache`), options are scored so that vLLM reads the question's context from its prefix cache
    (`cached_scoring`): the same numbers, tested against plain prompt log-probabilities, without re-evaluating the
    context for every option.
    """

    def __init__(self, client: LLMClient, kind: Kind, prefix_cache: bool = False):
        self.client = client
        self.kind = kind
        self.score_options = score_options_with_prefix_cache if prefix_cache else score_options
        self._learned: dict[tuple, asyncio.Future] = {}

    async def _once(self, key: tuple, learn: Callable[[], Awaitable]):
        """What `learn` finds, asked once per key: concurrent questions wait for the one request; a failed one (a
        server that was down) is asked again by the next question."""
        future = self._learned.get(key)
        if future is None or (future.done() and (future.cancelled() or future.exception() is not None)):
            future = self._learned[key] = asyncio.ensure_future(learn())
        return await future

    async def chat_replies(self) -> ChatReplies:
        """The template's reply framing, learned once per model."""
        return await self._once(("chat",), self._probe_chat)

    async def _probe_chat(self) -> ChatReplies:
        probe = [{"role": "user", "content": "Say X."}]
        tokenize = self.client.tokenize
        asked, opened, closed = await asyncio.gather(
            tokenize(messages=probe, add_generation_prompt=False),
            tokenize(messages=probe, add_generation_prompt=True),
            tokenize(messages=[*probe, {"role": "assistant", "content": "X"}], add_generation_prompt=False),
        )
        opened_text, closed_text = await asyncio.gather(
            *(self.client.detokenize(ids.tokens) for ids in (opened, closed))
        )
        opened_text, closed_text = opened_text.prompt, closed_text.prompt
        if not closed_text.startswith(opened_text + "X"):
            raise ScoringError(
                "the chat template does not render an assistant reply right after its generation prompt; "
                "options cannot be scored as replies with it"
            )
        n = len(asked.tokens)
        if opened.tokens[:n] != asked.tokens or len(opened.tokens) == n:
            raise ScoringError(
                "the chat template's generation prompt does not extend the conversation as rendered without it; "
                "options cannot be scored as replies with it"
            )
        return ChatReplies(opened_text, opened.tokens, opened.tokens[n:], closed_text[len(opened_text) + 1 :])

    async def reply_tokens(self, option: str) -> list[int]:
        """The tokens of `option` as the assistant's whole reply, learned and checked once per option."""
        return await self._once(("reply", option), lambda: self._tokenize_reply(option))

    async def _tokenize_reply(self, option: str) -> list[int]:
        chat = await self.chat_replies()
        reply = option + chat.end_of_turn
        alone, after = await asyncio.gather(
            self.client.tokenize(prompt=reply, add_special_tokens=False),
            self.client.tokenize(prompt=chat.opened + reply, add_special_tokens=False),
        )
        if after.tokens != chat.opened_ids + alone.tokens:
            raise ScoringError(
                f"the reply {option!r} does not start at a token boundary after the chat template's generation "
                "prompt: the tokenizer merges them, so the reply has no tokens of its own to score"
            )
        return alone.tokens

    async def context_and_options(
        self, messages: Messages, options: tuple[str, ...]
    ) -> tuple[str | list[int], list[str] | list[list[int]]]:
        """What `score_options` takes: a chat's context and replies as token ids, a base model's as text."""
        if self.kind == "base":
            return plain_text(messages), [f" {option}\n" for option in options]
        chat = await self.chat_replies()
        context, replies = await asyncio.gather(
            self.client.tokenize(messages=messages, add_generation_prompt=True),
            asyncio.gather(*(self.reply_tokens(option) for option in options)),
        )
        opener = chat.generation_prompt
        if context.tokens[-len(opener) :] != opener:
            raise ScoringError(
                "this conversation's rendering does not end with the chat template's generation prompt "
                f"(tokens {opener}); its options cannot be scored as replies"
            )
        return context.tokens, list(replies)

    async def score(self, messages: Messages, options: tuple[str, ...]) -> OptionScores:
        context, continuations = await self.context_and_options(messages, options)
        scores = await self.score_options(self.client, context, continuations, add_special_tokens=self.kind == "base")
        return replace(scores, options=list(options))  # the answers, without the end-of-turn or newline

    async def score_answers(self, messages: Messages, variants: tuple[tuple[str, ...], ...]) -> AnswerScores:
        """Every surface form of every answer in one request, merged per answer."""
        flat = tuple(form for forms in variants for form in forms)
        return AnswerScores.merge(await self.score(messages, flat), [len(forms) for forms in variants])
