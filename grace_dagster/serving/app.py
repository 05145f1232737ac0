"""The embedded server's HTTP API: the subset of vLLM's OpenAI-compatible API that the pipeline uses.

Routes are thin: validate (pydantic, 400 on any problem), tokenize in a worker thread, hand the prompts to the
engine's scheduler (which batches concurrent requests), and shape the answer with the wire models of
`grace_dagster.llm.protocol`.
"""

import asyncio
from dataclasses import replace

import jsonschema
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from grace_dagster.llm.protocol import (
    MIN_LOGPROB,
    ChatChoice,
    ChatChoiceLogprobs,
    ChatRequest,
    ChatResponse,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorBody,
    ErrorResponse,
    ModelCard,
    ModelList,
    PromptLogprob,
    ResponseFormat,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
    VersionResponse,
)
from grace_dagster.serving.engine import Engine, EngineError, Job, PositionLogprobs, Result, Sampling
from grace_dagster.serving.metrics import Metrics

DEFAULT_COMPLETION_TOKENS = 16
DISCONNECT_POLL_SECONDS = 0.25


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "BadRequestError", param: str | None = None):
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    # vLLM names the offending request field in `param`; so does this server.
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=status))
    return JSONResponse(body.model_dump(), status_code=status)


def _seeds(seed: int | None, n: int) -> list[int | None]:
    """One seed per sample, as vLLM gives them: sample i of a request with `seed` is seeded with seed + i."""
    return [None if seed is None else seed + i for i in range(n)]


def _clamp(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


class CountResponses:
    """Counts responses by route and status code. Plain ASGI: Starlette's `@app.middleware("http")` would hide a
    client's disconnect from the routes, and `answer` must see it to cancel the job."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                route, code = scope["path"], str(message["status"])
                self.metrics.inc("grace_server_requests_total", route=route, code=code)
                if message["status"] >= 400:
                    self.metrics.inc("grace_server_errors_total", route=route, code=code)
            await send(message)

        await self.app(scope, receive, counting_send)


class RequireKey:
    """Refuses a request to the API (`/v1/...`, as vLLM's `--api-key` does) without `Authorization: Bearer <key>`."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            if dict(scope["headers"]).get(b"authorization") != self.expected:
                body = ErrorResponse(
                    error=ErrorBody(message="a valid API key is required", type="AuthenticationError", code=401)
                )
                return await JSONResponse(body.model_dump(), status_code=401)(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(
    engine: Engine,
    served_name: str,
    version: str = "grace-embedded",
    structured_output: str = "json_schema",
    api_key: str | None = None,
) -> FastAPI:
    """Two settings make the server behave as a hosted API would, so that the platform's requests to such APIs are
    tested against a real server: `structured_output="json_object"` refuses `response_format` `json_schema` (as
    DeepSeek's API does), and `api_key` requires that key on every API request."""
    app = FastAPI(title=f"Grace embedded server: {served_name}", version=version)
    metrics = Metrics()

    async def in_thread(fn, *args):
        """Tokenization and the like: thread-safe, off the event loop, never queued behind the model."""
        try:
            return await run_in_threadpool(fn, *args)
        except EngineError as e:
            raise ApiError(400, str(e)) from None

    async def answer(request: Request, job: Job) -> list[Result]:
        """The engine's results for a job. A client that gave up waiting (its timeout, a killed run) is noticed
        here and its job is cancelled: the engine stops spending work on it while the client sends it again."""
        done = asyncio.wrap_future(job.future)
        while not (await asyncio.wait({done}, timeout=DISCONNECT_POLL_SECONDS))[0]:
            if await request.is_disconnected():
                job.cancel()
                metrics.inc("grace_server_abandoned_total", route=request.url.path)
                raise ApiError(499, "the client closed the connection before its answer was ready", "ClientClosed")
        try:
            return done.result()
        except EngineError as e:
            raise ApiError(400, str(e)) from None

    def check_model(name: str | None) -> None:
        if name is not None and name != served_name:
            raise ApiError(
                404, f"The model `{name}` does not exist; this server serves `{served_name}`.", "NotFoundError", "model"
            )

    if api_key:
        app.add_middleware(RequireKey, key=api_key)
    app.add_middleware(CountResponses, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError):
        return _error(e.status, e.message, e.kind, e.param)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError):
        fields = [".".join(str(p) for p in err["loc"] if p != "body") for err in e.errors()]
        problems = "; ".join(f"{field or 'body'}: {err['msg']}" for field, err in zip(fields, e.errors()))
        param = fields[0].split(".")[0] if fields and fields[0] else None
        return _error(400, f"invalid request: {problems}", "BadRequestError", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), "HTTPError")

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception):
        return _error(500, f"internal error: {type(e).__name__}: {e}", "InternalServerError")

    @app.get("/health")
    async def health():
        return PlainTextResponse("ok")

    @app.get("/version")
    async def server_version() -> VersionResponse:
        return VersionResponse(version=version)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=served_name, max_model_len=engine.n_ctx)])

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(
            metrics.render(
                {
                    "grace_server_tokens_evaluated_total": engine.tokens_evaluated,
                    "grace_server_logits_rows_total": engine.logits_rows,
                    "grace_server_generation_tokens_total": engine.tokens_generated,
                }
            ),
            media_type="text/plain; version=0.0.4",
        )

    @app.post("/tokenize")
    async def tokenize(request: Request, req: TokenizeRequest) -> TokenizeResponse:
        check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "give exactly one of `prompt` or `messages`")

        def work():
            if req.messages is not None:
                text = engine.render_chat([m.model_dump() for m in req.messages], req.add_generation_prompt)
                # The rendered template already holds the special tokens it needs (vLLM does the same).
                return engine.tokenize(text, add_special=False)
            return engine.tokenize(req.prompt, add_special=req.add_special_tokens)

        tokens = await in_thread(work)
        return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=engine.n_ctx)

    @app.post("/detokenize")
    async def detokenize(request: Request, req: DetokenizeRequest) -> DetokenizeResponse:
        check_model(req.model)
        return DetokenizeResponse(prompt=await in_thread(engine.detokenize, req.tokens))

    @app.post("/v1/completions")
    async def completions(request: Request, req: CompletionRequest) -> CompletionResponse:
        check_model(req.model)
        if req.max_tokens == 0 and not req.echo:
            # vLLM refuses it too: scoring a prompt without generating is `echo` with `max_tokens` 0.
            raise ApiError(
                400, "max_tokens must be at least 1, got 0 (0 is allowed only with echo: true)", param="max_tokens"
            )
        prompt = req.prompt
        texts: list[str | None]
        if isinstance(prompt, str):
            texts = [prompt]
        elif isinstance(prompt[0], str):
            texts = list(prompt)
        elif isinstance(prompt[0], int):
            texts, prompt = [None], [prompt]
        else:
            texts = [None] * len(prompt)
        want_prompt_logprobs = (req.echo and req.logprobs is not None) or req.prompt_logprobs is not None
        top_k = max(req.logprobs or 0, req.prompt_logprobs or 0) or None
        sampling = Sampling(
            max_tokens=DEFAULT_COMPLETION_TOKENS if req.max_tokens is None else req.max_tokens,
            grammar=_grammar(req.response_format),
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stop=req.stop_list,
            logprobs=req.logprobs,
            ignore_eos=req.ignore_eos,
        )

        def submit() -> Job:
            ids = [engine.tokenize(t, req.add_special_tokens) if t is not None else p for t, p in zip(texts, prompt)]
            # Every sample of the first prompt, then of the next, as vLLM orders the choices.
            sequences = [(p, replace(sampling, seed=seed)) for p in ids for seed in _seeds(req.seed, req.n)]
            # vLLM reports a rank with prompt_logprobs only; echo logprobs need no full-vocabulary count.
            return engine.submit(
                sequences,
                want_prompt_logprobs,
                top_k,
                want_rank=req.prompt_logprobs is not None,
                score_from=req.prompt_logprobs_start or 1,
            )

        results = await answer(request, await in_thread(submit))
        choices = [_completion_choice(engine, i, texts[i // req.n], result, req) for i, result in enumerate(results)]
        prompt_tokens = sum(len(c[1].prompt_ids) for c in choices[:: req.n])  # each prompt once, as vLLM counts
        completion_tokens = sum(len(c[1].output_ids) for c in choices)
        metrics.inc("grace_server_prompt_tokens_total", prompt_tokens)
        return CompletionResponse(
            model=served_name,
            choices=[c[0] for c in choices],
            usage=Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            ),
        )

    @app.post("/v1/chat/completions")
    async def chat(request: Request, req: ChatRequest) -> ChatResponse:
        check_model(req.model)
        if req.max_tokens == 0:
            raise ApiError(400, "max_tokens must be at least 1, got 0", param="max_tokens")  # as vLLM answers
        if structured_output == "json_object" and req.response_format and req.response_format.type == "json_schema":
            message = "response_format type json_schema is not supported by this server; use json_object"
            raise ApiError(400, message, param="response_format")
        grammar = _grammar(req.response_format)

        def submit() -> Job:
            text = engine.render_chat([m.model_dump() for m in req.messages], req.add_generation_prompt)
            ids = engine.tokenize(text, add_special=False)
            # Without max_tokens the answer may fill the context; a prompt that fills it already asks for at least
            # one token, so the engine refuses it with the context-length message (as vLLM does) instead of failing.
            max_tokens = req.max_tokens if req.max_tokens is not None else max(engine.n_ctx - len(ids), 1)
            sampling = Sampling(
                max_tokens=max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                seed=req.seed,
                stop=req.stop_list,
                grammar=grammar,
                logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                ignore_eos=req.ignore_eos,
            )
            sequences = [(ids, replace(sampling, seed=seed)) for seed in _seeds(req.seed, req.n)]
            return engine.submit(sequences, prompt_logprobs=False, top_k=None, want_rank=False)

        results = await answer(request, await in_thread(submit))
        n_prompt, n_out = len(results[0].prompt_ids), sum(len(r.output_ids) for r in results)
        metrics.inc("grace_server_prompt_tokens_total", n_prompt)
        return ChatResponse(
            model=served_name,
            choices=[
                ChatChoice(
                    index=i,
                    message=ChatResponseMessage(content=result.output_text),
                    logprobs=_chat_logprobs(engine, result) if req.logprobs else None,
                    finish_reason=result.finish_reason,
                )
                for i, result in enumerate(results)
            ],
            usage=Usage(prompt_tokens=n_prompt, completion_tokens=n_out, total_tokens=n_prompt + n_out),
        )

    return app


def _grammar(response_format: ResponseFormat | None) -> str | None:
    """The llama.cpp grammar that enforces `response_format`; None for free text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return Engine.grammar_from_json_schema({"type": "object"})
    if response_format.json_schema is None:
        raise ApiError(400, "response_format type json_schema needs a `json_schema` with a `schema`")
    schema = response_format.json_schema.schema_
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
        return Engine.grammar_from_json_schema(schema)
    except jsonschema.SchemaError as e:
        raise ApiError(400, f"invalid json_schema: {e.message}") from None
    except EngineError as e:
        raise ApiError(400, str(e)) from None


def _chat_logprobs(engine: Engine, result: Result) -> ChatChoiceLogprobs:
    return ChatChoiceLogprobs(
        content=[
            ChatTokenLogprob(
                token=engine.token_text(t),
                logprob=_clamp(p.logprob),
                top_logprobs=[{"token": engine.token_text(k), "logprob": _clamp(v)} for k, v in p.top],
            )
            for t, p in zip(result.output_ids, result.output_logprobs)
        ]
    )


def _top_dict(engine: Engine, token: int, position: PositionLogprobs) -> dict[str, float]:
    top = {engine.token_text(k): _clamp(v) for k, v in position.top}
    top[engine.token_text(token)] = _clamp(position.logprob)
    return top


def _completion_choice(
    engine: Engine, index: int, text: str | None, result: Result, req: CompletionRequest
) -> tuple[CompletionChoice, Result]:
    prompt_text = text if text is not None else engine.detokenize(result.prompt_ids)
    logprobs = None
    if req.logprobs is not None:
        tokens: list[int] = []
        positions: list[PositionLogprobs | None] = []
        if req.echo:
            tokens += result.prompt_ids
            positions += result.prompt_logprobs
        tokens += result.output_ids
        positions += result.output_logprobs[: len(result.output_ids)]
        strings = [engine.token_text(t) for t in tokens]
        offsets, offset = [], 0
        for s in strings:
            offsets.append(offset)
            offset += len(s)
        logprobs = CompletionLogprobs(
            tokens=strings,
            token_logprobs=[None if p is None else _clamp(p.logprob) for p in positions],
            top_logprobs=[None if p is None else _top_dict(engine, t, p) for t, p in zip(tokens, positions)],
            text_offset=offsets,
        )
    prompt_logprobs = None
    if req.prompt_logprobs is not None:
        prompt_logprobs = [None]
        for token, p in zip(result.prompt_ids[1:], result.prompt_logprobs[1:]):
            if p is None:  # before prompt_logprobs_start
                prompt_logprobs.append(None)
                continue
            # The prompt's own token first, then the top k, as vLLM lists them.
            entry = {
                str(token): PromptLogprob(
                    logprob=_clamp(p.logprob), rank=p.rank, decoded_token=engine.token_text(token)
                )
            }
            for r, (k, v) in enumerate(p.top[: req.prompt_logprobs]):
                entry.setdefault(
                    str(k), PromptLogprob(logprob=_clamp(v), rank=r + 1, decoded_token=engine.token_text(k))
                )
            prompt_logprobs.append(entry)
    choice = CompletionChoice(
        index=index,
        text=(prompt_text if req.echo else "") + result.output_text,
        logprobs=logprobs,
        finish_reason=result.finish_reason,
        prompt_logprobs=prompt_logprobs,
        prompt_token_ids=result.prompt_ids if req.return_token_ids else None,
    )
    return choice, result
