"""How a study's conversation reaches a model: chat template for instruct models, plain text for base models.

Both experiments go through here, so a model's prompt style is decided in one place (the registry's `kind`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from grace_dagster.llm.cached_scoring import score_options_with_prefix_cache
from grace_dagster.llm.client import LLMClient
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
    prompt_tokens: int
    completion_tokens: int


async def generate_answer(
    client: LLMClient, kind: Kind, messages: Messages, max_tokens: int, temperature: float, seed: int
) -> Answer:
    """One free-text answer (Experiment 1)."""
    params = dict(max_tokens=max_tokens, temperature=temperature, seed=seed)
    if kind == "instruct":
        response = await client.chat(messages, **params)
        choice = response.choices[0]
        text = choice.message.content or ""
    else:
        response = await client.complete(plain_text(messages), stop=BASE_MODEL_STOP, **params)
        choice = response.choices[0]
        text = choice.text.strip()
    return Answer(text, choice.finish_reason, response.usage.prompt_tokens, response.usage.completion_tokens)


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
