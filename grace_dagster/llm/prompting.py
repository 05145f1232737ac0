"""How a study's conversation reaches a model: chat template for instruct models, plain text for base models.

Both experiments go through here, so a model's prompt style is decided in one place (the registry's `kind`).
"""

from __future__ import annotations

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


class OptionScorer:
    """Scores the options of a question as the model's answer (Experiment 2).

    Instruct models: the context is the conversation rendered by the model's chat template up to the start of the
    assistant turn, and each option is the assistant's whole reply, closed by the template's end-of-turn text; so
    no option is a prefix of another and the probability covers the answer ending there. Base models: plain text
    ending in the answer cue, each option a line of its own.

    On vLLM (`prefix_cache`), options are scored so that vLLM reads the question's context from its prefix cache
    (`cached_scoring`): the same numbers, tested against plain prompt log-probabilities, without re-evaluating the
    context for every option.
    """

    def __init__(self, client: LLMClient, kind: Kind, prefix_cache: bool = False):
        self.client = client
        self.kind = kind
        self.score_options = score_options_with_prefix_cache if prefix_cache else score_options
        self._end_of_turn: str | None = None

    async def end_of_turn(self) -> str:
        """What the chat template writes after an assistant reply (e.g. "<|im_end|>\\n"), learned once per model."""
        if self._end_of_turn is None:
            probe = [{"role": "user", "content": "Say X."}]
            opened = await self.client.render_chat(probe, add_generation_prompt=True)
            closed = await self.client.render_chat([*probe, {"role": "assistant", "content": "X"}], False)
            if not closed.startswith(opened + "X"):
                raise ScoringError(
                    "the chat template does not render an assistant reply right after its generation prompt; "
                    "options cannot be scored as replies with it"
                )
            self._end_of_turn = closed[len(opened) + 1 :]
        return self._end_of_turn

    async def context_and_options(self, messages: Messages, options: tuple[str, ...]) -> tuple[str, list[str]]:
        if self.kind == "instruct":
            end = await self.end_of_turn()
            return await self.client.render_chat(messages), [option + end for option in options]
        return plain_text(messages), [f" {option}\n" for option in options]

    async def score(self, messages: Messages, options: tuple[str, ...]) -> OptionScores:
        context, continuations = await self.context_and_options(messages, options)
        scores = await self.score_options(self.client, context, continuations, add_special_tokens=self.kind == "base")
        return replace(scores, options=list(options))  # the answers, without the end-of-turn or newline

    async def score_answers(self, messages: Messages, variants: tuple[tuple[str, ...], ...]) -> AnswerScores:
        """Every surface form of every answer in one request, merged per answer."""
        flat = tuple(form for forms in variants for form in forms)
        return AnswerScores.merge(await self.score(messages, flat), [len(forms) for forms in variants])
