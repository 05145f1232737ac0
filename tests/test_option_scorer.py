"""Experiment 2 for instruct models: a chat is rendered and tokenized once, then scored as token ids.

Against the real embedded server (SmolLM2 with its own ChatML template, Gemma 3 with a Gemma template named in the
registry), on real questions of both studies.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from grace_dagster.llm import LLMClient, ScoringError, score_options
from grace_dagster.llm.prompting import OptionScorer
from grace_dagster.studies import STUDIES
from tests.conftest import LOCAL_MODELS, SERVED_NAMES, with_chat_template
from tests.pipeline import server_counter

pytestmark = pytest.mark.slow


def _questions() -> list:
    """Two study 1 questions (a count, and a count given an earlier answer) and a study 2 one."""
    study1, study2 = (next(STUDIES[name].load().itertuples(index=False)) for name in ("study1", "study2"))
    return [*STUDIES["study1"].exp2_questions(study1)[:2], *STUDIES["study2"].exp2_questions(study2)]


@pytest.mark.parametrize("slug", LOCAL_MODELS)
def test_a_chat_costs_two_requests_per_question_and_scores_as_its_rendered_text(
    slug, servers, gemma_with_chat_template
):
    """Per question: one /tokenize (the conversation rendered and tokenized by the server) and one scoring request;
    per model, once: the template's reply framing (three /tokenize, two /detokenize) and each distinct reply's tokens
    (two /tokenize). The ids sent are the server's own tokenization of the rendered text followed by each reply, and
    the scores equal, bit for bit, those of the text prompts (the chat rendered to text, each reply appended,
    tokenized by the server)."""
    server = gemma_with_chat_template if slug == "gemma3-270m" else servers(slug)
    questions = _questions()

    async def work():
        async with LLMClient(server.base_url, SERVED_NAMES[slug]) as client:
            scorer = OptionScorer(client, "instruct")
            by_ids = [await scorer.score(q.messages, q.forms) for q in questions]
            requests = Counter(client.stats.by_path)

            end = (await scorer.chat_replies()).end_of_turn
            by_text, canonical = [], []
            for question in questions:
                text = await client.render_chat(question.messages)
                replies = [form + end for form in question.forms]
                by_text.append(await score_options(client, text, replies, add_special_tokens=False))
                context, reply_ids = await scorer.context_and_options(question.messages, question.forms)
                for reply, ids in zip(replies, reply_ids):
                    tokens = (await client.tokenize(prompt=text + reply, add_special_tokens=False)).tokens
                    canonical.append(tokens == context + ids)
            return requests, by_ids, by_text, canonical

    requests, by_ids, by_text, canonical = asyncio.run(work())
    replies = len({form for question in questions for form in question.forms})
    n = len(questions)
    assert requests == Counter({"/tokenize": n + 3 + 2 * replies, "/detokenize": 2, "/v1/completions": n})
    assert all(canonical), "every context + reply sent is the server's tokenization of its text"
    for ids, text in zip(by_ids, by_text):
        assert ids.n_tokens == text.n_tokens
        assert ids.logprobs == text.logprobs, "the same tokens, evaluated alone: the same numbers"


@pytest.mark.parametrize(("slug", "kind"), [("smollm2-135m", "instruct"), ("gemma3-270m", "base")])
def test_only_the_answers_positions_are_computed_and_score_as_when_every_position_is(slug, kind, servers):
    """The scorer asks for the answers' positions only (`prompt_logprobs_start`): the engine computes a logits row for
    each answer token and one per ubatch it evaluates (kept for prefix reuse), not one per context token, and the
    answers' log-probabilities equal, bit for bit, those of the same prompts scored at every position (evaluated
    afresh: a slot that scored only answers cannot stand in for a request that asks for everything). Both ways of
    sending a question: a chat as token ids (SmolLM2) and a base model's plain text (Gemma 3, 262k-token vocabulary,
    where a logits row costs most)."""
    url = servers(slug).base_url
    base = kind == "base"

    def counters() -> tuple[float, float]:
        return tuple(
            server_counter(url, name)
            for name in ("grace_server_logits_rows_total", "grace_server_tokens_evaluated_total")
        )

    def since(before: tuple[float, float]) -> tuple[float, float]:
        return tuple(now - then for now, then in zip(counters(), before))

    async def work():
        async with LLMClient(url, SERVED_NAMES[slug]) as client:
            scorer = OptionScorer(client, kind)
            out = []
            for question in _questions():
                context, options = await scorer.context_and_options(question.messages, question.forms)
                before = counters()
                scores = await score_options(client, context, options, add_special_tokens=base)
                rows, evaluated = since(before)
                before = counters()
                every = await client.complete(
                    [context + option for option in options],
                    max_tokens=1,
                    temperature=0.0,
                    prompt_logprobs=0,
                    add_special_tokens=base,
                )
                rows_every, evaluated_every = since(before)
                n_context = len((await client.tokenize(prompt=context)).tokens) if base else len(context)
                reference = [
                    sum(next(iter(entry.values())).logprob for entry in choice.prompt_logprobs[n_context:])
                    for choice in sorted(every.choices, key=lambda c: c.index)
                ]
                out.append((scores, reference, rows, evaluated, rows_every, evaluated_every))
            return out

    for scores, reference, rows, evaluated, rows_every, evaluated_every in asyncio.run(work()):
        assert scores.logprobs == reference, "the answers' numbers do not depend on which other rows are computed"
        assert rows_every == evaluated_every, "asked for every position, every evaluated token's row is computed"
        # Per prompt: the rows of its answer's positions and of its ubatches' ends (the last one generates), at most
        # its evaluated tokens / 32 + 2 ubatches (32-token ubatches, cut again at the answer's line or turn).
        assert rows <= sum(scores.n_tokens) + evaluated / 32 + 2 * len(scores.options)
        assert rows < rows_every


# ChatML whose assistant turn opens with "assistant: ": in byte-level BPE the space belongs to the next word, so a
# reply merges with the generation prompt's last token.
SPACED_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}"
)


def test_a_reply_the_tokenizer_merges_with_the_generation_prompt_is_refused(tmp_path):
    """A template whose generation prompt ends in a space: "Yes" tokenized after it is " Yes", not the reply's own
    tokens, so the scorer refuses to score it rather than send a tokenization the text never has."""
    question = _questions()[0]
    with with_chat_template("smollm2-135m", SPACED_CHATML, tmp_path) as server:

        async def work():
            async with LLMClient(server.base_url, SERVED_NAMES["smollm2-135m"]) as client:
                return await OptionScorer(client, "instruct").score(question.messages, ("Yes",))

        with pytest.raises(ScoringError, match="does not start at a token boundary after the chat template"):
            asyncio.run(work())
