"""One async client for the OpenAI-compatible API that vLLM and the embedded server speak.

Concerns are kept apart: `_post` owns transport (concurrency limit, timeouts, retries with backoff on connection
errors, 429 and 5xx); the public methods only build requests and return typed responses.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from grace_dagster.llm.protocol import (
    ChatResponse,
    CompletionResponse,
    DetokenizeResponse,
    ModelList,
    TokenizeResponse,
    VersionResponse,
)

T = TypeVar("T", bound=BaseModel)


class LLMError(RuntimeError):
    """A model request failed."""


class LLMRequestError(LLMError):
    """The server refused the request (4xx other than 429): retrying the same request cannot help."""

    def __init__(self, status: int, message: str, url: str):
        self.status = status
        super().__init__(f"{url} answered {status}: {message}")


class LLMUnavailableError(LLMError):
    """The server could not be reached or kept failing after every retry."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8
    initial_backoff: float = 0.5
    max_backoff: float = 15.0

    def delay(self, attempt: int) -> float:
        # Full jitter keeps many clients of one restarting server from retrying in lockstep.
        return random.uniform(0, min(self.max_backoff, self.initial_backoff * 2**attempt))


GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class ClientStats:
    requests: int = 0  # logical requests (each counted once, however often it was retried)
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    by_path: Counter = field(default_factory=Counter)

    def __add__(self, other: ClientStats) -> ClientStats:
        errors = Counter(self.errors) + Counter(other.errors)
        return ClientStats(
            self.requests + other.requests,
            self.retries + other.retries,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            dict(errors),
            self.by_path + other.by_path,
        )

    @property
    def model_requests(self) -> int:
        """Requests that ran the model (completions and chat), as opposed to tokenize, version and the like."""
        return sum(self.by_path[path] for path in GENERATION_PATHS)


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message", error))
        return str(body.get("message", error))
    return str(body)[:500]


class LLMClient:
    """Talks to one model on one endpoint. Use as `async with LLMClient(...) as client:`."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        max_concurrency: int = 4,
        timeout: float = 600.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        alive: Callable[[], bool] | None = None,
    ):
        """`alive` tells whether the server's process still runs (for servers started here): when it has exited,
        a connection error is final at once instead of being retried for a minute."""
        # base_url is the server root (http://host:port); the API lives under /v1 as on vLLM.
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.model = model
        self.retry = retry or RetryPolicy()
        self.alive = alive
        self.stats = ClientStats()
        self._semaphore = asyncio.Semaphore(max_concurrency)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
            transport=transport,
        )

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, path: str, payload: dict | None, response_model: type[T]) -> T:
        self.stats.requests += 1
        self.stats.by_path[path] += 1
        last_problem = ""
        async with self._semaphore:
            for attempt in range(self.retry.attempts):
                if attempt:
                    self.stats.retries += 1
                    await asyncio.sleep(self.retry.delay(attempt))
                try:
                    response = await self._http.request(method, path, json=payload)
                except httpx.TransportError as e:  # connection refused/reset, timeouts, broken responses
                    last_problem = f"{type(e).__name__}: {e}"
                    if self.alive is not None and not self.alive():
                        break
                    continue
                if response.status_code == 429 or response.status_code >= 500:
                    last_problem = f"HTTP {response.status_code}: {_error_message(response)}"
                    continue
                if response.status_code >= 400:
                    key = str(response.status_code)
                    self.stats.errors[key] = self.stats.errors.get(key, 0) + 1
                    raise LLMRequestError(response.status_code, _error_message(response), f"{self.base_url}{path}")
                return response_model.model_validate(response.json())
        self.stats.errors["unavailable"] = self.stats.errors.get("unavailable", 0) + 1
        if self.alive is not None and not self.alive():
            raise LLMUnavailableError(f"{self.base_url}{path}: the model server's process has exited ({last_problem})")
        raise LLMUnavailableError(
            f"{self.base_url}{path} failed {self.retry.attempts} times; last: {last_problem}. "
            "Check that the model server is running (its /health) and reachable."
        )

    def _count(self, response: CompletionResponse | ChatResponse) -> None:
        self.stats.prompt_tokens += response.usage.prompt_tokens
        self.stats.completion_tokens += response.usage.completion_tokens

    async def complete(
        self, prompt: str | list[str] | list[int] | list[list[int]], **params: Any
    ) -> CompletionResponse:
        response = await self._send(
            "POST", "/v1/completions", {"model": self.model, "prompt": prompt, **params}, CompletionResponse
        )
        self._count(response)
        return response

    async def chat(self, messages: list[dict[str, str]], **params: Any) -> ChatResponse:
        response = await self._send(
            "POST", "/v1/chat/completions", {"model": self.model, "messages": messages, **params}, ChatResponse
        )
        self._count(response)
        return response

    async def tokenize(self, **params: Any) -> TokenizeResponse:
        return await self._send("POST", "/tokenize", {"model": self.model, **params}, TokenizeResponse)

    async def detokenize(self, tokens: list[int]) -> DetokenizeResponse:
        return await self._send("POST", "/detokenize", {"model": self.model, "tokens": tokens}, DetokenizeResponse)

    async def version(self) -> str:
        """The server's version (vLLM and the embedded server both answer GET /version)."""
        return (await self._send("GET", "/version", None, VersionResponse)).version

    async def models(self) -> ModelList:
        return await self._send("GET", "/v1/models", None, ModelList)

    async def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's own chat template renders it (special tokens as text).

        Rendering happens on the server, which has the model's template (vLLM: the tokenizer's or --chat-template).
        """
        tokens = await self.tokenize(messages=messages, add_generation_prompt=add_generation_prompt)
        return (await self.detokenize(tokens.tokens)).prompt
