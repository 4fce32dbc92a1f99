"""Continuous batching and the prefix cache with the real model (tiny GGUF files):
a token's values and the greedy tokens do not depend on the batch, the chunking or a warm
prefix cache; ``cached_tokens`` reaches the API's usage."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from bitserve.api.app import create_app
from bitserve.api.served import ServedModel
from bitserve.api.settings import ServerSettings
from bitserve.engine.generate import Generator
from bitserve.engine.loader import LoadedModel, load_model
from bitserve.engine.prefix_cache import PrefixCache
from bitserve.engine.scheduler import Scheduler, SchedulerConfig
from bitserve.engine.sequence import Sequence
from bitserve.engine.types import GenerationRequest, SamplingParams
from bitserve.model.bitnet import BatchItem, BitNetModel
from bitserve.store import SQLiteStore


@pytest.fixture(scope="module")
def loaded(gqa_model_path: Path) -> Iterator[LoadedModel]:
    model = load_model(gqa_model_path)
    yield model
    model.close()


def prompts(n: int, seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randrange(1, 90))] for _ in range(n)]


def greedy(
    loaded: LoadedModel, scheduler: Scheduler, batch: list[list[int]], n: int = 8
) -> list[list[int]]:
    gen = Generator(loaded.model, loaded.tokenizer)
    seqs: list[Sequence] = []
    for p in batch:
        req = GenerationRequest(p, SamplingParams(temperature=0), max_tokens=n, ignore_eos=True)
        seqs.append(gen.start_sequence(req))
        scheduler.add(seqs[-1])
    tokens: dict[Sequence, list[int]] = {s: [] for s in seqs}
    while scheduler.has_work:
        for seq, event in scheduler.step().events:
            tokens[seq].append(event.token_id)
    return [tokens[s] for s in seqs]


@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16])
def test_forward_batch_rows_equal_each_sequence_alone(loaded: LoadedModel, kv_dtype: type) -> None:
    model: BitNetModel = loaded.model
    batch = prompts(5)
    alone = [model.forward(p, model.new_cache(dtype=kv_dtype)) for p in batch]
    caches = [model.new_cache(dtype=kv_dtype) for _ in batch]
    split = [len(p) // 2 for p in batch]  # first halves in one step, the rest in another
    model.forward_batch(
        [BatchItem(p[:s], c, False) for p, s, c in zip(batch, split, caches, strict=True) if s]
    )
    items = [BatchItem(p[s:], c) for p, s, c in zip(batch, split, caches, strict=True)]
    together = model.forward_batch(items)
    for a, b in zip(alone, together, strict=True):
        assert b is not None
        np.testing.assert_array_equal(a, b)
    assert [c.length for c in caches] == [len(p) for p in batch]


def test_alone_and_in_a_batch_of_8_give_the_same_greedy_tokens(loaded: LoadedModel) -> None:
    batch = prompts(8, seed=5)
    alone = [
        greedy(loaded, Scheduler(loaded.model, SchedulerConfig(1, 256)), [p])[0] for p in batch
    ]
    assert len({len(p) for p in batch}) > 4  # mixed lengths
    assert greedy(loaded, Scheduler(loaded.model, SchedulerConfig(8, 64)), batch) == alone


def test_warm_and_cold_prefix_cache_give_the_same_greedy_tokens(loaded: LoadedModel) -> None:
    history, follow_up = prompts(2, seed=9)
    warm = Scheduler(loaded.model, SchedulerConfig(4, 32), PrefixCache(64 << 20))
    first = greedy(loaded, warm, [history])[0]
    continued = [*history, *first, *follow_up]
    warm_tokens = greedy(loaded, warm, [continued])[0]
    assert warm.stats.cached_tokens == len(history) + len(first) - 1
    cold_tokens = greedy(loaded, Scheduler(loaded.model, SchedulerConfig(4, 256)), [continued])[0]
    assert warm_tokens == cold_tokens
    assert greedy(loaded, warm, [continued])[0] == cold_tokens  # the same prompt again


def test_prefill_ahead_computes_the_next_turns_start_and_changes_no_token(
    loaded: LoadedModel,
) -> None:
    history, follow_up = prompts(2, seed=9)
    template = [5, 6, 7]  # what a chat template puts before the next message
    warm = Scheduler(loaded.model, SchedulerConfig(4, 32), PrefixCache(64 << 20))
    first = greedy(loaded, warm, [history])[0]
    ahead = [*history, *first, *template]
    assert warm.extend_cached(ahead, 16) == 1 + len(template)  # last reply token + template
    assert warm.stats.prefilled_ahead == 1 + len(template)
    assert warm.prefix_cache is not None and warm.prefix_cache.stats.lookups == 1  # first's own
    continued = [*ahead, *follow_up]
    before = warm.stats.cached_tokens
    warm_tokens = greedy(loaded, warm, [continued])[0]
    assert warm.stats.cached_tokens - before == len(ahead)
    cold_tokens = greedy(loaded, Scheduler(loaded.model, SchedulerConfig(4, 256)), [continued])[0]
    assert warm_tokens == cold_tokens


def test_prefill_ahead_does_only_a_few_cached_tokens_worth(loaded: LoadedModel) -> None:
    history, other = prompts(2, seed=9)
    prefix = PrefixCache(64 << 20)
    sched = Scheduler(loaded.model, SchedulerConfig(4, 32), prefix)
    greedy(loaded, sched, [history], n=1)
    assert sched.extend_cached(other, 16) == 0  # not this entry's continuation: nothing
    assert sched.extend_cached([*history, *range(17)], 16) == 0  # more than max_new new
    assert sched.extend_cached(history[:-3], 16) == 0  # nothing new
    assert len(prefix) == 1 and prefix.entries[0].cache.length == len(history)
    assert sched.stats.prefilled_ahead == 0
    full = [*history, *range(256 - len(history) + 1)]  # one past the context (256)
    assert sched.extend_cached(full, 300) == 0  # no room: the entry stays
    assert len(prefix) == 1 and prefix.entries[0].cache.length == len(history)
    no_cache = Scheduler(loaded.model, SchedulerConfig(4, 32))
    assert no_cache.extend_cached([*history, 1], 16) == 0


def test_cached_tokens_reported_in_usage(loaded: LoadedModel, tmp_path: Path) -> None:
    settings = ServerSettings(db_path=tmp_path / "c.db")
    served = ServedModel.create(loaded, 4, None, (), int(time.time()), max_batch=4, cache_ram_mb=64)
    app = create_app(settings, served, SQLiteStore(settings.db_path))
    body = {"model": "tiny", "prompt": "abcdefgh ijkl", "max_tokens": 4, "temperature": 0}
    with TestClient(app) as client:
        first = client.post("/v1/completions", json=body).json()
        assert "usage" in first, first
        second = client.post("/v1/completions", json=body).json()
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        client.post("/v1/chat/completions", json=chat)
        again = client.post("/v1/chat/completions", json=chat).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    n_prompt = second["usage"]["prompt_tokens"]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == n_prompt - 1
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    assert (
        again["usage"]["prompt_tokens_details"]["cached_tokens"]
        == again["usage"]["prompt_tokens"] - 1
    )
    assert served.engine.stats.cache_hits >= 2
