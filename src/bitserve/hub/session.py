"""What bitserve does not take on trust in ``huggingface_hub``'s HTTP session and process:
:func:`guard_session` checks every answer of the hub before ``huggingface_hub`` acts on
it (cache paths named by headers, rate-limit waits, bodies longer than the file or
slower than a trickle: :func:`bounded_transfers`) and bounds the wait for a listing
(:func:`bounded_listing`) or a file's metadata (:func:`bounded_metadata_wait`),
:func:`stopping_signals_unwind`
lets SIGTERM and SIGHUP reach its cleanup, :func:`log_hub_once` prints its warnings once.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import httpx2
from huggingface_hub import constants, get_session

from bitserve.hub.catalog import COMMIT
from bitserve.hub.errors import (
    HubSilentError,
    OversizeTransferError,
    RateLimitedError,
    StalledTransferError,
    UnsafeHeaderError,
)

# the longest wait a rate-limiting hub may ask for before a retry; past it, the pull stops
MAX_RATE_LIMIT_WAIT_S = 60
# the IETF RateLimit header, as huggingface_hub reads it: '"api";r=0;t=3600' (r requests
# left, t seconds until the window resets)
_RATE_LIMIT = re.compile(r'"\w+"\s*;\s*r\s*=\s*(\d+)\s*;\s*t\s*=\s*(\d+)')
# an ETag huggingface_hub may name a blob after: a token without '/', '\\' or a leading '.'
_PLAIN_ETAG = re.compile(r"[\w+=-][\w.+=-]*")
# the slowest a download may run, averaged over a stall window, before it is stopped
MIN_TRANSFER_RATE_BPS = 1000


@dataclass(frozen=True, slots=True)
class _TransferLimits:
    filename: str
    max_bytes: int | None  # the most bytes one answer may bring (the size the hub lists)
    stall_s: float | None  # the window over which it must average MIN_TRANSFER_RATE_BPS


@dataclass(frozen=True, slots=True)
class _MetadataDeadline:
    filename: str
    timeout_s: float
    until: float  # time.monotonic() past which no metadata request is sent


# set by bounded_transfers() and bounded_metadata_wait()
_TRANSFER_LIMITS: ContextVar[_TransferLimits | None] = ContextVar(
    "bitserve_transfer_limits", default=None
)
_METADATA_DEADLINE: ContextVar[_MetadataDeadline | None] = ContextVar(
    "bitserve_metadata_deadline", default=None
)
# time.monotonic() past which a listing's body may bring no more, set by bounded_listing()
_LISTING_DEADLINE: ContextVar[float | None] = ContextVar("bitserve_listing_deadline", default=None)


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
    """Make ``huggingface_hub``'s HTTP session check every request and answer
    (:func:`_check_request`, :func:`_check_answer`); it may have been made anew since the
    last call, and the check of that is cheap."""
    session = get_session()
    hooks = session.event_hooks
    if _check_answer not in hooks["response"]:
        session.event_hooks = {
            **hooks,
            "request": [*hooks["request"], _check_request],
            "response": [*hooks["response"], _check_answer],
        }


@contextlib.contextmanager
def bounded_transfers(
    filename: str, max_bytes: int | None, stall_s: float | None = None
) -> Iterator[None]:
    """File downloads in the block stop at ``max_bytes`` (the size the hub lists) with
    :class:`OversizeTransferError`: ``huggingface_hub`` writes whatever a body brings and
    compares sizes only at its end, so a body without end (no ``Content-Length``, or a
    gzip bomb) filled the disk. They stop with :class:`StalledTransferError` when a
    window of ``stall_s`` seconds brings less than ``MIN_TRANSFER_RATE_BPS`` on average:
    its read timeout ends only a silent body, and one byte every few seconds ran for ever.
    None: no bound."""
    token = _TRANSFER_LIMITS.set(_TransferLimits(filename, max_bytes, stall_s))
    try:
        yield
    finally:
        _TRANSFER_LIMITS.reset(token)


@contextlib.contextmanager
def bounded_metadata_wait(filename: str, timeout_s: float) -> Iterator[None]:
    """The hub's answers about a file's metadata (the HEAD requests of a download) in the
    block must all come within ``timeout_s`` seconds, else :class:`HubSilentError`:
    ``huggingface_hub`` asks six times over, up to 60 s each, and a hub that accepted
    and never answered held the command for six minutes."""
    limit = _MetadataDeadline(filename, timeout_s, time.monotonic() + timeout_s)
    token = _METADATA_DEADLINE.set(limit)
    try:
        yield
    finally:
        _METADATA_DEADLINE.reset(token)


@contextlib.contextmanager
def bounded_listing(timeout_s: float) -> Iterator[None]:
    """The listing asked for in the block must have arrived whole within ``timeout_s``
    seconds, else ``httpx2.ReadTimeout`` (as a silent hub gets): its read timeout bounds
    each read, and a body sent a byte every few seconds held the command for ever."""
    token = _LISTING_DEADLINE.set(time.monotonic() + timeout_s)
    try:
        yield
    finally:
        _LISTING_DEADLINE.reset(token)


def _check_request(request: httpx2.Request) -> None:
    """An event hook on ``huggingface_hub``'s session: a metadata request waits no longer
    than the time left of :func:`bounded_metadata_wait`, and none is sent past it."""
    deadline = _METADATA_DEADLINE.get()
    if deadline is None or request.method != "HEAD":
        return
    left = deadline.until - time.monotonic()
    if left <= 0:
        raise HubSilentError(request.url.host, deadline.filename, deadline.timeout_s)
    timeouts: dict[str, float | None] = dict(request.extensions.get("timeout", {}))
    for phase in ("connect", "read", "write", "pool"):
        wait = timeouts.get(phase)
        timeouts[phase] = left if wait is None else min(wait, left)
    request.extensions = {**request.extensions, "timeout": timeouts}


def _check_answer(response: httpx2.Response) -> None:
    """An event hook on ``huggingface_hub``'s session, for what it takes on trust."""
    if response.status_code == 429:
        _refuse_long_waits(response)
    if response.request.method == "HEAD":
        _refuse_unsafe_names(response)
    listing_until = _LISTING_DEADLINE.get()
    if listing_until is not None and response.request.method == "GET":
        _bound_listing(response, listing_until)
    limits = _TRANSFER_LIMITS.get()
    if limits is not None and response.request.method == "GET" and response.is_success:
        if limits.max_bytes is not None:
            _bound_body(response, limits.max_bytes)
        if limits.stall_s is not None:
            _watch_rate(response, limits.filename, limits.stall_s)


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


def _bound_listing(response: httpx2.Response, until: float) -> None:
    """Make the body of ``response`` stop with ``httpx2.ReadTimeout`` past ``until``."""
    read = response.iter_raw

    def bounded(chunk_size: int | None = None) -> Iterator[bytes]:
        for chunk in read(chunk_size):
            if time.monotonic() > until:
                raise httpx2.ReadTimeout("timed out", request=response.request)
            yield chunk

    response.iter_raw = bounded  # type: ignore[method-assign]


def _watch_rate(response: httpx2.Response, filename: str, window_s: float) -> None:
    """Make the body of ``response``, as it arrives (each network read, not the 10 MB
    chunks ``huggingface_hub`` writes), stop when a window of ``window_s`` seconds
    brings less than ``MIN_TRANSFER_RATE_BPS`` on average."""
    read = response.iter_raw

    def watched(chunk_size: int | None = None) -> Iterator[bytes]:
        start, arrived = time.monotonic(), 0
        for chunk in read(chunk_size):
            arrived += len(chunk)
            elapsed = time.monotonic() - start
            if elapsed >= window_s:
                if arrived < MIN_TRANSFER_RATE_BPS * elapsed:
                    raise StalledTransferError(filename, arrived, elapsed)
                start, arrived = time.monotonic(), 0
            yield chunk

    response.iter_raw = watched  # type: ignore[method-assign]


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
