"""Running submitted generations for one HTTP request: SSE framing, collecting events,
and cancelling the generation when the client goes away.

Every generating request gets a ``RequestGuard``: a set of clean-up callbacks (cancel the
engine handle, release a conversation lock) run exactly once, plus a task that waits on the
ASGI ``receive`` channel for the client's disconnect and runs them early. The guard is
closed from the streaming generator's ``finally``, from the response's background task and
on disconnect, whichever comes first, so an abandoned request never keeps the engine busy
for more than about one token.

The watcher waits rather than polls: polling ``Request.is_disconnected`` ten times a second
per request cost the event loop a tenth of a core at 4 streams, and on a 2-core machine
every millisecond the loop takes is stolen from a kernel thread the whole batch waits for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from bitserve.api.errors import GenerationCancelledError, error_body
from bitserve.engine.loop import RequestHandle
from bitserve.engine.types import TokenEvent

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: Any) -> str:
    """One server-sent event carrying ``data`` as compact JSON (or a raw string)."""
    text = (
        data
        if isinstance(data, str)
        else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    )
    return f"data: {text}\n\n"


def sse_error(exc: BaseException) -> str:
    """The OpenAI-shaped error body as an SSE event (a stream failing mid-way)."""
    return sse(error_body(exc)[1])


class RequestGuard:
    """Clean-ups for one request, run once; a watcher runs them if the client leaves."""

    def __init__(self, request: Request) -> None:
        self._request = request
        self._callbacks: list[Callable[[], None]] = []
        self._closed = False
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def add(self, callback: Callable[[], None]) -> None:
        if self._closed:
            callback()
        else:
            self._callbacks.append(callback)

    def track(self, handle: RequestHandle) -> RequestHandle:
        self.add(handle.cancel)
        return handle

    async def _watch(self) -> None:
        # The body has been read before the endpoint runs, so receive() now blocks until the
        # connection closes (or the response completes, after which close() has cancelled us).
        while not self._closed:
            message = await self._request.receive()
            if message["type"] == "http.disconnect":
                self.close()
                return

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._watcher.done() and self._watcher is not asyncio.current_task():
            self._watcher.cancel()
        callbacks, self._callbacks = self._callbacks, []
        for callback in reversed(callbacks):
            callback()

    async def aclose(self) -> None:
        self.close()


def wire_finish_reason(events: list[TokenEvent]) -> str:
    """A choice's OpenAI ``finish_reason``: "stop" when its last event stopped it (EOS or
    a stop string), else "length" (max_tokens, context full, or nothing generated)."""
    return "stop" if events and events[-1].finish_reason == "stop" else "length"


def check_not_cancelled(events: list[TokenEvent]) -> None:
    """Raise ``GenerationCancelledError`` if a cancel the client did not ask for (the
    server shutting down) ended these events."""
    if events and events[-1].finish_reason == "cancelled":
        raise GenerationCancelledError("the generation was cancelled (the server is stopping)")


async def collect(handle: RequestHandle) -> list[TokenEvent]:
    """All events of a generation (:func:`check_not_cancelled`)."""
    events = [event async for event in handle]
    check_not_cancelled(events)
    return events


async def guarded_stream(
    body: AsyncIterator[str], guard: RequestGuard, on_error: Callable[[BaseException], str]
) -> AsyncIterator[str]:
    """``body``'s events; an exception becomes one error event, then the stream closes."""
    try:
        async for chunk in body:
            yield chunk
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        yield on_error(exc)
    finally:
        guard.close()
        with contextlib.suppress(Exception):
            await body.aclose()  # type: ignore[attr-defined]


def sse_response(
    body: AsyncIterator[str],
    guard: RequestGuard,
    on_error: Callable[[BaseException], str] = sse_error,
) -> StreamingResponse:
    return StreamingResponse(
        guarded_stream(body, guard, on_error),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
        background=BackgroundTask(guard.aclose),
    )


async def merged_events(
    handles: list[RequestHandle],
) -> AsyncIterator[tuple[int, TokenEvent | None]]:
    """``(choice index, event)`` as the choices' events arrive (round-robin when several
    are waiting), then ``(index, None)`` when a choice has ended; a choice's failure is
    raised."""
    queue: asyncio.Queue[tuple[int, TokenEvent | Exception | None]] = asyncio.Queue()

    async def pump(index: int, handle: RequestHandle) -> None:
        try:
            async for event in handle:
                queue.put_nowait((index, event))
                # let the other choices' pumps take their turn: events the engine got ahead
                # with (a slow reader) still come out round-robin, not one choice at a time
                await asyncio.sleep(0)
            queue.put_nowait((index, None))
        except Exception as exc:
            queue.put_nowait((index, exc))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        for _ in range(len(handles)):
            while True:
                index, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                yield index, item
                if item is None:
                    break
    finally:
        for task in tasks:
            task.cancel()
