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
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Any

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE as H11_MAX_HEAD_BYTES
from uvicorn.protocols.http.h11_impl import H11Protocol

from bitserve.api.errors import MalformedRequestError, RequestTimeoutError, error_body

log = logging.getLogger(__name__)

ACCEPT_ERROR_MESSAGE = "socket.accept() out of system resource"  # asyncio's wording
ACCEPT_ERROR_INTERVAL_S = 10.0
# the scope extension asking the app to answer with an error instead of reading more of the
# request's body (value: {"error": the APIError}); EdgeGuard answers it
REFUSAL = "bitserve.refusal"


class HeadDeadlineProtocol(H11Protocol):
    """Ends a connection that has not sent a complete request head within
    ``head_timeout_s`` of the server starting to wait for one (a new connection, or the
    next request on a kept-alive one), or that pauses longer than that while sending a
    body (as nginx's ``client_body_timeout``: between two reads, not for the whole body;
    the body's size is ``--max-body-mb``'s). The response is not limited here.

    What the client is told, and what ``/metrics`` counts (nginx's 408 Request Timeout):

    - a body that stopped: the app answers 408 ``request_timeout`` under the request's
      route (the protocol marks the request with :data:`REFUSAL` and wakes the
      app's ``receive``; :class:`~bitserve.api.edge.EdgeGuard` answers), then the
      connection closes. If nobody has answered one more timeout later, it is closed.
    - a head begun but not finished: a 408 written here (the app never saw a request),
      counted by ``unrouted`` (``unmatched`` in ``/metrics``), then closed.
    - nothing sent at all (an idle connection, or an idle kept-alive one): closed, with
      neither an answer nor a count, as nginx does.

    A request h11 cannot parse (a bad chunk size, two ``Content-Length``, a head over
    h11's 16 KB) is answered here too, in the API's error shape with the replica's
    headers (uvicorn's own answer is plain text), under h11's status (400, 431 for a head
    too large, 501 for a ``Transfer-Encoding`` other than chunked), and counted; in the
    middle of a body (a bad chunk) the app answers it, 400 under its route, as a 408."""

    head_timeout_s: float = 10.0
    answer_headers: tuple[tuple[bytes, bytes], ...] = ()
    _head_timer: asyncio.TimerHandle | None = None
    _lingering = False

    @staticmethod
    def unrouted(status: int) -> None:
        """Counts an answer written here, which no route saw (``head_timeout_protocol``
        sets it)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        if self._lingering:  # answered and closing: what still comes is dropped
            return
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
                self._arm()
        else:
            self._stop_head_timer()

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_late)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        state = self.conn.their_state
        if self.transport.is_closing():
            return
        if self._app_refusing():  # the app was asked to answer and has not: close
            self.transport.close()
        elif state is h11.SEND_BODY:
            self._body_late()
        elif state is h11.IDLE and self.conn.trailing_data[0]:  # part of a head came
            self._answer(RequestTimeoutError(self.head_timeout_s, "head"))
        elif state is h11.IDLE:
            self.transport.close()

    def _body_late(self) -> None:
        if self.flow.read_paused:  # the app is behind, not them
            self._arm()
        elif not self._refuse_in_app(RequestTimeoutError(self.head_timeout_s)):
            self.transport.close()

    def _app_refusing(self) -> bool:
        return self.cycle is not None and REFUSAL in self.cycle.scope.get("extensions", {})

    def _refuse_in_app(self, exc: Exception) -> bool:
        """Have the app answer ``exc`` under its route, if it is still reading the body
        (waiting in ``receive``, where ``EdgeGuard`` answers) and has not answered yet;
        the connection closes after it, or one more timeout later if nobody answers."""
        cycle = self.cycle
        if cycle is None or cycle.response_started or not cycle.more_body:
            return False
        if self._app_refusing():
            return False
        cycle.scope.setdefault("extensions", {})[REFUSAL] = {"error": exc}
        cycle.keep_alive = False
        cycle.message_event.set()
        self._stop_head_timer()
        self._arm()
        return True

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to what h11 refused (called while handling its error)."""
        error = sys.exc_info()[1]
        if not isinstance(error, h11.RemoteProtocolError):
            super().send_400_response(msg)
            return
        if error.error_status_hint == 431:
            reason = f"its head is over {H11_MAX_HEAD_BYTES // 1024} KB"
        else:  # h11's reason, without the bytes it quotes (they may hold a secret)
            reason = re.split(r": (?:bytearray\(|b['\"])", str(error), maxsplit=1)[0]
        exc = MalformedRequestError(f"the request is not valid HTTP/1.1: {reason}")
        if not self._refuse_in_app(exc):  # mid-body (a bad chunk): the app answers
            self._answer(exc, error.error_status_hint)

    def _answer(self, exc: Exception, status: int | None = None) -> None:
        """Write ``exc``'s error answer (status: ``status`` or its own) and close: the
        request was never whole, so h11 cannot send it."""
        own, body = error_body(exc)
        status = status or own
        content = json.dumps(body, separators=(",", ":")).encode()  # as the app writes it
        head = [
            b"HTTP/1.1 %d %s" % (status, HTTPStatus(status).phrase.encode()),
            b"content-type: application/json",
            b"content-length: %d" % len(content),
            b"connection: close",
            *(name + b": " + value for name, value in self.answer_headers),
        ]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + content)
        self.unrouted(status)
        self._linger()

    def _linger(self) -> None:
        """Close once the client has stopped sending (its EOF), within ``head_timeout_s``:
        closed with its bytes unread, the connection would be reset, and the client could
        lose the answer before reading it (nginx's ``lingering_close``)."""
        self._lingering = True
        self._stop_head_timer()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self.transport.close)


def head_timeout_protocol(
    seconds: float,
    unrouted: Callable[[int], None] = lambda status: None,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> type[HeadDeadlineProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with a ``seconds`` deadline;
    ``unrouted(status)`` counts the answers it writes itself (a head that never finished,
    a request h11 refused), which carry ``headers``."""
    attrs = {
        "head_timeout_s": seconds,
        "unrouted": staticmethod(unrouted),
        "answer_headers": tuple(headers),
    }
    return type("HeadDeadlineProtocol", (HeadDeadlineProtocol,), attrs)


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
