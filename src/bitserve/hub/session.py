"""What bitserve does not take on trust in ``huggingface_hub``'s HTTP session and process:
:func:`guard_session` checks every answer of the hub before ``huggingface_hub`` acts on
it (cache paths named by headers, rate-limit waits, bodies longer than the file:
:func:`bounded_transfers`), :func:`stopping_signals_unwind`
lets SIGTERM and SIGHUP reach its cleanup, :func:`log_hub_once` prints its warnings once.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import threading
from collections.abc import Iterator
from contextvars import ContextVar

import httpx2
from huggingface_hub import constants, get_session

from bitserve.hub.catalog import COMMIT
from bitserve.hub.errors import OversizeTransferError, RateLimitedError, UnsafeHeaderError

# the longest wait a rate-limiting hub may ask for before a retry; past it, the pull stops
MAX_RATE_LIMIT_WAIT_S = 60
# the IETF RateLimit header, as huggingface_hub reads it: '"api";r=0;t=3600' (r requests
# left, t seconds until the window resets)
_RATE_LIMIT = re.compile(r'"\w+"\s*;\s*r\s*=\s*(\d+)\s*;\s*t\s*=\s*(\d+)')
# an ETag huggingface_hub may name a blob after: a token without '/', '\\' or a leading '.'
_PLAIN_ETAG = re.compile(r"[\w+=-][\w.+=-]*")
# the most bytes one answer to a file download may bring, set by bounded_transfers()
_TRANSFER_LIMIT: ContextVar[int | None] = ContextVar("bitserve_transfer_limit", default=None)


def log_hub_once() -> None:
    """``huggingface_hub`` logs through a handler of its own and also passes each record
    on to the root logger, which bitserve's command line configures: every retry warning
    was printed twice, in two formats. Its own handler goes; the root's (bitserve's
    format and ``--log-level``) prints them once."""
    hub_logger = logging.getLogger("huggingface_hub")
    for handler in list(hub_logger.handlers):
        if type(handler) is logging.StreamHandler:
            hub_logger.removeHandler(handler)


@contextlib.contextmanager
def stopping_signals_unwind() -> Iterator[None]:
    """SIGTERM or SIGHUP in the block exit through ``SystemExit(128 + signal)`` instead of
    killing the process on the spot, so that ``huggingface_hub`` deletes its partial file
    (in a ``finally``): it names that file per process and never resumes it, so a pull
    stopped by systemd, ``docker stop`` or a closed terminal left it for good. Only the
    main thread can set handlers, and a handler someone else set is left alone."""
    stopping = (signal.SIGTERM, signal.SIGHUP)
    if threading.current_thread() is not threading.main_thread() or any(
        signal.getsignal(s) is not signal.SIG_DFL for s in stopping
    ):
        yield
        return

    def unwind(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for s in stopping:
        signal.signal(s, unwind)
    try:
        yield
    finally:
        for s in stopping:
            signal.signal(s, signal.SIG_DFL)


def guard_session() -> None:
    """Make ``huggingface_hub``'s HTTP session check every answer (:func:`_check_answer`);
    it may have been made anew since the last call, and the check of that is cheap."""
    session = get_session()
    hooks = session.event_hooks
    if _check_answer not in hooks["response"]:
        session.event_hooks = {**hooks, "response": [*hooks["response"], _check_answer]}


@contextlib.contextmanager
def bounded_transfers(max_bytes: int | None) -> Iterator[None]:
    """File downloads in the block stop at ``max_bytes`` (the size the hub lists) with
    :class:`OversizeTransferError`: ``huggingface_hub`` writes whatever a body brings and
    compares sizes only at its end, so a body without end (no ``Content-Length``, or a
    gzip bomb) filled the disk. None: no bound."""
    token = _TRANSFER_LIMIT.set(max_bytes)
    try:
        yield
    finally:
        _TRANSFER_LIMIT.reset(token)


def _check_answer(response: httpx2.Response) -> None:
    """An event hook on ``huggingface_hub``'s session, for what it takes on trust."""
    if response.status_code == 429:
        _refuse_long_waits(response)
    if response.request.method == "HEAD":
        _refuse_unsafe_names(response)
    limit = _TRANSFER_LIMIT.get()
    if limit is not None and response.request.method == "GET" and response.is_success:
        _bound_body(response, limit)


def _bound_body(response: httpx2.Response, limit: int) -> None:
    """Make the body of ``response``, as read (decoded), stop past ``limit`` bytes."""
    read = response.iter_bytes

    def bounded(chunk_size: int | None = None) -> Iterator[bytes]:
        seen = 0
        for chunk in read(chunk_size):
            seen += len(chunk)
            if seen > limit:
                raise OversizeTransferError(str(response.request.url), limit)
            yield chunk

    response.iter_bytes = bounded  # type: ignore[method-assign]


def _refuse_long_waits(response: httpx2.Response) -> None:
    """``huggingface_hub`` sleeps as long as a 429 answer asks, five times over: a
    ``Retry-After: 86400`` held the command for days."""
    wait = _retry_after_s(response.headers)
    if wait is not None and wait > MAX_RATE_LIMIT_WAIT_S:
        raise RateLimitedError(response.request.url.host, wait)


def _retry_after_s(headers: httpx2.Headers) -> int | None:
    """The seconds a 429 answer asks to wait, as ``huggingface_hub`` reads them."""
    limit = _RATE_LIMIT.search(headers.get("RateLimit", ""))
    if limit is not None and int(limit.group(1)) == 0:
        return int(limit.group(2))
    value = headers.get("Retry-After", "").strip()
    return int(value) if value.isdigit() else None


def _refuse_unsafe_names(response: httpx2.Response) -> None:
    """``huggingface_hub`` takes a file's snapshot folder from the HEAD answer's
    ``X-Repo-Commit`` and its blob name from ``X-Linked-Etag`` (else ``ETag``), joined to
    the cache path as they come; a hostile hub answering ``../../x`` would have a file
    written anywhere the user may write."""
    commit = response.headers.get(constants.HUGGINGFACE_HEADER_X_REPO_COMMIT)
    if commit is not None and not COMMIT.fullmatch(commit):
        raise UnsafeHeaderError(str(response.request.url), "X-Repo-Commit", commit)
    for header in (constants.HUGGINGFACE_HEADER_X_LINKED_ETAG, "ETag"):
        etag = response.headers.get(header)
        if etag is not None:
            name = etag.lstrip("W/").strip('"')  # as huggingface_hub normalizes it
            if not _PLAIN_ETAG.fullmatch(name):
                raise UnsafeHeaderError(str(response.request.url), header, etag)
            return  # huggingface_hub takes the first of the two
