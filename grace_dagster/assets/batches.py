"""The checkpointed request loop both experiments share: ask the model only what the checkpoint lacks."""

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from dagster import AssetExecutionContext

from grace_dagster.assets import common
from grace_dagster.llm.batch import Checkpoint, ServerUnreachable, request_key, run_pending
from grace_dagster.llm.client import ClientStats, LLMClient, LLMUnavailableError
from grace_dagster.registry import Model
from grace_dagster.resources import LLMEndpoints, Storage
from grace_dagster.serving.weights import local_sha256

Ask = Callable[[Any], Awaitable[dict]]
# A local model server that dies mid-partition is started again this many times before the run gives up.
MAX_SERVER_RESTARTS = 2
# Given the client and the partition's checkpoint (for work that records its own steps, like a conversation's turns).
MakeAsk = Callable[[LLMClient, Checkpoint], Ask]


def model_request_key(method: str, model: Model, *request: Any) -> str:
    """The checkpoint key of a request: what determines its answer and nothing else. `method` names the experiment
    and the version of how it asks (bumped on purpose when that changes in a way the request does not show); then
    the model's identity and the exact request (messages or prompt, options, sampling parameters, seed). Source code
    is not part of it: editing a plot or a check keeps every finished request."""
    return request_key(method, model.slug, model.weights_revision, *request)


@dataclass
class BatchOutcome:
    records: dict[str, dict]  # request key -> finished record
    asked: int
    cached: int
    stats: ClientStats | None
    provenance: dict
    started: float
    server_restarts: int = 0

    def metadata(self, prefix: str = "") -> dict:
        """What every materialization records about its requests (DESIGN section 7); `prefix` tells a judge's
        requests apart from the partition model's."""
        stats = self.stats or ClientStats()
        recorded = {
            **self.provenance,
            "requests_made": stats.model_requests,
            "http_requests": stats.requests,
            "retries": stats.retries,
            "cache_hits": self.cached,
            "server_restarts": self.server_restarts,
            "prompt_tokens_sent": stats.prompt_tokens,
            "completion_tokens_received": stats.completion_tokens,
            "duration_s": round(time.monotonic() - self.started, 2),
        }
        return {f"{prefix}{key}": value for key, value in recorded.items()}


def run_checkpointed(
    context: AssetExecutionContext,
    storage: Storage,
    llm: LLMEndpoints,
    experiment: str,
    part: common.Partition,
    model: Model,
    jobs: dict[str, Any],
    make_ask: MakeAsk,
) -> BatchOutcome:
    """Run `jobs` (request key -> payload) against `model` (the partition's, or a judge), skipping those already in
    the partition's checkpoint for `experiment`.

    The server is started (or reached) only when something is left to ask. Each record is stamped with the
    server version that answered it, so provenance survives a rebuild entirely from the checkpoint.
    """
    started = time.monotonic()
    path = storage.path("checkpoints", experiment, part.model, f"{part.study.name}.jsonl")
    with Checkpoint(path) as checkpoint:
        pending = [key for key in jobs if key not in checkpoint]
        cached = set(jobs) - set(pending)
        context.log.info(f"{experiment} {part.label}: {len(jobs)} requests, {len(jobs) - len(pending)} checkpointed")
        if checkpoint.skipped_lines:
            context.log.warning(
                f"{path}: {checkpoint.skipped_lines} unreadable line(s) skipped; their requests are asked again"
            )
        collected: list[ClientStats] = []  # one per server started, filled as its requests go
        restarts = 0
        while pending:
            endpoint = llm.endpoint(model.slug)  # (re)starts a local server whose process is gone

            async def ask_all(endpoint=endpoint) -> None:
                async with llm.client_for(endpoint) as client:
                    collected.append(client.stats)
                    version = await client.version()
                    ask = make_ask(client, checkpoint)

                    async def stamped(payload):
                        return {**await ask(payload), "server_version": version}

                    await run_pending(jobs, checkpoint, stamped, common.Progress(context, f"{experiment} {part.label}"))

            try:
                asyncio.run(ask_all())
                break
            except (ServerUnreachable, LLMUnavailableError) as error:
                pending = [key for key in jobs if key not in checkpoint]
                if endpoint.alive is None or restarts == MAX_SERVER_RESTARTS:
                    raise
                restarts += 1
                context.log.warning(
                    f"{experiment} {part.label}: the model server died ({error}); starting it again "
                    f"({restarts} of at most {MAX_SERVER_RESTARTS}); {len(pending)} requests left"
                )
        records = {key: checkpoint.records[key] for key in jobs}
    versions = sorted({r.get("server_version", "unknown") for r in records.values()})
    provenance = common.model_provenance(model, ", ".join(versions) or "n/a", local_sha256(model))
    stats = sum(collected[1:], collected[0]) if collected else None
    return BatchOutcome(records, len(jobs) - len(cached), len(cached), stats, provenance, started, restarts)
