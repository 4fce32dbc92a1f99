"""``EngineLoop``: one thread owns the model and runs generations one at a time.

The async web server never touches the model. A route calls ``submit(request)`` and gets a
``RequestHandle``: an async iterator of ``TokenEvent``s that the engine thread feeds through
``loop.call_soon_threadsafe`` into an ``asyncio.Queue``. ``handle.cancel()`` (a client went
away) sets the ``threading.Event`` given to ``Generator.generate``, which stops within one
token; a request cancelled while still queued never starts.

The queue is bounded (``max_queue`` waiting requests, the running one not counted): a full
queue raises ``QueueFullError`` at once, which the API turns into 503 + ``Retry-After``.

Batching (a later issue) replaces the one-at-a-time ``_run_generation`` with a scheduler
that steps several sequences; ``submit(GenerationRequest) -> RequestHandle`` stays the seam.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from bitserve.engine.types import GenerationRequest, TokenEvent

log = logging.getLogger(__name__)

T = TypeVar("T")


class TokenGenerator(Protocol):
    """What the loop needs from ``bitserve.engine.generate.Generator``."""

    def generate(
        self, req: GenerationRequest, cancel: threading.Event | None = None
    ) -> Iterator[TokenEvent]: ...


G = TypeVar("G", bound=TokenGenerator)


class QueueFullError(Exception):
    """The engine queue holds ``max_queue`` waiting requests; retry after ``retry_after`` s."""

    def __init__(self, max_queue: int, retry_after: int) -> None:
        super().__init__(f"the server is busy: {max_queue} requests are already waiting")
        self.max_queue = max_queue
        self.retry_after = retry_after


class EngineStoppedError(RuntimeError):
    """The engine loop is not running (not started yet, or shut down)."""


@dataclass(slots=True)
class EngineStats:
    """Counters written only by the engine thread (plain int reads are safe elsewhere)."""

    requests_started: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0  # cancelled before or during generation
    requests_failed: int = 0
    tokens_generated: int = 0
    busy_seconds: float = 0.0
    running: bool = False

    def mean_request_seconds(self) -> float:
        done = self.requests_finished + self.requests_failed
        return self.busy_seconds / done if done else 1.0


_END = object()


class RequestHandle:
    """The async side of one submitted generation. Iterate it for ``TokenEvent``s; the
    iteration ends after the event carrying ``finish_reason`` (or raises the engine's
    exception). ``cancel()`` is idempotent and safe from any thread."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.cancel_event = threading.Event()
        self._loop = loop
        self._events: asyncio.Queue[object] = asyncio.Queue()

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def _push(self, item: object) -> None:
        """Called on the engine thread. If the event loop is gone, cancel instead."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # event loop closed: nobody is listening any more
            self.cancel_event.set()

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[TokenEvent]:
        while True:
            item = await self._events.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, TokenEvent)
            yield item


@dataclass(slots=True)
class _Generation:
    handle: RequestHandle


@dataclass(slots=True)
class _Call:
    fn: Callable[[Any], Any]
    future: concurrent.futures.Future[Any]


class EngineLoop(Generic[G]):
    """Owns ``generator`` (and through it the model) on one thread named ``bitserve-engine``.

    ``start()`` before use, ``stop()`` to finish the running job and join the thread.
    """

    def __init__(self, generator: G, max_queue: int = 16) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.generator = generator
        self.max_queue = max_queue
        self.stats = EngineStats()
        self._jobs: queue.Queue[_Generation | _Call | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._current: RequestHandle | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine loop already started")
        self._thread = threading.Thread(target=self._run, name="bitserve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything queued, let the running job notice, join the thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._drain_queue()
        current = self._current
        if current is not None:
            current.cancel()
        self._jobs.put(None)  # blocks only while the running job finishes a token
        thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        """Requests waiting (the running one not counted)."""
        return self._jobs.qsize()

    # -- the async side ---------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a generation; call from a running event loop. Raises ``QueueFullError``."""
        handle = RequestHandle(request, asyncio.get_running_loop())
        self._enqueue(_Generation(handle))
        return handle

    async def call(self, fn: Callable[[G], T]) -> T:
        """Run ``fn(generator)`` on the engine thread (in queue order) and await its result:
        for work that needs the model but is not a generation (prompt logprobs)."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._enqueue(_Call(fn, future))
        return await asyncio.wrap_future(future)

    def _enqueue(self, job: _Generation | _Call) -> None:
        if self._thread is None:
            raise EngineStoppedError("the engine loop is not running")
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            waiting = self.queue_depth + 1
            retry = math.ceil(self.stats.mean_request_seconds() * waiting)
            raise QueueFullError(self.max_queue, max(1, min(retry, 60))) from None

    def _drain_queue(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if isinstance(job, _Generation):
                job.handle.cancel()
                job.handle._push(EngineStoppedError("the server is shutting down"))
            elif isinstance(job, _Call):
                job.future.set_exception(EngineStoppedError("the server is shutting down"))

    # -- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            started = time.perf_counter()
            self.stats.running = True
            try:
                if isinstance(job, _Generation):
                    self._run_generation(job.handle)
                else:
                    self._run_call(job)
            finally:
                self.stats.running = False
                self.stats.busy_seconds += time.perf_counter() - started

    def _run_call(self, job: _Call) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.fn(self.generator))
        except Exception as exc:
            job.future.set_exception(exc)

    def _run_generation(self, handle: RequestHandle) -> None:
        if handle.cancelled:
            self.stats.requests_cancelled += 1
            handle._push(_END)
            return
        self.stats.requests_started += 1
        self._current = handle
        try:
            for event in self.generator.generate(handle.request, handle.cancel_event):
                self.stats.tokens_generated += 1
                handle._push(event)
                if event.finish_reason is not None or handle.cancelled:
                    break
        except Exception as exc:
            log.exception("generation failed")
            self.stats.requests_failed += 1
            handle._push(exc)
            return
        finally:
            self._current = None
        if handle.cancelled:
            self.stats.requests_cancelled += 1
        self.stats.requests_finished += 1
        handle._push(_END)
