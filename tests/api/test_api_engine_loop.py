"""``EngineLoop`` on its own: order of events, one thread, cancellation within a token,
the bounded queue, errors reaching the awaiting request, ``call``. A counting generator
stands in for the model (the loop's contract does not depend on what generates)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from bitserve.engine.loop import EngineLoop, EngineStoppedError, QueueFullError
from bitserve.engine.types import GenerationRequest, TokenEvent


class CountingGenerator:
    """Emits token ids 0..max_tokens-1, ``delay_s`` apart; records the threads it ran on
    and how many tokens it produced after the cancel event was set."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.threads: set[str] = set()
        self.after_cancel = 0

    def generate(
        self, req: GenerationRequest, cancel: threading.Event | None = None
    ) -> Iterator[TokenEvent]:
        if req.max_tokens < 0:
            raise ValueError("negative max_tokens")
        self.threads.add(threading.current_thread().name)
        for i in range(req.max_tokens):
            time.sleep(self.delay_s)
            if cancel is not None and cancel.is_set():
                self.after_cancel += 1
                yield TokenEvent(i, "", finish_reason="cancelled")
                return
            last = i == req.max_tokens - 1
            yield TokenEvent(i, str(i), finish_reason="length" if last else None)


def test_events_arrive_in_order_from_one_engine_thread() -> None:
    gen = CountingGenerator()
    loop = EngineLoop(gen, max_queue=4)
    loop.start()

    async def main() -> list[list[int]]:
        handles = [loop.submit(GenerationRequest([1], max_tokens=5)) for _ in range(3)]
        out = []
        for h in handles:
            out.append([e.token_id async for e in h])
        return out

    try:
        assert asyncio.run(main()) == [[0, 1, 2, 3, 4]] * 3
    finally:
        loop.stop()
    assert gen.threads == {"bitserve-engine"}
    assert loop.stats.requests_finished == 3 and loop.stats.tokens_generated == 15


def test_cancel_stops_within_one_token_and_queued_requests_never_start() -> None:
    gen = CountingGenerator(delay_s=0.01)
    loop = EngineLoop(gen, max_queue=4)
    loop.start()

    async def main() -> tuple[int, int]:
        running = loop.submit(GenerationRequest([1], max_tokens=10_000))
        queued = loop.submit(GenerationRequest([1], max_tokens=10_000))
        queued.cancel()
        seen = 0
        async for _event in running:
            seen += 1
            if seen == 3:
                running.cancel()
        return seen, len([e async for e in queued])

    try:
        seen, queued_events = asyncio.run(main())
    finally:
        loop.stop()
    assert seen <= 3 + 2  # the cancel lands within a token (plus one already in flight)
    assert queued_events == 0 and loop.stats.requests_started == 1
    assert loop.stats.requests_cancelled == 2


def test_full_queue_raises_with_retry_after() -> None:
    loop = EngineLoop(CountingGenerator(delay_s=0.01), max_queue=1)
    loop.start()

    async def main() -> None:
        first = loop.submit(GenerationRequest([1], max_tokens=10_000))
        async for _ in first:
            break  # it is running now
        waiting = loop.submit(GenerationRequest([1], max_tokens=1))
        with pytest.raises(QueueFullError) as info:
            loop.submit(GenerationRequest([1], max_tokens=1))
        assert info.value.retry_after >= 1
        first.cancel()
        waiting.cancel()

    try:
        asyncio.run(main())
    finally:
        loop.stop()


def test_generator_errors_reach_the_request_and_call_runs_on_the_engine() -> None:
    gen = CountingGenerator()
    loop = EngineLoop(gen, max_queue=2)
    loop.start()

    async def main() -> str:
        handle = loop.submit(GenerationRequest([1], max_tokens=-1))
        with pytest.raises(ValueError, match="negative"):
            async for _ in handle:
                pass
        return await loop.call(lambda g: threading.current_thread().name)

    try:
        assert asyncio.run(main()) == "bitserve-engine"
    finally:
        loop.stop()
    assert loop.stats.requests_failed == 1


def test_submit_before_start_and_stop_cancels_the_running_request() -> None:
    loop = EngineLoop(CountingGenerator(delay_s=0.01), max_queue=2)

    async def early() -> None:
        loop.submit(GenerationRequest([1]))

    with pytest.raises(EngineStoppedError):
        asyncio.run(early())
    loop.start()

    async def main() -> str | None:
        handle = loop.submit(GenerationRequest([1], max_tokens=100_000))
        async for _ in handle:
            break
        await asyncio.get_running_loop().run_in_executor(None, loop.stop)
        events = [e async for e in handle]
        return events[-1].finish_reason if events else None

    started = time.monotonic()
    assert asyncio.run(main()) == "cancelled"
    assert time.monotonic() - started < 5


def test_push_all_wakes_each_loop_once_in_order_and_cancels_on_a_closed_loop() -> None:
    from bitserve.engine.loop import RequestHandle, push_all

    class RecordingLoop:
        def __init__(self, closed: bool = False) -> None:
            self.calls: list[tuple[object, ...]] = []
            self.closed = closed

        def call_soon_threadsafe(self, fn: object, *args: object) -> None:
            if self.closed:
                raise RuntimeError("Event loop is closed")
            self.calls.append((fn, *args))

    live, gone = RecordingLoop(), RecordingLoop(closed=True)
    req = GenerationRequest([1], max_tokens=2)
    a, b = RequestHandle(req, live), RequestHandle(req, live)  # type: ignore[arg-type]
    c = RequestHandle(req, gone)  # type: ignore[arg-type]
    events = [TokenEvent(i, str(i)) for i in range(4)]
    push_all([(a, events[0]), (b, events[1]), (c, events[2]), (a, events[3])])
    assert len(live.calls) == 1  # one wake-up for the whole step
    fn, batch = live.calls[0]
    assert batch == [(a, events[0]), (b, events[1]), (a, events[3])]
    assert c.cancelled and not a.cancelled and not b.cancelled
    fn(batch)  # what the loop then runs: each handle gets its events, in order
    assert [a._events.get_nowait(), a._events.get_nowait()] == [events[0], events[3]]
    assert b._events.get_nowait() == events[1]


def test_merged_events_come_out_round_robin_when_the_reader_is_behind() -> None:
    """All choices' events already queued (the engine got ahead of a slow reader): the
    merged stream still alternates between the choices instead of draining one first."""
    from bitserve.api.streaming import merged_events
    from bitserve.engine.loop import _END, RequestHandle

    async def main() -> list[int | None]:
        loop = asyncio.get_running_loop()
        handles = [RequestHandle(GenerationRequest([1], max_tokens=3), loop) for _ in range(3)]
        for h in handles:
            for i in range(3):
                h._events.put_nowait(TokenEvent(i, str(i)))
            h._events.put_nowait(_END)
        return [index for index, event in [x async for x in merged_events(handles)] if event]

    order = asyncio.run(main())
    assert order == [0, 1, 2] * 3
