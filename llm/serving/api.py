"""The OpenAI-compatible HTTP API of llm.serve (FastAPI): routes, responses and server-sent events.

Routes: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(``stream: true`` as server-sent events) and ``GET /metrics`` (the scheduler's counters, JSON).

Requests are validated by pydantic models that forbid unknown fields and coerce nothing (``"5"`` is not an
integer); every refusal is a 4xx with OpenAI's body ``{"error": {"message", "type", "param", "code"}}``, and the
server goes on serving. Parameters that would change what is generated but are not implemented here (``echo``,
``logprobs``, ``best_of``, ``suffix``, penalties, ``logit_bias``, tools, a non-text ``response_format``) are
refused, except at their neutral values, which some clients always send. Nothing in a request names a file: the
model is fixed at start. Model output is data: it only ever leaves as a JSON string.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llm.core.sampling import Sampling
from llm.errors import UserError
from llm.generate import Loaded
from llm.serving.requests import (
    COMPLETION_MAX_TOKENS,
    MAX_BODY_BYTES,
    MAX_ROWS,
    ApiError,
    ChatRequest,
    CompletionRequest,
    _Sampled,
    _validation_error,
    error_body,
    error_response,
)
from llm.serving.scheduler import Event, Job, Row, Scheduler

# ------------------------------------------------------------------------------------------ the guard middleware


class Guard:
    """ASGI middleware before everything: the API key (401) and the body size (413), checked on every request.

    Pure ASGI rather than an ``@app.middleware`` function, whose BaseHTTPMiddleware would sit between a stream
    and its client; the body is counted as it arrives, so a body without Content-Length cannot grow past the cap.
    """

    def __init__(self, app: Any, api_key: str | None, max_body: int = MAX_BODY_BYTES) -> None:
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            # compare_digest: the time taken does not tell how much of a guessed key was right
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
                err = ApiError(401, "Incorrect API key provided (Authorization: Bearer KEY)", None, "invalid_api_key")
                return await error_response(err)(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            err = ApiError(413, f"the request body is over {self.max_body} bytes", None, "request_too_large")
            return await error_response(err)(scope, receive, send)
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:  # FastAPI passes an HTTPException raised while reading the body on
                    raise StarletteHTTPException(413, f"the request body is over {self.max_body} bytes")
            return message

        await self.app(scope, counted, send)


# -------------------------------------------------------------------------------------------------- the app


class _Shape:
    """How one endpoint's results look: text completions or chat completions, whole or as chunks."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat, self.model = chat, model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def choice(self, index: int, text: str | None, finish_reason: str | None, *, delta: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        if delta:
            content = {} if text is None else {"content": text}
            return {"index": index, "delta": content, "logprobs": None, "finish_reason": finish_reason}
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "logprobs": None, "finish_reason": finish_reason}

    def chunk(self, choices: list[dict[str, Any]], usage: Any = ...) -> str:
        body = {**self.head("chat.completion.chunk" if self.chat else "text_completion"), "choices": choices}
        if usage is not ...:
            body["usage"] = usage
        # json.dumps escapes newlines inside strings, so a chunk is always one SSE data line
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def create_app(loaded: Loaded, scheduler: Scheduler, api_key: str | None = None, max_body: int = MAX_BODY_BYTES) -> Any:
    """The ASGI app: FastAPI's routes behind the Guard (API key, body size)."""
    app = FastAPI(title="llm.serve", docs_url=None, redoc_url=None, openapi_url=None)
    max_len = loaded.model.cfg.max_seq_len
    vocab = loaded.model.cfg.vocab_size

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(err))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(err.status_code)
        return error_response(ApiError(err.status_code, str(err.detail), None, code))

    @app.exception_handler(Exception)
    async def _bug(_: Request, err: Exception) -> JSONResponse:  # still logged with its traceback by Starlette
        return error_response(ApiError(500, f"internal error: {type(err).__name__}"))

    def model_card() -> dict[str, Any]:
        return {"id": loaded.name, "object": "model", "created": 0, "owned_by": "llm-trainer"}

    def check_model(name: str) -> None:
        if name != loaded.name:
            raise ApiError(404, f"The model `{name}` does not exist (this server has `{loaded.name}`)", "model",
                           "model_not_found")  # fmt: skip

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        check_model(name)
        return model_card()

    @app.get("/metrics")
    async def metrics() -> dict[str, Any]:
        return scheduler.snapshot()

    def budget(prompts: list[list[int]], asked: int | None, default: int | None, param: str, what: str) -> int:
        """max_tokens of these prompts, checked against the context (400 naming both numbers when over)."""
        longest = max(len(p) for p in prompts)
        if asked is None:
            if longest >= max_len:
                raise ApiError(400, f"This model's maximum context length is {max_len} tokens, but the {what} has "
                               f"{longest} tokens, leaving no room for a completion", what, "context_length_exceeded")  # fmt: skip
            return min(default or max_len, max_len - longest)
        if longest + asked > max_len:
            raise ApiError(
                400,
                f"This model's maximum context length is {max_len} tokens, but {longest + asked} were requested "
                f"({longest} in the {what}, {asked} for the completion): reduce the {what} or {param}",
                param,
                "context_length_exceeded",
            )
        return asked

    def rows_of(req: _Sampled, prompts: list[list[int]], max_tokens: int) -> list[Row]:
        n = req.n or 1
        if len(prompts) * n > MAX_ROWS:
            raise ApiError(400, f"{len(prompts)} prompts x n={n} is over {MAX_ROWS} completions per request", "n")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        rows = []
        for i, prompt in enumerate(prompts):
            for j in range(n):
                index = i * n + j  # OpenAI's order: the choices of prompt 0, then of prompt 1, ...
                try:
                    sampling = Sampling(
                        max_new_tokens=max_tokens,
                        temperature=1.0 if req.temperature is None else req.temperature,
                        top_k=req.top_k or None,
                        top_p=None if req.top_p in (None, 1.0) else req.top_p,
                        seed=None if req.seed is None else req.seed + index,  # n>1: choice j samples with seed + j
                    )
                except UserError as err:  # the schema's bounds should have caught it first
                    raise ApiError(400, str(err)) from err
                rows.append(Row(prompt, sampling, stop, index))
        return rows

    def check_text(text: str, param: str) -> str:
        """JSON can carry lone surrogates ("\\ud800"): no text to a tokenizer (which would fail with a 500)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ApiError(400, f"{param} is not valid Unicode ({err.reason})", param, "invalid_value") from err
        return text

    def encode(text: str, param: str) -> list[int]:
        return loaded.encode(check_text(text, param))

    def completion_prompts(req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            return [encode(p, "prompt")]
        if not p:
            raise ApiError(400, "prompt is an empty list", "prompt")
        if all(isinstance(x, int) for x in p):  # one prompt as token ids
            p = [p]  # type: ignore[list-item]
        out = []
        for item in p:
            if isinstance(item, str):
                out.append(encode(item, "prompt"))
            else:
                if not item or any(not 0 <= t < vocab for t in item):
                    raise ApiError(400, f"token-id prompts must be non-empty, with ids in [0, {vocab})", "prompt")
                out.append(list(item))
        return out

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        check_model(req.model)
        req.refuse_unsupported()
        prompts = completion_prompts(req)
        max_tokens = budget(prompts, req.max_tokens, COMPLETION_MAX_TOKENS, "max_tokens", "prompt")
        return await run(request, req, prompts, rows_of(req, prompts, max_tokens), _Shape(False, loaded.name))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request) -> Response:
        check_model(req.model)
        req.refuse_unsupported()
        if loaded.chat is None:
            raise ApiError(400, f"`{loaded.name}` is a base model with no chat format: use /v1/completions",
                           "messages", "model_not_chat")  # fmt: skip
        messages = [{"role": m.role, "content": m.text(f"messages.{i}.content")} for i, m in enumerate(req.messages)]
        for i, m in enumerate(messages):
            check_text(m["content"], f"messages.{i}.content")
        try:
            prompt = loaded.chat.prompt(messages)
        except UserError as err:
            raise ApiError(400, str(err), "messages") from err
        asked = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
        param = "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
        max_tokens = budget([prompt], asked, None, param, "messages")
        return await run(request, req, [prompt], rows_of(req, [prompt], max_tokens), _Shape(True, loaded.name))

    async def run(
        request: Request, req: _Sampled, prompts: list[list[int]], rows: list[Row], shape: _Shape
    ) -> Response:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        job = Job(rows, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
        scheduler.submit(job)
        prompt_tokens = sum(len(p) for p in prompts)  # once per prompt, whatever n (as OpenAI counts)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _stream(queue, job, len(rows), shape, prompt_tokens, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        collect = asyncio.ensure_future(_collect(queue, len(rows)))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collect.done():  # the client left (or the server is stopping): free its rows
                collect.cancel()
                scheduler.cancel(job)
        if not collect.done() or collect.cancelled():
            return Response(status_code=499)  # nobody is listening; nginx's "client closed request"
        texts, reasons, generated, error = collect.result()
        if error is not None:
            raise ApiError(500, error)
        choices = [shape.choice(i, texts[i], reasons[i], delta=False) for i in range(len(rows))]
        return JSONResponse({**shape.head(shape.object), "choices": choices, "usage": usage(prompt_tokens, generated)})

    async def _stream(
        queue: asyncio.Queue[Event], job: Job, n_rows: int, shape: _Shape, prompt_tokens: int, include_usage: bool
    ) -> AsyncIterator[str]:
        extra: dict[str, Any] = {"usage": None} if include_usage else {}
        remaining, generated = n_rows, 0
        try:
            if shape.chat:  # OpenAI opens each choice with its role
                for i in range(n_rows):
                    first = shape.choice(i, "", None, delta=True)
                    first["delta"] = {"role": "assistant", "content": ""}
                    yield shape.chunk([first], **extra)
            while remaining:
                event = await queue.get()
                if event.error is not None:
                    yield f"data: {json.dumps(error_body(event.error, 'server_error'))}\n\n"
                    remaining = 0  # nothing more will come for this job
                    return
                if event.text:
                    yield shape.chunk([shape.choice(event.index, event.text, None, delta=True)], **extra)
                if event.finish_reason is not None:
                    remaining -= 1
                    generated += event.completion_tokens
                    last = shape.choice(event.index, None if shape.chat else "", event.finish_reason, delta=True)
                    yield shape.chunk([last], **extra)
            if include_usage:
                yield shape.chunk([], usage(prompt_tokens, generated))
            yield "data: [DONE]\n\n"
        finally:  # cancelled at a disconnect (Starlette cancels the stream when the client goes away)
            if remaining:
                scheduler.cancel(job)

    return Guard(app, api_key, max_body)


async def _collect(queue: asyncio.Queue[Event], n_rows: int) -> tuple[list[str], list[str | None], int, str | None]:
    """Every row's text and finish reason, the tokens generated, and an error if the batch failed."""
    texts: list[str] = [""] * n_rows
    reasons: list[str | None] = [None] * n_rows
    remaining, generated = n_rows, 0
    while remaining:
        event = await queue.get()
        if event.error is not None:
            return texts, reasons, generated, event.error
        texts[event.index] += event.text
        if event.finish_reason is not None:
            reasons[event.index] = event.finish_reason
            generated += event.completion_tokens
            remaining -= 1
    return texts, reasons, generated, None


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body was read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
