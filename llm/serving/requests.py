"""What llm.serve accepts: the request schemas (pydantic, strict) and OpenAI's error bodies.

Requests are validated by pydantic models that forbid unknown fields and coerce nothing (``"5"`` is not an
integer); every refusal is an ``ApiError``, answered as a 4xx with OpenAI's body ``{"error": {"message", "type",
"param", "code"}}``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

MAX_BODY_BYTES = 1 << 20  # a request body above 1 MiB is refused (413) before it is read whole
MAX_ROWS = 128  # prompts x n of one request (OpenAI's own cap on n)
MAX_STOP = 4  # stop strings per request, as OpenAI
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


class ApiError(Exception):
    """A refusal: HTTP status and OpenAI's error fields."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(error_body(err.message, err.kind, err.param, err.code), status_code=err.status)


# ----------------------------------------------------------------------------------------------- request schemas


class _Strict(BaseModel):
    # extra="forbid": an unknown (misspelt, unsupported) parameter is refused, as OpenAI does; strict: no coercion
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class _Sampled(_Strict):
    """The parameters both endpoints share (null means the default, as clients that send every key expect)."""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None  # default 1, OpenAI's
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None  # not OpenAI's; vLLM's name. 0 or null: no cut
    n: Annotated[int, Field(ge=1, le=MAX_ROWS)] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for OpenAI's abuse monitoring: nothing to do here
    # accepted at their neutral values only
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def refuse_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported by this server (only 0)", name, "unsupported_parameter")
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported by this server", "logit_bias", "unsupported_parameter")


class CompletionRequest(_Sampled):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise ApiError(400, "echo is not supported by this server", "echo", "unsupported_parameter")
        if self.logprobs is not None:
            raise ApiError(400, "logprobs is not supported by this server", "logprobs", "unsupported_parameter")
        if self.best_of not in (None, 1):
            raise ApiError(400, "best_of is not supported by this server (only 1)", "best_of", "unsupported_parameter")
        if self.suffix:
            raise ApiError(400, "suffix is not supported by this server", "suffix", "unsupported_parameter")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # other part types carry other keys: refused by type
    type: str
    text: str | None = None


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self, param: str) -> str:
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ApiError(400, f"only text content parts are supported, not {part.type!r}", param)
        return "\n".join(part.text for part in self.content)  # type: ignore[misc]


class ResponseFormat(_Strict):
    type: str


class ChatRequest(_Sampled):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs or self.top_logprobs is not None:
            raise ApiError(400, "logprobs is not supported by this server", "logprobs", "unsupported_parameter")
        if self.response_format is not None and self.response_format.type != "text":
            raise ApiError(400, "only response_format text is supported", "response_format", "unsupported_parameter")
        if self.tools or self.tool_choice not in (None, "none"):
            raise ApiError(400, "tools are not supported by this server", "tools", "unsupported_parameter")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ApiError(400, "give max_tokens or max_completion_tokens, not both", "max_completion_tokens")


def _param(error: dict[str, Any], body: Any) -> str | None:
    """The parameter's path in the request body ("messages.0.role"): pydantic's location without "body" and
    without the names it gives a union's alternatives ("str", "list[str]"), which are not in the body."""
    loc = tuple(error.get("loc", ()))
    path, node = [], body
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(node, dict) and part in node:
            path.append(str(part))
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path.append(str(part))
            node = node[part]
    if error.get("type") == "missing" and loc:
        path.append(str(loc[-1]))
    return ".".join(path) or None


def _validation_error(err: RequestValidationError) -> ApiError:
    """Pydantic's first error in OpenAI's terms, naming the parameter (with a union's alternatives together)."""
    errors = err.errors()
    first = errors[0]
    param, kind = _param(first, err.body), first.get("type", "")
    if kind == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})")
    if kind == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if kind == "missing":
        return ApiError(400, f"missing required parameter: {param}", param, "missing_required_parameter")
    if param is None:
        return ApiError(400, "the request body must be a JSON object (Content-Type: application/json)")
    # a union reports each alternative apart ("a valid string", "at most 4 items"): say them together
    messages = dict.fromkeys(e.get("msg", "invalid") for e in errors if _param(e, err.body) == param)
    return ApiError(400, f"invalid value for {param}: {'; or '.join(messages)}", param, "invalid_value")
