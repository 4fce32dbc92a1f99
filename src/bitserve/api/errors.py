"""Every error the API can answer with, and the ONE table that maps them to HTTP.

The body is always OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
Client mistakes are 4xx, never 500: ill-typed or missing fields and malformed JSON are 422
(as the BitNet API guide documents), out-of-range values 400 with ``param``, unknown
conversations/models 404, a missing or wrong key 401, a full queue or an unreachable
conversation store 503 + ``Retry-After``.
A stream that fails mid-way sends the same body as an SSE ``data:`` event and closes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from bitserve.engine.constraint import GrammarFailedError
from bitserve.engine.generate import ContextLengthError
from bitserve.engine.loop import EngineStoppedError, GenerationFailedError, QueueFullError
from bitserve.engine.sampling import SamplingParamError
from bitserve.store import (
    ConversationChangedError,
    ConversationNotFoundError,
    InvalidTextError,
    StorageFullError,
    StoreUnavailableError,
    TurnEndedError,
)

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error raised by the API layer itself; the table below gives its status."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidParameterError(APIError):
    """A well-typed value outside its allowed range, or an unsupported combination."""


class ContextLengthExceededError(APIError):
    """The prompt leaves no room for a single generated token."""

    def __init__(self, prompt_tokens: int, context_length: int, param: str = "messages") -> None:
        super().__init__(
            f"This model's maximum context length is {context_length} tokens. However, your "
            f"prompt resulted in {prompt_tokens} tokens.",
            param=param,
            code="context_length_exceeded",
        )
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


class InputTooLongError(APIError):
    """More text than the server accepts in one request, refused before tokenizing it."""

    def __init__(self, chars: int, limit: int, param: str) -> None:
        super().__init__(
            f"{param}: {chars} characters of text is more than this server accepts in one "
            f"request ({limit}: more than its context could hold, or --max-input-chars)",
            param=param,
            code="input_too_long",
        )


class BodyTooLargeError(APIError):
    """A request body over the server's limit (``--max-body-mb``); refused unread."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the request body is larger than this server accepts ({limit} bytes; --max-body-mb)",
            code="request_too_large",
        )


class RequestTimeoutError(APIError):
    """A request body that stopped arriving: nothing came for ``--head-timeout`` seconds
    (or a request head that never finished)."""

    def __init__(self, timeout_s: float, what: str = "body") -> None:
        super().__init__(
            f"the request {what} stopped arriving: nothing came for {timeout_s:g} s "
            "(--head-timeout)",
            code="request_timeout",
        )


class MalformedRequestError(APIError):
    """A request that is not valid HTTP/1.1, or whose body's end is ambiguous (both
    ``Transfer-Encoding`` and ``Content-Length``: request smuggling through a proxy that
    reads the other one); the connection is closed after the answer."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="malformed_request")


class InvalidHostError(APIError):
    """A ``Host`` header naming a host this server does not answer to."""

    def __init__(self, host: str) -> None:
        super().__init__(
            f"this server does not answer to the host {host[:100]!r}; start it with "
            "--allowed-host NAME to accept that name",
            code="invalid_host",
        )


class ModelNotFoundError(APIError):
    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model `{model}` does not exist; GET /v1/models lists the served ones.",
            param="model",
            code="model_not_found",
        )


class RouteNotFoundError(APIError):
    """An oracle route name that the route config does not define."""


class AuthenticationError(APIError):
    def __init__(self, message: str) -> None:
        super().__init__(message, code="invalid_api_key")


class GenerationCancelledError(APIError):
    """The engine cancelled a generation the client did not cancel (server shutting down)."""


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error answer (OpenAI's shape)."""

    error: ErrorDetail


_STATUS_DOC = {
    400: "A value out of range, an unsupported combination, text that is not Unicode or too "
    "long, a prompt that does not fit, a Host the server does not answer to, a schema or "
    "grammar that broke while generating (`grammar_failed`).",
    401: "Missing or wrong API key.",
    408: "The request body stopped arriving for --head-timeout seconds.",
    404: "Unknown conversation, model or oracle route.",
    409: "The conversation changed while the turn was prepared (another server process "
    "on the same SQLite file wrote to it): nothing was stored.",
    413: "The request body is larger than --max-body-mb.",
    422: "Malformed JSON, or a missing or ill-typed field.",
    500: "The generation failed (`generation_failed`): the engine goes on.",
    503: "The queue is full (`Retry-After`), or the server is stopping.",
    507: "The conversation store's disk is full: nothing was written.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for ``statuses``, each with :class:`ErrorResponse`."""
    return {s: {"model": ErrorResponse, "description": _STATUS_DOC[s]} for s in statuses}


# what the routes of each kind can answer besides 200
EDGE_ERRORS = (400, 408, 413, 422)  # Host, Unicode, body time and size, validation: every route
KEYED_ERRORS = (*EDGE_ERRORS, 401)
GENERATING_ERRORS = (*KEYED_ERRORS, 404, 500, 503)


@dataclass(frozen=True, slots=True)
class ErrorKind:
    status: int
    type: str
    code: str | None = None


# The one table: exception class → HTTP status, OpenAI error type, default code.
# Looked up along the MRO, so subclasses inherit their parent's row.
ERROR_TABLE: dict[type[BaseException], ErrorKind] = {
    InvalidParameterError: ErrorKind(400, "invalid_request_error"),
    SamplingParamError: ErrorKind(400, "invalid_request_error"),
    ContextLengthExceededError: ErrorKind(400, "invalid_request_error", "context_length_exceeded"),
    ContextLengthError: ErrorKind(400, "invalid_request_error", "context_length_exceeded"),
    InputTooLongError: ErrorKind(400, "invalid_request_error", "input_too_long"),
    InvalidHostError: ErrorKind(400, "invalid_request_error", "invalid_host"),
    MalformedRequestError: ErrorKind(400, "invalid_request_error", "malformed_request"),
    AuthenticationError: ErrorKind(401, "invalid_request_error", "invalid_api_key"),
    ModelNotFoundError: ErrorKind(404, "invalid_request_error", "model_not_found"),
    RouteNotFoundError: ErrorKind(404, "invalid_request_error", "route_not_found"),
    ConversationNotFoundError: ErrorKind(404, "invalid_request_error", "conversation_not_found"),
    ConversationChangedError: ErrorKind(409, "invalid_request_error", "conversation_changed"),
    InvalidTextError: ErrorKind(400, "invalid_request_error", "invalid_value"),
    BodyTooLargeError: ErrorKind(413, "invalid_request_error", "request_too_large"),
    RequestTimeoutError: ErrorKind(408, "invalid_request_error", "request_timeout"),
    RequestValidationError: ErrorKind(422, "invalid_request_error", "invalid_value"),
    QueueFullError: ErrorKind(503, "server_error", "queue_full"),
    EngineStoppedError: ErrorKind(503, "server_error", "unavailable"),
    GenerationCancelledError: ErrorKind(503, "server_error", "cancelled"),
    GenerationFailedError: ErrorKind(500, "server_error", "generation_failed"),
    GrammarFailedError: ErrorKind(400, "invalid_request_error", "grammar_failed"),
    StorageFullError: ErrorKind(507, "server_error", "storage_full"),
    StoreUnavailableError: ErrorKind(503, "server_error", "store_unavailable"),
    # the client left (mid-body, or before its turn was stored): nobody reads the answer;
    # nginx's 499 keeps it out of the 5xx counts, and it is not logged
    ClientDisconnect: ErrorKind(499, "invalid_request_error", "client_closed_request"),
    TurnEndedError: ErrorKind(499, "invalid_request_error", "client_closed_request"),
}
_INTERNAL = ErrorKind(500, "server_error", "internal_error")


def error_kind(exc: BaseException) -> ErrorKind:
    if isinstance(exc, StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ErrorKind(exc.status_code, kind, None)
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return _INTERNAL


def _location(loc: Sequence[Any]) -> str:
    """``("body", "messages", 0, "role")`` → ``messages[0].role``."""
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON: {detail}".rstrip(": "), None
    param = _location(first.get("loc", ())) or None
    problems = "; ".join(f"{_location(e.get('loc', ())) or 'body'}: {e['msg']}" for e in errors)
    return problems, param


def error_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(status, OpenAI-shaped body) for any exception."""
    kind = error_kind(exc)
    param: str | None = None
    code = kind.code
    if isinstance(exc, RequestValidationError):
        message, param = _validation_message(exc)
    elif isinstance(exc, StarletteHTTPException):
        message = str(exc.detail)
    elif isinstance(exc, APIError):
        message, param, code = exc.message, exc.param, exc.code or code
    elif isinstance(exc, SamplingParamError):
        message, param = f"{exc.param}: {exc.message}", exc.param
    elif isinstance(exc, InvalidTextError | GrammarFailedError):
        message, param = str(exc), exc.where
    elif kind is _INTERNAL:
        message = "internal server error (see the server log)"
    else:
        message = str(exc)
    body = {"error": {"message": message, "type": kind.type, "param": param, "code": code}}
    return kind.status, body


def error_response(exc: BaseException) -> JSONResponse:
    status, body = error_body(exc)
    headers = {}
    if isinstance(exc, QueueFullError | StoreUnavailableError):
        headers["Retry-After"] = str(exc.retry_after)
    if isinstance(exc, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, StarletteHTTPException) and exc.headers:
        headers.update(exc.headers)
    # the engine logs a failed generation's traceback itself
    quiet = QueueFullError | EngineStoppedError | GenerationFailedError | GenerationCancelledError
    if isinstance(exc, StoreUnavailableError | StorageFullError):
        log.warning("%s", exc)  # storage trouble the sentence says all of: no traceback
    elif status >= 500 and not isinstance(exc, quiet):
        log.error("request failed", exc_info=exc)
    return JSONResponse(body, status_code=status, headers=headers)


def allowed_methods(request: Request) -> str:
    """Every method some route serves at the request's path (``Allow`` of a 405)."""
    methods: set[str] = set()
    routes = list(request.app.router.routes)
    while routes:
        route = routes.pop()
        included = getattr(route, "original_router", None)  # an included router's routes
        if included is not None:
            routes.extend(included.routes)
            continue
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


def unparsable_body(exc: BaseException) -> bool:
    """FastAPI's 400 "There was an error parsing the body": JSON its decoder raised other
    than ``JSONDecodeError`` on (bytes that are not UTF-8, nesting past Python's limit)."""
    return (
        isinstance(exc, StarletteHTTPException)
        and exc.status_code == 400
        and isinstance(exc.__cause__, UnicodeDecodeError | RecursionError)
    )


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception through ``error_response``."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        if unparsable_body(exc):  # malformed JSON, as the documented 422 says
            cause = exc.__cause__
            reason = "nested too deeply" if isinstance(cause, RecursionError) else str(cause)
            error = {"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error",
                     "ctx": {"error": reason}}  # fmt: skip
            exc = RequestValidationError([error])
        if isinstance(exc, StarletteHTTPException) and exc.status_code == 405:
            # Starlette names the methods of the first route on the path only
            exc = StarletteHTTPException(405, exc.detail, {"Allow": allowed_methods(request)})
        return error_response(exc)

    for cls in (*ERROR_TABLE, StarletteHTTPException, Exception):
        app.add_exception_handler(cls, handle)
