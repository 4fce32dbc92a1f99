"""Connection-level limits of the real server (uvicorn, h11): what no route can see.

- :func:`head_timeout_protocol`: uvicorn's h11 protocol with a deadline for every request
  head, and the same limit on every pause while a body is being sent. uvicorn times out
  idle keep-alive connections but never a connection that has not finished sending its
  head or its body, so half-open connections (slowloris, or a body that stops halfway)
  used to stay forever and use up the file descriptors real clients need.
- :class:`AcceptErrorThrottle`: when accepting fails for lack of resources (EMFILE: out of
  file descriptors), asyncio logs it once per attempt — with uvicorn's backlog of 2,048,
  thousands of tracebacks a second. The throttle logs the first one and then one line per
  interval with the count, and passes every other loop error to the default handler.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

ACCEPT_ERROR_MESSAGE = "socket.accept() out of system resource"  # asyncio's wording
ACCEPT_ERROR_INTERVAL_S = 10.0


class HeadDeadlineProtocol(H11Protocol):
    """Closes a connection that has not sent a complete request head within
    ``head_timeout_s`` of the server starting to wait for one (a new connection, or the
    next request on a kept-alive one), or that pauses longer than that while sending a
    body (as nginx's ``client_body_timeout``: between two reads, not for the whole body;
    the body's size is ``--max-body-mb``'s). The response is not limited here."""

    head_timeout_s: float = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _watch_head(self) -> None:
        """Arm the deadline once while a head is awaited (h11's client state IDLE: a head
        sent a byte at a time gets no more time), again at every piece of a body being
        sent (SEND_BODY), and drop it once the request has come."""
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            self._stop_head_timer()
        if state is h11.IDLE or state is h11.SEND_BODY:
            if self._head_timer is None and not self.transport.is_closing():
                self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_late)
        else:
            self._stop_head_timer()

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        state = self.conn.their_state
        if self.transport.is_closing() or state not in (h11.IDLE, h11.SEND_BODY):
            return
        if state is h11.SEND_BODY and self.flow.read_paused:  # the app is behind, not them
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_late)
            return
        self.transport.close()


def head_timeout_protocol(seconds: float) -> type[HeadDeadlineProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with a ``seconds`` deadline."""
    return type("HeadDeadlineProtocol", (HeadDeadlineProtocol,), {"head_timeout_s": seconds})


class AcceptErrorThrottle:
    """An event-loop exception handler: accept failures are logged at most once per
    ``interval_s`` (with how many there were since the last line); anything else goes to
    the loop's default handler. :meth:`install` on the server's loop."""

    def __init__(self, interval_s: float = ACCEPT_ERROR_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.suppressed = 0
        self._last = -float("inf")

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.set_exception_handler(self)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != ACCEPT_ERROR_MESSAGE:
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self.suppressed += 1
            return
        self._last = now
        exc = context.get("exception")
        log.error(
            "cannot accept connections: %s (%d more failures since the last report; next "
            "report in %.0f s at the earliest). Raise the open-files limit (ulimit -n) or "
            "put a proxy with connection limits in front.",
            exc,
            self.suppressed,
            self.interval_s,
        )
        self.suppressed = 0
