"""Work besides generations on the batched engine thread (the real scheduler and a tiny
model): long work runs in pieces between the running streams' steps, and stops when its
caller stops waiting; the engine's own work takes no place in the bounded queue."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from collections.abc import Generator as Pieces
from itertools import pairwise
from pathlib import Path

import pytest

from bitserve.engine import generate
from bitserve.engine.generate import Generator, PromptLogprob
from bitserve.engine.kv_spill import KVSpill
from bitserve.engine.loader import LoadedModel, load_model
from bitserve.engine.loop import EngineLoop
from bitserve.engine.prefix_cache import PrefixCache
from bitserve.engine.scheduler import Scheduler, SchedulerConfig
from bitserve.engine.types import GenerationRequest, SamplingParams


@pytest.fixture(scope="module")
def loaded(gqa_model_path: Path) -> Iterator[LoadedModel]:
    model = load_model(gqa_model_path)
    yield model
    model.close()


@pytest.fixture
def engine(loaded: LoadedModel) -> Iterator[EngineLoop[Generator]]:
    scheduler = Scheduler(loaded.model, SchedulerConfig(4, 64))
    loop = EngineLoop(Generator(loaded.model, loaded.tokenizer), 4, scheduler)
    loop.start()
    yield loop
    loop.stop()


def stream(n: int) -> GenerationRequest:
    return GenerationRequest([1, 2, 3], SamplingParams(temperature=0), n, ignore_eos=True)


def test_a_long_prompt_scoring_leaves_the_streams_a_step_between_its_chunks(
    engine: EngineLoop[Generator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Echo scoring (``/v1/completions`` with echo and logprobs) ran the whole prompt in
    one engine call, and every stream stopped for as long: 12 s for 3,000 tokens of a
    12-layer model on 2 cores. Now each chunk is a piece, with a step between two."""
    monkeypatch.setattr(generate, "PROMPT_LOGPROBS_CHUNK", 32)
    tokens = list(range(5, 205))  # 7 chunks
    scheduler = engine.scheduler
    assert scheduler is not None
    decoded_at_piece: list[int] = []

    def scoring(g: Generator) -> Pieces[None, None, list[PromptLogprob]]:
        pieces = g.score_prompt(tokens, 2, "float16")
        while True:
            decoded_at_piece.append(scheduler.stats.decode_tokens)
            try:
                next(pieces)
            except StopIteration as done:
                result: list[PromptLogprob] = done.value
                return result
            yield

    async def main() -> list[PromptLogprob]:
        handle = engine.submit(stream(150))
        events = aiter(handle)
        await anext(events)  # decoding
        scored = await engine.call_in_steps(scoring)
        handle.cancel()
        assert [e async for e in events][-1].finish_reason == "cancelled"  # still running
        return scored

    scored = asyncio.run(main())
    assert len(decoded_at_piece) == 7
    assert all(a < b for a, b in pairwise(decoded_at_piece))
    assert scored == engine.generator.prompt_logprobs(tokens, 2, "float16")


def test_a_call_in_steps_stops_when_its_caller_stops_waiting(
    engine: EngineLoop[Generator],
) -> None:
    pieces_run: list[int] = []

    def forever(_: Generator) -> Pieces[None, None, None]:
        while True:
            pieces_run.append(1)
            yield

    async def main() -> None:
        handle = engine.submit(stream(100))  # steps go on between the pieces
        events = aiter(handle)
        await anext(events)
        task = asyncio.ensure_future(engine.call_in_steps(forever))
        while len(pieces_run) < 3:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        at_cancel = await engine.call(lambda _: len(pieces_run))
        for _ in range(5):  # five more rounds of the engine's loop
            await anext(events)
        assert len(pieces_run) == at_cancel
        handle.cancel()
        _ = [e async for e in events]

    asyncio.run(main())


def test_the_engines_own_work_takes_no_place_in_the_queue(
    loaded: LoadedModel, tmp_path: Path
) -> None:
    """A spilled cache's release, queued by the spill's writer while a step ran, took a
    place in the bounded queue: with --max-queue 1 and a stream running, 22 of 60
    requests sent one after another got 503 "1 requests are already waiting"."""
    spill = KVSpill(tmp_path, 1 << 20, "model")
    scheduler = Scheduler(loaded.model, SchedulerConfig(4, 64), PrefixCache(1 << 20, spill))
    engine = EngineLoop(Generator(loaded.model, loaded.tokenizer), 1, scheduler)
    engine.start()
    busy, release = threading.Event(), threading.Event()

    def hold(_: Generator) -> None:  # the engine thread inside a step, as it were
        busy.set()
        release.wait(10)

    async def main() -> None:
        held = asyncio.ensure_future(engine.call(hold))
        await asyncio.to_thread(busy.wait, 10)
        assert spill.on_written is not None
        spill.on_written()  # a file written: the release of its cache is queued
        engine.prefill_ahead([1, 2, 3, 4], 8)  # a conversation's next turn, ahead
        handle = engine.submit(stream(2))  # the one place in the queue is free
        assert engine.queue_depth == 1
        release.set()
        await held
        assert [e async for e in handle][-1].finish_reason == "length"

    try:
        asyncio.run(main())
    finally:
        release.set()
        engine.stop()
        spill.close()


def test_the_engine_is_running_while_a_call_in_steps_is_under_way(
    engine: EngineLoop[Generator],
) -> None:
    """``stats.running`` (``/metrics``' bitserve_busy, and what a shutdown's grace waits
    for) said idle while a prompt was scored with no generation running: a SIGTERM then
    stopped the engine at once and the scoring's client got a 503."""
    seen: list[bool] = []

    def pieces(_: Generator) -> Pieces[None, None, str]:
        for _ in range(3):
            yield
            seen.append(engine.stats.running)
        return "scored"

    async def main() -> str:
        scored = await engine.call_in_steps(pieces)
        await engine.call(lambda _: None)  # the engine thread is past that piece
        return scored

    assert asyncio.run(main()) == "scored"
    assert seen == [True, True, True]
    assert not engine.stats.running and engine.stats.busy_seconds > 0


def test_calls_in_steps_run_one_after_another(engine: EngineLoop[Generator]) -> None:
    """Taking turns, every scoring under way held its KV cache (a whole context each, up
    to --max-queue of them) at once; one after another, one does."""
    order: list[str] = []

    def pieces(name: str) -> Callable[[Generator], Pieces[None, None, None]]:
        def run(_: Generator) -> Pieces[None, None, None]:
            for _ in range(3):
                order.append(name)
                yield

        return run

    async def main() -> None:
        await asyncio.gather(engine.call_in_steps(pieces("a")), engine.call_in_steps(pieces("b")))

    asyncio.run(main())
    assert order == ["a"] * 3 + ["b"] * 3
