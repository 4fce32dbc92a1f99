"""What a request meets before any route reads it: the ``Host`` check, the body size limit
and, on routes that need a key, the key check — all before the body is read, so a client
that will be refused never makes the server read (and hold) its body.

- :class:`EdgeGuard` (pure ASGI): a ``Host`` the server does not answer to is a 400 (DNS
  rebinding: a web page on another name must not reach a keyless server's conversations
  through the browser), and so is a request with both ``Transfer-Encoding`` and
  ``Content-Length`` (RFC 9112 6.3: a proxy in front may end the body elsewhere than
  h11, which follows ``Transfer-Encoding``: request smuggling); a ``Content-Length``
  over the limit is a 413 at once, and a body without one (chunked) is counted as the
  app reads it and cut with a 413 there; a body the connection stopped waiting for
  (``--head-timeout``) is a 408 there too. A ``HEAD`` request runs its path's ``GET``
  (uvicorn sends the head, not the body), so health checks that use ``HEAD`` work.
- :class:`GuardedRoute`: the route class of the routers that need a key; it checks the
  ``Authorization`` header before FastAPI reads the body (FastAPI itself reads the body
  first and solves dependencies after), then refuses a JSON body holding text that is
  not Unicode (a lone surrogate such as ``"\\ud800"``: legal JSON, but not encodable as
  UTF-8, so it could be neither tokenized nor stored and sent back) with a 400 naming
  where it is.

Both answer in the API's one error shape (``errors.error_response``), which is why these
are a few lines here rather than Starlette's ``TrustedHostMiddleware`` and FastAPI's
``max_body_size`` (plain-text ``Invalid host header`` and ``Content Too Large``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bitserve.api.auth import require_configured_key, require_key
from bitserve.api.connections import REFUSAL
from bitserve.api.errors import (
    BodyTooLargeError,
    InvalidHostError,
    InvalidParameterError,
    MalformedRequestError,
    error_response,
)
from bitserve.store.base import is_valid_text

ANY_HOST = "*"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def host_name(host_header: str) -> str:
    """``Host`` without its port, lower-cased; IPv6 literals without brackets."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def default_allowed_hosts(bound: str, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The names a server bound to ``bound`` answers to: loopback names, the bound name,
    and ``extra`` (``--allowed-host``). IP literals are always accepted (see
    :class:`EdgeGuard`)."""
    return tuple(dict.fromkeys(n.lower() for n in (*LOOPBACK_NAMES, bound, *extra) if n))


class EdgeGuard:
    """Refuses, before the app runs, a request whose ``Host`` is not allowed (400), that
    has both ``Transfer-Encoding`` and ``Content-Length`` (400), or whose
    ``Content-Length`` exceeds ``max_body_bytes`` (413); the connection closes after.

    ``allowed_hosts`` holds names (``"*"``: any). A ``Host`` that is an IP literal is
    always allowed: DNS rebinding needs a name the attacker's DNS answers for, and a
    client that typed an address reached this server by it. No ``Host`` (HTTP/1.0) is
    allowed too: browsers always send one."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str], max_body_bytes: int) -> None:
        self.app = app
        self.allowed = frozenset(h.lower() for h in allowed_hosts)
        self.max_body_bytes = max_body_bytes

    def host_allowed(self, header: str | None) -> bool:
        if header is None or ANY_HOST in self.allowed:
            return True
        name = host_name(header)
        return name in self.allowed or is_ip_literal(name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal: Exception | None = None
        if not self.host_allowed(headers.get("host")):
            refusal = InvalidHostError(headers.get("host", ""))
        elif "transfer-encoding" in headers and "content-length" in headers:
            refusal = MalformedRequestError(
                "the request has both Transfer-Encoding and Content-Length: send one "
                "(RFC 9112 section 6.3)"
            )
        elif _content_length(headers) > self.max_body_bytes:
            refusal = BodyTooLargeError(self.max_body_bytes)
        if refusal is None:
            # HEAD is answered as GET (FastAPI's routes serve no HEAD); uvicorn, whose scope
            # still says HEAD, sends no body. The route found is copied back for /metrics.
            inner = {**scope, "method": "GET"} if scope["method"] == "HEAD" else scope
            try:
                counter = _BodyCounter(self.max_body_bytes, inner, receive, send, scope)
                await counter.run(self.app)
            finally:
                if inner is not scope and "route" in inner:
                    scope["route"] = inner["route"]
            return
        await _refuse(refusal, scope, receive, send)


async def _refuse(exc: Exception, scope: Scope, receive: Receive, send: Send) -> None:
    response = error_response(exc)
    response.headers["Connection"] = "close"  # the unread body ends the connection
    await response(scope, receive, send)


class _BodyCounter:
    """Runs the app with a ``receive`` that counts body bytes: past the limit it answers
    413 itself, tells the app the client is gone (``http.disconnect``), and drops what
    the app sends after that. A body the connection refused (it stopped coming: 408; a bad
    chunk: 400) is answered the same way: the connection marks ``outer``, the server's
    own scope, with ``REFUSAL`` (see :class:`~bitserve.api.connections.HeadDeadlineProtocol`)."""

    def __init__(
        self, limit: int, scope: Scope, receive: Receive, send: Send, outer: Scope
    ) -> None:
        self.limit, self.scope, self._receive, self._send = limit, scope, receive, send
        self.outer = outer
        self.received = 0
        self.refused = False

    async def run(self, app: ASGIApp) -> None:
        await app(self.scope, self.receive, self.send)

    async def receive(self) -> Message:
        if self.refused:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            refusal = self.outer.get("extensions", {}).get(REFUSAL)
            if refusal is not None:
                return await self._refuse(refusal["error"])
            if self.received > self.limit:
                return await self._refuse(BodyTooLargeError(self.limit))
        return message

    async def _refuse(self, exc: Exception) -> Message:
        self.refused = True
        await _refuse(exc, self.scope, self._receive, self._send)
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if not self.refused:
            await self._send(message)


def _content_length(headers: Headers) -> int:
    try:
        return int(headers.get("content-length", "0"))
    except ValueError:
        return 0  # h11 refuses a malformed length itself


_KEY_CHECKS = (require_key, require_configured_key)


class GuardedRoute(APIRoute):
    """An ``APIRoute`` whose key dependency (``require_key`` or ``require_configured_key``
    among its dependencies) also runs before the body is read: a missing or wrong key is
    a 401 without reading a byte of it. Then the JSON body's text is checked
    (:func:`check_body_text`) before the route sees it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        checks = [d.dependency for d in self.dependencies if d.dependency in _KEY_CHECKS]

        async def checked(request: Request) -> Response:
            for check in checks:
                check(request)
            await check_body_text(request)
            return await handler(request)

        return checked


async def check_body_text(request: Request) -> None:
    """400 if the JSON body holds a string (or key) that is not valid Unicode. The parsed
    body is cached on the request, so the route does not parse it again; a body that is
    not JSON is left to the route (its 422)."""
    if "json" not in request.headers.get("content-type", "json"):
        return
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deep
        return
    where = invalid_text_at(body)
    if where is not None:
        raise InvalidParameterError(
            f"{where or 'body'}: text must be valid Unicode (a lone surrogate such as "
            "\\ud800 is not)",
            where or None,
        )


def invalid_text_at(value: Any) -> str | None:
    """The path (``messages[0].content``; ``""`` for the body itself) of the first string
    or key in ``value`` that is not valid Unicode, or None. Iterative: JSON may nest as
    deep as the parser allows."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if not is_valid_text(item):
                return path
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                if not is_valid_text(key):
                    return path
                stack.append((child, f"{path}.{key}" if path else str(key)))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{i}]") for i, child in reversed(list(enumerate(item))))
    return None
