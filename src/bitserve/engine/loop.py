"""``EngineLoop``: one thread owns the model; requests reach it through a bounded queue.

The async web server never touches the model. A route calls ``submit(request)`` and gets a
``RequestHandle``: an async iterator of ``TokenEvent``s that the engine thread feeds through
``loop.call_soon_threadsafe`` into an ``asyncio.Queue``. ``handle.cancel()`` (a client went
away) sets a ``threading.Event`` the engine checks after every token, so a generation stops
within one token; a request cancelled while still waiting never starts.

Two ways to run, same contract:

- with a :class:`~bitserve.engine.scheduler.Scheduler` (the server): every waiting request
  becomes a ``Sequence`` and the thread runs scheduler steps, each one batched forward pass
  for all running sequences (continuous batching, chunked prompts, prefix cache);
- without one: ``generator.generate()`` for one request at a time (tests use this with
  stand-in generators).

Other work that needs the model runs on the same thread: ``call(fn)`` between two steps,
and ``call_in_steps(fn)`` for long work (scoring a whole prompt) one piece between two
steps, so that no stream waits for more than one piece of it.

The queue is bounded: ``max_queue`` requests waiting (running ones not counted); a full
queue raises ``QueueFullError`` at once, which the API turns into 503 + ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from bitserve.engine.constraint import GrammarFailedError
from bitserve.engine.scheduler import Scheduler
from bitserve.engine.sequence import Sequence
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
    """The engine loop is not running (not started yet, shut down, or its thread died)."""


class GenerationFailedError(RuntimeError):
    """The engine could not complete a generation: its forward pass, its logits (NaN) or
    its sampling failed. Only the requests of the failing step get it; the engine goes on.
    The cause is chained (and logged)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"the generation failed: {cause}")
        self.__cause__ = cause


# /health reports the engine failing after this many steps in a row failed every request
# in them (one poisoned request alone does not mark the server unhealthy)
FAILED_STEPS_UNHEALTHY = 3


@dataclass(frozen=True, slots=True)
class EngineHealth:
    """``ok`` False: the engine thread is gone, or its last ``FAILED_STEPS_UNHEALTHY``
    steps all failed (``reason`` says which, with the last error)."""

    ok: bool
    reason: str | None = None


@dataclass(slots=True)
class EngineStats:
    """Counters written only by the engine thread (plain int reads are safe elsewhere).

    - ``requests_started`` / ``_finished`` / ``_cancelled`` (before or during generation) /
      ``_failed``: requests, cumulative.
    - ``tokens_generated``: tokens sampled (events sent), cumulative.
    - ``prompt_tokens``: prompt tokens run through the model; ``cached_tokens``: prompt
      tokens reused from the prefix cache instead (both cumulative, batched mode).
    - ``cache_lookups`` / ``cache_hits``: prefix-cache lookups and those that reused
      at least one token (hit rate = hits / lookups), cumulative.
    - ``running_sequences``: sequences in the running batch now (gauge);
      ``waiting_sequences``: admitted to the scheduler but not yet running (gauge; the
      queue depth is ``EngineLoop.queue_depth``).
    - ``kv_bytes``: bytes of KV cache allocated now (running sequences and prefix cache);
      ``prefix_cache_bytes``: the prefix cache's share (gauges).
    - ``steps``: batched forward passes; ``busy_seconds``: time spent in steps or jobs.
    - ``running``: True while the engine has a generation under way (batched mode: from
      the first step until no sequence is waiting or running) or a call in steps.
    - ``failed_steps_in_a_row``: steps since the last one that produced a token in which
      every sequence failed; ``last_error``: the latest failure's message.
    """

    requests_started: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_failed: int = 0
    tokens_generated: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cache_lookups: int = 0
    cache_hits: int = 0
    running_sequences: int = 0
    waiting_sequences: int = 0
    kv_bytes: int = 0
    prefix_cache_bytes: int = 0
    steps: int = 0
    busy_seconds: float = 0.0
    running: bool = False
    failed_steps_in_a_row: int = 0
    last_error: str | None = None

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
        self.cached_tokens = 0  # prompt tokens reused from the prefix cache (set by the engine)
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
        push_all([(self, item)])

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


def _deliver(items: list[tuple[RequestHandle, object]]) -> None:
    for handle, item in items:
        handle._events.put_nowait(item)


def push_all(items: list[tuple[RequestHandle, object]]) -> None:
    """Hand ``(handle, event)`` pairs to their event loops, in order: one wake-up of each
    loop for all of them (a batched step's events), not one per event. A handle whose
    loop is closed (nobody listens any more) is cancelled instead."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, object]]] = {}
    for handle, item in items:
        by_loop.setdefault(handle._loop, []).append((handle, item))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, batch)
        except RuntimeError:  # event loop closed
            for handle, _ in batch:
                handle.cancel_event.set()


@dataclass(slots=True)
class _Generation:
    handle: RequestHandle


@dataclass(slots=True)
class _Call:
    """``fn(generator)`` on the engine thread. ``in_steps``: ``fn`` returns a generator
    (``pieces``, once started) that yields between pieces of its work and returns the
    result; its future stays pending until then, so a caller that stops waiting cancels
    it between two pieces."""

    fn: Callable[[Any], Any]
    future: concurrent.futures.Future[Any]
    in_steps: bool = False
    pieces: Generator[None, None, Any] | None = None
    internal: bool = False  # the engine's own work: takes no place in the bounded queue


class EngineLoop(Generic[G]):
    """Owns ``generator`` (and through it the model) on one thread named ``bitserve-engine``.

    With ``scheduler`` the thread runs batched steps (``generator.start_sequence`` makes
    each request's ``Sequence``); without, ``generator.generate`` one request at a time.
    ``start()`` before use, ``stop()`` to cancel everything and join the thread.
    """

    def __init__(self, generator: G, max_queue: int = 16, scheduler: Scheduler | None = None):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.generator = generator
        self.max_queue = max_queue
        self.scheduler = scheduler
        self.stats = EngineStats()
        self._jobs: queue.Queue[_Generation | _Call | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._current: RequestHandle | None = None
        self._active: dict[Sequence, RequestHandle] = {}  # batched mode: running handles
        self._pieces: deque[_Call] = deque()  # batched mode: calls in steps under way
        self._lock = threading.Lock()  # guards _active against stop() from another thread
        prefix = scheduler.prefix_cache if scheduler is not None else None
        spill = prefix.spill if prefix is not None else None
        if spill is not None:  # a written spill's cache is released on this thread, soon
            assert scheduler is not None

            def reap(_: object) -> None:
                spill.reap()
                self._sync_stats(scheduler)  # the gauges see it even while idle

            spill.on_written = lambda: self._jobs.put(
                _Call(reap, concurrent.futures.Future(), internal=True)
            )

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine loop already started")
        target = self._run if self.scheduler is None else self._run_batched
        self._thread = threading.Thread(target=target, name="bitserve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything queued and running, let running sequences send their last
        ("cancelled") event, join the thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._drain_queue()
        current = self._current
        if current is not None:
            current.cancel()
        with self._lock:
            for handle in self._active.values():
                handle.cancel()
        self._jobs.put(None)
        thread.join(timeout)

    @property
    def alive(self) -> bool:
        """True while the engine thread runs (started, not stopped, not dead)."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def health(self) -> EngineHealth:
        """Whether the engine can run requests now (``/health``)."""
        if not self.alive:
            return EngineHealth(False, "the engine thread is not running")
        if self.stats.failed_steps_in_a_row >= FAILED_STEPS_UNHEALTHY:
            return EngineHealth(
                False,
                f"the last {self.stats.failed_steps_in_a_row} engine steps failed: "
                f"{self.stats.last_error}",
            )
        return EngineHealth(True)

    @property
    def queue_depth(self) -> int:
        """Jobs waiting (running ones not counted): generations and callers' calls (echo
        scoring too), which ``max_queue`` bounds; not the engine's own work (a spilled
        cache's release, a prefill ahead), which must never cost a client its place."""
        waiting = len(self.scheduler.waiting) if self.scheduler is not None else 0
        jobs = list(self._jobs.queue)
        return sum(not (isinstance(job, _Call) and job.internal) for job in jobs) + waiting

    @property
    def requests_waiting(self) -> int:
        """Requests waiting to run: queued generations and admitted sequences (what a
        router balances on; the engine's own calls, such as a spill reap, are none)."""
        waiting = len(self.scheduler.waiting) if self.scheduler is not None else 0
        return sum(isinstance(job, _Generation) for job in list(self._jobs.queue)) + waiting

    # -- the async side ---------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a generation; call from a running event loop. Raises ``QueueFullError``."""
        handle = RequestHandle(request, asyncio.get_running_loop())
        self._enqueue(_Generation(handle))
        return handle

    async def call(self, fn: Callable[[G], T]) -> T:
        """Run ``fn(generator)`` on the engine thread (in queue order, between steps) and
        await its result: for work that needs the model but is not a generation."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._enqueue(_Call(fn, future))
        return await asyncio.wrap_future(future)

    async def call_in_steps(self, fn: Callable[[G], Generator[None, None, T]]) -> T:
        """:meth:`call` for long work cut into pieces: ``fn(generator)`` returns a
        generator that yields between pieces and returns the result. The engine runs one
        piece between two scheduler steps (batched mode), so the running streams go on
        getting tokens while, say, a long prompt is scored; a caller that stops awaiting
        stops it before its next piece."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._enqueue(_Call(fn, future, in_steps=True))
        return await asyncio.wrap_future(future)

    def prefill_ahead(self, tokens: list[int], max_new: int, scope: str = "") -> None:
        """Queue :meth:`Scheduler.extend_cached` of ``tokens`` (batched mode; skipped while
        requests wait: it only saves a later request some time, and must not take a queue
        slot from one). Requests queued after it find its work done. A rest longer than
        ``max_new`` tokens (a conversation whose history cut moved: its kept history
        starts anew) is computed ``max_new`` tokens per call, each queued when the last is
        done and no request waits, so no request waits behind more than one piece."""
        scheduler = self.scheduler
        if scheduler is None or self.queue_depth > 0:
            return

        def extend(_: G) -> int:
            try:
                cached = scheduler.cached_length(tokens, scope)
                end = min(len(tokens), cached + max_new)
                guessed = len(tokens) - cached > max_new  # a new start: keep what exists
                done = scheduler.extend_cached(tokens[:end], max_new, scope, guessed)
                if done and end < len(tokens):
                    self.prefill_ahead(tokens, max_new, scope)  # the next piece
                return done
            except Exception:
                log.exception("prefill ahead failed")
                return 0

        with contextlib.suppress(QueueFullError, EngineStoppedError):
            self._enqueue(_Call(extend, concurrent.futures.Future(), internal=True))

    def _enqueue(self, job: _Generation | _Call) -> None:
        if not self.alive:  # never queue for a thread that will not take it
            raise EngineStoppedError("the engine loop is not running")
        if self.queue_depth >= self.max_queue:
            waiting = self.queue_depth + 1
            retry = math.ceil(self.stats.mean_request_seconds() * waiting)
            raise QueueFullError(self.max_queue, max(1, min(retry, 60)))
        self._jobs.put_nowait(job)

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

    # -- the engine thread: one request at a time ---------------------------------------------

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
        if job.in_steps:
            self._start_pieces(job)
            if self.scheduler is None:  # one job at a time: all its pieces now
                while self._pieces and not self._run_piece(self._pieces[0]):
                    pass
            return
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.fn(self.generator))
        except Exception as exc:
            job.future.set_exception(exc)

    def _start_pieces(self, job: _Call) -> None:
        """A call in steps joins the ones under way (none runs before the loop's turn)."""
        if job.future.cancelled():
            return
        try:
            job.pieces = job.fn(self.generator)
        except Exception as exc:
            job.future.set_exception(exc)
            return
        self._pieces.append(job)

    def _run_piece(self, job: _Call) -> bool:
        """The next piece of ``job`` (the first call in steps in line); True once it is
        over (its result or error set, or its caller gone) and it has left the line.
        Calls in steps run one after another, not by turns: each holds memory while under
        way (a prompt's scoring, a whole context of KV), so only one at a time does."""
        assert job.pieces is not None
        over = True
        try:
            if job.future.cancelled():  # nobody waits for it any more
                job.pieces.close()
            else:
                next(job.pieces)
                over = False
        except StopIteration as done:
            if job.future.set_running_or_notify_cancel():
                job.future.set_result(done.value)
        except Exception as exc:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(exc)
        if over:
            self._pieces.popleft()
        return over

    def _run_piece_timed(self, sched: Scheduler) -> None:
        """One piece (batched mode), counted as engine work: ``running`` stays True while
        calls in steps are under way, so a shutdown's grace waits for them too."""
        started = time.perf_counter()
        self.stats.running = True
        try:
            self._run_piece(self._pieces[0])
        finally:
            self.stats.busy_seconds += time.perf_counter() - started
            self.stats.running = sched.has_work or bool(self._pieces)

    def _stop_pieces(self) -> None:
        """Shutting down: the calls in steps under way end with ``EngineStoppedError``."""
        while self._pieces:
            job = self._pieces.popleft()
            assert job.pieces is not None
            job.pieces.close()
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(EngineStoppedError("the server is shutting down"))

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

    # -- the engine thread: batched steps -------------------------------------------------

    def _run_batched(self) -> None:
        assert self.scheduler is not None
        sched, stopping = self.scheduler, False
        while not (stopping and not sched.has_work):
            idle = not (sched.has_work or self._pieces or stopping)
            for job in self._take_jobs(block=idle):
                if job is None:
                    stopping = True
                elif isinstance(job, _Call):
                    self._run_call(job)
                else:
                    self._admit(job.handle)
            if stopping:
                self._stop_pieces()
                with self._lock:
                    for handle in self._active.values():
                        handle.cancel()
            if self._pieces:  # one piece of a long call, then a step for the streams
                self._run_piece_timed(sched)
            if sched.has_work:
                try:
                    self._step(sched)
                except Exception as exc:  # a bug outside one sequence: fail them all, go on
                    log.exception("engine step failed")
                    self._fail_all(sched, exc)

    def _take_jobs(self, block: bool) -> list[_Generation | _Call | None]:
        """Every queued job; waits for the first one when ``block``."""
        jobs = [self._jobs.get()] if block else []
        while True:
            try:
                jobs.append(self._jobs.get_nowait())
            except queue.Empty:
                return jobs

    def _admit(self, handle: RequestHandle) -> None:
        """A submitted request becomes a waiting sequence (or ends here: cancelled,
        invalid, or ``max_tokens == 0``)."""
        if handle.cancelled:
            self.stats.requests_cancelled += 1
            handle._push(_END)
            return
        start_sequence: Callable[..., Sequence] = self.generator.start_sequence  # type: ignore[attr-defined]
        try:
            seq = start_sequence(handle.request, handle.cancel_event)
        except Exception as exc:
            self.stats.requests_failed += 1
            handle._push(exc)
            return
        self.stats.requests_started += 1
        if handle.request.max_tokens == 0:
            self.stats.requests_finished += 1
            handle._push(_END)
            return
        with self._lock:
            self._active[seq] = handle
        assert self.scheduler is not None
        self.scheduler.add(seq)
        self.stats.waiting_sequences = len(self.scheduler.waiting)

    def _step(self, sched: Scheduler) -> None:
        started = time.perf_counter()
        self.stats.running = True  # a generation is under way until the scheduler is idle
        try:
            out = sched.step()
        finally:
            self.stats.busy_seconds += time.perf_counter() - started
        # counted before any request hears of the step, so a client that got its error
        # and asks /health next sees it
        # a request whose grammar broke is that request's fault: the engine is fine
        broken = [exc for _, exc in out.failed if not isinstance(exc, GrammarFailedError)]
        self._record_outcome(broken[-1] if broken else None, bool(out.events))
        pushes: list[tuple[RequestHandle, object]] = []
        try:
            for seq, event in out.events:
                handle = self._active[seq]
                handle.cached_tokens = seq.num_cached_tokens
                self.stats.tokens_generated += 1
                pushes.append((handle, event))
            for seq in out.finished:
                pushes.append(self._end(seq, _END))
            for seq, exc in out.failed:
                if isinstance(exc, GrammarFailedError):
                    pushes.append(self._end(seq, exc))
                    continue
                log.error("generation failed", exc_info=exc)
                pushes.append(self._end(seq, GenerationFailedError(exc)))
        finally:  # whatever went wrong, what is ready still reaches its requests
            push_all(pushes)
        self._sync_stats(sched)

    def _record_outcome(self, error: BaseException | None, produced: bool) -> None:
        """Count steps that failed every request in them (for :meth:`health`)."""
        if produced:
            self.stats.failed_steps_in_a_row = 0
        elif error is not None:
            self.stats.failed_steps_in_a_row += 1
        if error is not None:
            self.stats.last_error = str(error)

    def _fail_all(self, sched: Scheduler, exc: Exception) -> None:
        """A step raised outside any one sequence: their states are unknown, so every
        running and waiting sequence leaves (KV freed) and its request gets the error."""
        try:
            gone = sched.abort_all(keep_kv=False)
        except Exception:
            log.exception("could not free the failed step's sequences")
            gone = list(self._active)
            sched.waiting.clear()
            sched.running.clear()
        pushes: list[tuple[RequestHandle, object]] = []
        for seq in gone:
            with self._lock:
                handle = self._active.pop(seq, None)
            if handle is not None:
                self.stats.requests_failed += 1
                pushes.append((handle, GenerationFailedError(exc)))
        self._record_outcome(exc, produced=False)
        push_all(pushes)
        with contextlib.suppress(Exception):
            self._sync_stats(sched)

    def _end(self, seq: Sequence, last: object) -> tuple[RequestHandle, object]:
        """Retire ``seq``; returns its handle and ``last`` (its final item) to push."""
        with self._lock:
            handle = self._active.pop(seq)
        if isinstance(last, BaseException):
            self.stats.requests_failed += 1
        else:
            if seq.cancelled or seq.finish_reason is None:
                self.stats.requests_cancelled += 1
            self.stats.requests_finished += 1
        handle.cached_tokens = seq.num_cached_tokens
        return handle, last

    def _sync_stats(self, sched: Scheduler) -> None:
        s = self.stats
        s.running = sched.has_work or bool(self._pieces)  # between steps too
        s.running_sequences = len(sched.running)
        s.waiting_sequences = len(sched.waiting)
        s.prompt_tokens = sched.stats.prompt_tokens
        s.cached_tokens = sched.stats.cached_tokens
        s.steps = sched.stats.steps
        s.kv_bytes = sched.memory.allocated_bytes
        cache = sched.prefix_cache
        if cache is not None:
            s.cache_lookups, s.cache_hits = cache.stats.lookups, cache.stats.hits
            s.prefix_cache_bytes = cache.nbytes
