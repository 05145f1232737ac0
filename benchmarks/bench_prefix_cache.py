"""Tokens vLLM evaluates per study 1 trial of Experiment 2: plain prompt log-probabilities against the prefix-cached
scoring path (`grace_dagster.llm.cached_scoring`), read from vLLM's own counters.

Run: .venv/bin/python -m benchmarks.bench_prefix_cache [--trials 3] [--block-sizes 128 32]
For each KV block size (128 is vLLM's CPU default; 32 the smallest its CPU attention takes, 16 being the GPU
default, which the CPU refuses: "No common block size for 16") one vLLM server scores the questions of the
first `--trials` study 1 trials both ways. Per trial: prompt tokens received (`vllm:prompt_tokens_total`), those read
from the prefix cache (`vllm:prompt_tokens_cached_total`), the difference (evaluated), requests and seconds; and the
largest difference between the two paths' log-probabilities.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import time
from pathlib import Path

import httpx

from benchmarks.common import load_note, machine
from grace_dagster.llm import LLMClient, score_options
from grace_dagster.llm.cached_scoring import score_options_with_prefix_cache
from grace_dagster.registry import load_registry
from grace_dagster.serving.vllm import VllmServer
from grace_dagster.studies import STUDIES

SLUG = "smollm2-135m-vllm"
END_OF_TURN = "<|im_end|>\n"


def counters(base_url: str) -> tuple[float, float]:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))

    return total("vllm:prompt_tokens_total"), total("vllm:prompt_tokens_cached_total")


async def trial_cost(client: LLMClient, base_url: str, questions, method) -> tuple[dict, list[list[float]]]:
    before, start, requests = counters(base_url), time.perf_counter(), client.stats.model_requests
    logprobs = []
    for question in questions:
        context = await client.render_chat(question.messages)
        scores = await method(client, context, [o + END_OF_TURN for o in question.options], add_special_tokens=False)
        logprobs.append(scores.logprobs)
    seconds = time.perf_counter() - start
    after = counters(base_url)
    prompt, cached = after[0] - before[0], after[1] - before[1]
    cost = {
        "prompt_tokens": int(prompt),
        "cached_tokens": int(cached),
        "evaluated_tokens": int(prompt - cached),
        "requests": client.stats.model_requests - requests,
        "seconds": round(seconds, 2),
    }
    return cost, logprobs


async def measure(base_url: str, served: str, trials: int) -> dict:
    study = STUDIES["study1"]
    rows = list(study.load().head(trials).itertuples(index=False))
    out: dict[str, list] = {"plain": [], "prefix_cached": [], "max_abs_logprob_difference": []}
    async with LLMClient(base_url, served, max_concurrency=1) as client:
        await client.complete("warm-up", max_tokens=1)  # vLLM's one-time warm-up, outside any trial
        for row in rows:
            questions = study.exp2_questions(row)
            plain, plain_lps = await trial_cost(client, base_url, questions, score_options)
            cached, cached_lps = await trial_cost(client, base_url, questions, score_options_with_prefix_cache)
            out["plain"].append(plain)
            out["prefix_cached"].append(cached)
            out["max_abs_logprob_difference"].append(
                max(abs(a - b) for p, c in zip(plain_lps, cached_lps) for a, b in zip(p, c))
            )
    return out


def summary(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[128, 32])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/vllm_prefix_cache_study1.json"))
    args = parser.parse_args()
    load = os.getloadavg()
    model = load_registry().get(SLUG)
    report = {"machine": machine(), "model": SLUG, "study": "study1", "trials": args.trials, "by_block_size": {}}
    for block in args.block_sizes:
        with VllmServer(model, log_dir=Path("/tmp"), extra_args=["--block-size", str(block)]) as server:
            runs = asyncio.run(measure(server.base_url, model.served_name, args.trials))
        result = {"median_per_trial": {k: summary(runs[k]) for k in ("plain", "prefix_cached")}, "runs": runs}
        report["by_block_size"][str(block)] = result
        plain, cached = result["median_per_trial"]["plain"], result["median_per_trial"]["prefix_cached"]
        print(
            f"block {block}: per study-1 trial, plain {plain['evaluated_tokens']:.0f} tokens evaluated "
            f"({plain['requests']:.0f} requests, {plain['seconds']:.1f} s); prefix-cached "
            f"{cached['prompt_tokens']:.0f} sent, {cached['cached_tokens']:.0f} from cache, "
            f"{cached['evaluated_tokens']:.0f} evaluated "
            f"({cached['requests']:.0f} requests, {cached['seconds']:.1f} s); max |logprob difference| "
            f"{max(runs['max_abs_logprob_difference']):.2e}"
        )
    report["load"] = load_note(load)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
