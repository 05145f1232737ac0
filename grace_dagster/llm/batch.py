"""Run many model requests with a persistent checkpoint, so a killed run resumes without asking again.

The checkpoint is an append-only JSON-lines file of finished requests, one per line, each fsynced. A request's key
hashes everything that determines its answer (model, prompt, parameters), so a changed prompt is asked anew and an
unchanged one never twice. Work of several requests (a conversation's turns) records each step under a key of its
own (`Checkpoint.once`), so a run killed mid-conversation resumes at the turn it was on.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grace_dagster.llm.client import LLMUnavailableError


def request_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class CheckpointBusy(RuntimeError):
    pass


class Checkpoint:
    """Finished requests of one partition, keyed by request key."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[str, dict] = {}
        self.skipped_lines = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a+", encoding="utf-8")
        try:
            # Two runs of one partition would interleave their appends: the second one is refused instead.
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise CheckpointBusy(
                f"{path} is in use by another run of the same partition; wait for it to finish (or cancel it) "
                "and run again"
            ) from None
        self._load()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            # A run killed mid-write leaves a last line without its newline: kept if it is a whole record, dropped
            # if torn (its request is asked again), so the next record is never glued to it.
            cut = raw.rfind(b"\n") + 1
            if self._record(raw[cut:]) is None:
                raw = raw[:cut]
                self._file.truncate(cut)
                self.skipped_lines += 1
            else:
                raw += b"\n"
                self._file.write("\n")
                self._file.flush()
        for line in raw.split(b"\n")[:-1]:
            record = self._record(line)
            if record is None:
                self.skipped_lines += 1  # unreadable: its request is simply asked again
            else:
                self.records.setdefault(record["key"], record)

    @staticmethod
    def _record(line: bytes) -> dict | None:
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None
        return record if isinstance(record, dict) and isinstance(record.get("key"), str) else None

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def add(self, key: str, record: dict) -> None:
        if key in self.records:
            return
        record = {"key": key, **record}
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.records[key] = record

    async def once(self, key: str, ask: Callable[[], Awaitable[dict]]) -> dict:
        """The recorded answer to `key`, asking (and recording) only if there is none yet."""
        if key not in self.records:
            self.add(key, await ask())
        return self.records[key]

    def close(self) -> None:
        self._file.close()  # also releases the lock

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class BatchResult:
    asked: int = 0
    cached: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # key -> error


class BatchFailed(RuntimeError):
    pass


class ServerUnreachable(BatchFailed):
    """The model server stopped answering part-way; what finished is kept, the rest can be asked of a new one."""


async def run_pending(
    jobs: dict[str, Any],
    checkpoint: Checkpoint,
    ask: Callable[[Any], Awaitable[dict]],
    on_progress: Callable[[int, int], None] = lambda done, total: None,
) -> BatchResult:
    """Ask `ask(job)` for every job whose key is not in the checkpoint and record each answer as it arrives.

    Every job is attempted even if some fail, so finished work is kept; then the failures are raised together.
    """
    result = BatchResult(cached=sum(1 for key in jobs if key in checkpoint))
    pending = {key: job for key, job in jobs.items() if key not in checkpoint}
    total = len(jobs)
    on_progress(result.cached, total)

    async def one(key: str, job: Any) -> None:
        try:
            checkpoint.add(key, await ask(job))
            result.asked += 1
        except LLMUnavailableError:
            raise  # the server is gone: every other request would wait out its retries too
        except Exception as e:  # recorded and raised together below, after the other requests finish
            result.failures[key] = f"{type(e).__name__}: {e}"
        on_progress(result.cached + result.asked, total)

    tasks = [asyncio.ensure_future(one(key, job)) for key, job in pending.items()]
    try:
        await asyncio.gather(*tasks)
    except LLMUnavailableError as e:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise ServerUnreachable(
            f"the model server became unreachable after {result.asked} new answers (kept in {checkpoint.path}; "
            f"a rerun continues from there): {e}"
        ) from e
    if result.failures:
        first = next(iter(result.failures.values()))
        raise BatchFailed(
            f"{len(result.failures)} of {len(pending)} requests failed ({result.asked} succeeded and are kept in "
            f"{checkpoint.path}; a rerun asks only the failed ones). First error: {first}"
        )
    return result
