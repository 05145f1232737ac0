"""Experiment 2 for an instruct model: a chat scored from token ids (rendered and tokenized once) against the way it
was scored before, rendered to text and tokenized again by the server.

    .venv/bin/python -m benchmarks.bench_chat_scoring [--trials 4] [--rounds 3]

Both ways run in one process against the same server, alternating, on the quick profile's questions (the first
`--trials` trials of each study, every question, every surface form), for SmolLM2-135M-Instruct on the embedded
server and on local vLLM (the registry's `smollm2-135m-vllm`, bf16, prefix-cached scoring as the asset uses it).
"text" is what `OptionScorer` did before: `/tokenize` the messages, `/detokenize` them back to text, then score text
prompts (on vLLM each option's prefix-cached spans came from one more `/tokenize` of context + option). Reports per
question the HTTP requests by path, the wall time of all questions (median of the rounds), and the largest
difference between the two ways' log-probabilities (0 on the embedded server, which evaluates a prompt the same
alone or not; vLLM's bf16 CPU kernels are not batch-invariant). Results: benchmarks/results/chat_scoring.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from benchmarks.common import REPO, load_note, machine
from grace_dagster.llm import LLMClient
from grace_dagster.llm.prompting import OptionScorer
from grace_dagster.registry import load_registry
from grace_dagster.resources import ExperimentSettings
from grace_dagster.serving.process import EmbeddedServer
from grace_dagster.serving.vllm import VllmServer
from grace_dagster.studies import STUDIES

RESULTS = REPO / "benchmarks" / "results" / "chat_scoring.json"
SERVERS = {"embedded": "smollm2-135m", "vllm": "smollm2-135m-vllm"}


class TextScorer(OptionScorer):
    """The scorer as it was: the chat rendered to text (`/tokenize` then `/detokenize`), replies appended as text."""

    async def context_and_options(self, messages, options):
        end = (await self.chat_replies()).end_of_turn
        return await self.client.render_chat(messages), [option + end for option in options]


def questions(trials: int) -> list:
    settings = ExperimentSettings(trial_limit=trials)
    return [
        question
        for study in STUDIES.values()
        for trial in settings.subset(study.load()).itertuples(index=False)
        for question in study.exp2_questions(trial)
    ]


async def one_pass(url: str, served: str, scorer_class, prefix_cache: bool, asked: list) -> tuple[float, Counter, list]:
    """Every question once, four in flight as in the asset, after the per-model learning (not timed)."""
    async with LLMClient(url, served, max_concurrency=4) as client:
        scorer = scorer_class(client, "instruct", prefix_cache=prefix_cache)
        for question in asked:  # each reply's tokens are learned once per model, as in the asset
            await scorer.context_and_options(question.messages, question.forms)
        before = Counter(client.stats.by_path)
        start = time.perf_counter()
        scores = await asyncio.gather(*(scorer.score_answers(q.messages, q.variants) for q in asked))
        seconds = time.perf_counter() - start
        return seconds, client.stats.by_path - before, scores


def bench_server(name: str, url: str, served: str, asked: list, rounds: int) -> dict:
    prefix_cache = name == "vllm"
    ways = {"token ids": OptionScorer, "text": TextScorer}
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    requests, scores = {}, {}
    for _ in range(rounds):
        for way, scorer_class in ways.items():
            took, paths, scores[way] = asyncio.run(one_pass(url, served, scorer_class, prefix_cache, asked))
            seconds[way].append(round(took, 2))
            requests[way] = {path: round(count / len(asked), 2) for path, count in sorted(paths.items())}
            print(f"  {name} {way}: {took:.1f} s, requests per question {requests[way]}", flush=True)
    worst = max(
        abs(a - b)
        for ids, text in zip(scores["token ids"], scores["text"])
        for a_forms, b_forms in zip(ids.variant_logprobs, text.variant_logprobs)
        for a, b in zip(a_forms, b_forms)
    )
    medians = {way: statistics.median(values) for way, values in seconds.items()}
    return {
        "seconds": seconds,
        "median_s": medians,
        "requests_per_question": requests,
        "token_ids_over_text": round(medians["token ids"] / medians["text"], 2),
        "max_abs_logprob_difference": worst,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4, help="trials per study")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--servers", nargs="*", default=list(SERVERS))
    args = parser.parse_args()
    asked = questions(args.trials)
    registry = load_registry()
    load = os.getloadavg()
    result = {
        "machine": machine(),
        "command": "python -m benchmarks.bench_chat_scoring " + " ".join(sys.argv[1:]),
        "questions": len(asked),
        "forms": sum(len(q.forms) for q in asked),
        "servers": {},
    }
    for name in args.servers:
        model = registry.get(SERVERS[name])
        start = EmbeddedServer(model.slug) if name == "embedded" else VllmServer(model, log_dir=Path("/tmp"))
        with start as server:
            result["servers"][name] = bench_server(name, server.base_url, model.served_name, asked, args.rounds)
    result["load"] = load_note(load)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
