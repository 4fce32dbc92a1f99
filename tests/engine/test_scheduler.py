"""Scheduler and prefix cache with a fake model (no weights): admission, chunking, max
batch, eviction under the RAM budget, no KV leak under random requests and cancellations.

``FakeModel.forward_batch`` writes each token id into its cache's keys and returns logits
derived from every token the cache holds, so a sequence whose cached prefix were wrong (or
lost) would generate different tokens.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from bitserve.engine.kv_spill import KVSpill
from bitserve.engine.prefix_cache import PrefixCache
from bitserve.engine.sampling import Sampler
from bitserve.engine.scheduler import Scheduler, SchedulerConfig
from bitserve.engine.sequence import Sequence
from bitserve.engine.types import GenerationRequest, SamplingParams
from bitserve.model.bitnet import BatchItem
from bitserve.model.config import ModelConfig
from bitserve.model.kv_cache import KVCache, KVMemory
from bitserve.tokenizer import Tokenizer

VOCAB = 64
CONFIG = ModelConfig(
    arch="bitnet-b1.58",
    n_layers=1,
    dim=8,
    ffn_dim=16,
    n_heads=1,
    n_kv_heads=1,
    vocab_size=VOCAB,
    context_length=4096,
    rope_dim=8,
    rope_theta=10000.0,
    norm_eps=1e-5,
    activation="relu2",
)


@dataclass
class FakeModel:
    """Greedy next token = a hash of all tokens in the cache; records each step's items."""

    config: ModelConfig = CONFIG
    steps: list[list[tuple[int, bool]]] = field(default_factory=list)  # (T, want_logits)

    def new_cache(
        self, max_seq: int | None = None, dtype: np.dtype | type = np.float32, memory=None
    ) -> KVCache:
        return KVCache(self.config, max_seq, dtype, memory)

    def forward_batch(self, items: list[BatchItem]) -> list[np.ndarray | None]:
        self.steps.append([(len(it.tokens), it.want_logits) for it in items])
        out: list[np.ndarray | None] = []
        for it in items:
            start, ids = it.cache.length, np.asarray(it.tokens)
            kv = np.zeros((len(ids), 1, CONFIG.head_dim), np.float32)
            kv[:, 0, 0] = ids
            it.cache.write(0, start, kv, kv)
            it.cache.advance(len(ids))
            held = it.cache.view(0, it.cache.length)[0][:, 0, 0].astype(np.int64)
            logits = np.zeros(VOCAB, np.float32)
            logits[int((held * np.arange(1, len(held) + 1)).sum() % VOCAB)] = 1.0
            out.append(logits if it.want_logits else None)
        return out


def make_sequence(
    tokenizer: Tokenizer,
    prompt: list[int],
    max_tokens: int = 4,
    cancel: threading.Event | None = None,
) -> Sequence:
    req = GenerationRequest(prompt, SamplingParams(temperature=0), max_tokens=max_tokens)
    sampler = Sampler.create(req.sampling, VOCAB)
    return Sequence.create(req, sampler, tokenizer, CONFIG.context_length, cancel)


def make_requests(
    tokenizer: Tokenizer, n: int, prompt_len: int = 5, seed: int = 0
) -> list[Sequence]:
    rng = random.Random(seed)
    return [
        make_sequence(tokenizer, [rng.randrange(VOCAB) for _ in range(prompt_len)])
        for _ in range(n)
    ]


def run_to_end(sched: Scheduler) -> dict[Sequence, list[int]]:
    tokens: dict[Sequence, list[int]] = {}
    while sched.has_work:
        out = sched.step()
        for seq, event in out.events:
            tokens.setdefault(seq, []).append(event.token_id)
    return tokens


def test_admission_is_fcfs_and_bounded_by_max_batch(tokenizer: Tokenizer) -> None:
    model = FakeModel()
    sched = Scheduler(model, SchedulerConfig(max_batch=3, max_batch_tokens=64))
    seqs = make_requests(tokenizer, 7)
    for seq in seqs:
        sched.add(seq)
    sched.step()
    assert sched.running == seqs[:3] and list(sched.waiting) == seqs[3:]
    finished_order: list[Sequence] = []
    while sched.has_work:
        assert len(sched.running) <= 3
        finished_order += sched.step().finished
    assert finished_order == seqs  # same length: first in, first out
    assert max(len(step) for step in model.steps) == 3
    assert sched.memory.allocated_bytes == 0  # no prefix cache: every KV freed


@dataclass
class NoRoomModel(FakeModel):
    """Its second cache cannot be had (address space or memory exhausted)."""

    made: int = 0

    def new_cache(
        self, max_seq: int | None = None, dtype: np.dtype | type = np.float32, memory=None
    ) -> KVCache:
        self.made += 1
        if self.made == 2:
            raise OSError(12, "Cannot allocate memory")
        return super().new_cache(max_seq, dtype, memory)


def test_a_cache_that_cannot_be_had_fails_only_its_request(tokenizer: Tokenizer) -> None:
    sched = Scheduler(NoRoomModel(), SchedulerConfig(max_batch=4, max_batch_tokens=64))
    seqs = make_requests(tokenizer, 3)
    for seq in seqs:
        sched.add(seq)
    out = sched.step()
    assert [(seq, type(exc)) for seq, exc in out.failed] == [(seqs[1], OSError)]
    assert sched.running == [seqs[0], seqs[2]]
    assert set(run_to_end(sched)) == {seqs[0], seqs[2]}


def test_prefill_ahead_extends_the_ram_entry_and_leaves_the_disk_alone(tmp_path: Path) -> None:
    """A longer entry on disk is not read (and its file not consumed) by extend_cached."""
    spill = KVSpill(tmp_path, 1 << 30, "k", background=False)

    def cache_of(n: int) -> KVCache:
        cache = KVCache(CONFIG, dtype=np.float16)
        cache.advance(n)
        return cache

    budget = cache_of(110).nbytes  # room for one of the two entries below
    prefix = PrefixCache(budget, spill, lambda: KVCache(CONFIG, dtype=np.float16))
    other = list(range(110))  # a conversation that went further: evicted to disk below
    prefix.put(other, cache_of(110))
    prefix.put(other[:100], cache_of(100))
    assert [len(e.tokens) for e in prefix.entries] == [100] and len(spill) == 1
    sched = Scheduler(FakeModel(), SchedulerConfig(), prefix)
    assert sched.extend_cached(other[:105], 16) == 5
    assert [len(e.tokens) for e in prefix.entries] == [105] and len(spill) == 1
    spill.close()


def test_a_guessed_new_start_copies_the_shared_header_and_keeps_the_conversation() -> None:
    """A prompt computed ahead that starts anew (the conversation's history cut moved)
    shares only its system prompt with the conversation's entry; when that is more than
    half the entry, the entry used to be cut to it, costing the next turn the history it
    has if the cut was guessed a turn early. With ``keep_diverging`` it is copied."""

    def cache_of(n: int) -> KVCache:
        cache = KVCache(CONFIG, dtype=np.float16)
        cache.advance(n)
        return cache

    system, history, kept = list(range(60)), list(range(100, 140)), list(range(120, 140))
    for keep_diverging, entries in ((True, [100, 64]), (False, [64])):
        prefix = PrefixCache(1 << 30)
        prefix.put(system + history, cache_of(100))
        sched = Scheduler(FakeModel(), SchedulerConfig(), prefix)
        guess = system + kept[:4]
        assert sched.extend_cached(guess, 16, keep_diverging=keep_diverging) == 4
        assert sorted((len(e.tokens) for e in prefix.entries), reverse=True) == entries


def test_long_prompt_is_chunked_and_decodes_keep_running(tokenizer: Tokenizer) -> None:
    model = FakeModel()
    sched = Scheduler(model, SchedulerConfig(max_batch=4, max_batch_tokens=16))
    short = make_sequence(tokenizer, [1, 2, 3], max_tokens=30)
    sched.add(short)
    sched.step()  # short's prompt; it decodes from now on
    long = make_sequence(tokenizer, list(range(50)), max_tokens=2)
    sched.add(long)
    model.steps.clear()
    events = [sched.step() for _ in range(4)]
    # every step: short decodes one token, long gets the rest of the 16-token budget
    assert [step for step in model.steps] == [[(1, True), (15, False)]] * 3 + [
        [(1, True), (5, True)]
    ]
    assert all(any(s is short for s, _ in out.events) for out in events)
    assert long.num_computed_tokens == 50 and long.num_generated == 1


def test_chunked_or_batched_results_equal_one_at_a_time(tokenizer: Tokenizer) -> None:
    prompts = [list(range(i, i + 3 + 7 * i)) for i in range(8)]

    def run(max_batch: int, budget: int) -> list[list[int]]:
        sched = Scheduler(FakeModel(), SchedulerConfig(max_batch, budget))
        seqs = [make_sequence(tokenizer, p, max_tokens=6) for p in prompts]
        for seq in seqs:
            sched.add(seq)
        tokens = run_to_end(sched)
        return [tokens[s] for s in seqs]

    alone = run(1, 4096)
    assert run(8, 8) == alone and run(3, 20) == alone


def test_prefix_cache_reuse_reports_cached_tokens_and_keeps_outputs(tokenizer: Tokenizer) -> None:
    prefix = PrefixCache(budget_bytes=1 << 20)
    sched = Scheduler(FakeModel(), SchedulerConfig(4, 64), prefix)
    first = make_sequence(tokenizer, list(range(20)), max_tokens=5)
    sched.add(first)
    cold = run_to_end(sched)[first]
    assert len(prefix) == 1 and prefix.entries[0].cache.length == 24  # 20 + 5 - 1
    again = make_sequence(tokenizer, list(range(20)), max_tokens=5)
    sched.add(again)
    assert run_to_end(sched)[again] == cold
    assert again.num_cached_tokens == 19  # the last prompt token is always computed
    follow = make_sequence(tokenizer, [*range(20), *cold, 7, 8], max_tokens=3)
    sched.add(follow)
    warm_follow = run_to_end(sched)[follow]
    assert follow.num_cached_tokens == 24
    cold_sched = Scheduler(FakeModel(), SchedulerConfig(4, 64))
    fresh = make_sequence(tokenizer, [*range(20), *cold, 7, 8], max_tokens=3)
    cold_sched.add(fresh)
    assert run_to_end(cold_sched)[fresh] == warm_follow
    assert prefix.stats.lookups == 3 and prefix.stats.hits == 2


def test_eviction_keeps_the_budget_and_drops_the_least_recently_used() -> None:
    memory = KVMemory()

    def cache_of(n: int) -> KVCache:
        cache = KVCache(CONFIG, dtype=np.float32, memory=memory)
        cache.advance(n)
        return cache

    # an entry holds its tokens' pages: two 40-token ones fit, three do not
    prefix = PrefixCache(budget_bytes=5 * KVCache(CONFIG, dtype=np.float32).bytes_for(40) // 2)
    prefix.put([1] * 40, cache_of(40))
    prefix.put([2] * 40, cache_of(40))
    taken = prefix.take([1] * 10 + [5])  # the 1s are used (taken) ...
    assert taken is not None and taken.length == 10
    taken.release()
    prefix.put([1] * 40, cache_of(40))  # ... and put back: now the most recent
    prefix.put([3] * 40, cache_of(40))  # over budget: the 2s go
    assert [int(e.tokens[0]) for e in prefix.entries] == [1, 3]
    assert prefix.nbytes <= prefix.budget_bytes and prefix.stats.evictions == 1
    prefix.put([4] * 500, cache_of(500))  # larger than the whole budget: released at once
    assert [int(e.tokens[0]) for e in prefix.entries] == [1, 3]
    prefix.put([1] * 45, cache_of(45))  # supersedes the entry it extends
    assert sorted(len(e.tokens) for e in prefix.entries) == [40, 45]
    assert memory.allocated_bytes == prefix.nbytes  # evicted and superseded caches released


def test_a_lookup_among_many_entries_compares_few_of_them_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every lookup and every put compared the prompt with every entry in full (a numpy
    call, ~6 us each), and every step summed the entries' bytes: with 9,000 short
    requests cached, the demo server's median latency went from 90 to 470 ms, and on.
    One token now rules out most entries, and the total is kept."""
    from bitserve.engine import prefix_cache as module

    def cache_of(n: int) -> KVCache:
        cache = KVCache(CONFIG, dtype=np.float32)
        cache.advance(n)
        return cache

    header = list(range(10, 30))  # a chat template's start, shared by every prompt
    prefix = PrefixCache(1 << 30)
    for i in range(300):
        prefix.put([*header, i % 30, 7, i], cache_of(23))
    compared: list[int] = []
    whole = module.common_prefix
    monkeypatch.setattr(module, "common_prefix", lambda a, b: compared.append(1) or whole(a, b))
    query = np.array([*header, 3, 7, 63, 9])
    assert prefix.cached_length(query) == 23  # [header, 3, 7, 63]
    assert max(whole(e.tokens, query) for e in prefix.entries) == 23
    assert len(compared) <= 3  # the first going on with 3, then the one with 63
    compared.clear()
    prefix.put(query, cache_of(24))  # supersedes [header, 3, 7, 63]
    assert len(prefix) == 300 and len(compared) == 1
    # the total the engine reads every step is kept, not summed over the entries
    total = sum(e.cache.nbytes for e in prefix.entries)
    reads: list[int] = []
    nbytes = KVCache.nbytes
    monkeypatch.setattr(KVCache, "nbytes", property(lambda c: reads.append(1) or nbytes.fget(c)))
    assert prefix.nbytes == total and reads == []


def test_no_kv_leak_after_thousands_of_random_requests_and_cancellations(
    tokenizer: Tokenizer,
) -> None:
    rng = random.Random(7)
    prefix = PrefixCache(budget_bytes=64 * 2 * CONFIG.kv_dim * 4 * 8)
    sched = Scheduler(FakeModel(), SchedulerConfig(max_batch=8, max_batch_tokens=24), prefix)
    cancels: list[threading.Event] = []
    for i in range(3000):
        cancel = threading.Event()
        prompt = [rng.randrange(4)] * rng.randrange(1, 4) + [rng.randrange(VOCAB)] * rng.randrange(
            1, 40
        )
        sched.add(make_sequence(tokenizer, prompt, rng.randrange(1, 6), cancel))
        cancels.append(cancel)
        if rng.random() < 0.3:
            rng.choice(cancels[-20:]).set()
        if i % 3 == 0:
            sched.step()
            assert sched.memory.allocated_bytes == prefix.nbytes + sum(
                s.cache.nbytes for s in sched.running if s.cache is not None
            )
    run_to_end(sched)
    assert not sched.running and not sched.waiting
    assert sched.memory.allocated_bytes == prefix.nbytes <= prefix.budget_bytes
    assert prefix.stats.hits > 0
    prefix.clear()
    assert sched.memory.allocated_bytes == 0


def test_cancelled_sequences_leave_at_once_or_after_one_token(tokenizer: Tokenizer) -> None:
    sched = Scheduler(FakeModel(), SchedulerConfig(max_batch=2, max_batch_tokens=4))
    prefilling, decoding = threading.Event(), threading.Event()
    a = make_sequence(tokenizer, [1, 2], max_tokens=100, cancel=decoding)
    b = make_sequence(tokenizer, list(range(30)), max_tokens=100, cancel=prefilling)
    sched.add(a)
    sched.add(b)
    sched.step()  # a: prompt done, decoding; b: 2 of 30 prompt tokens
    decoding.set()
    prefilling.set()
    out = sched.step()
    assert b in out.finished and b.cache is None  # dropped before the step
    assert [(s, e.finish_reason) for s, e in out.events] == [(a, "cancelled")]
    assert a in out.finished and not sched.has_work
    assert sched.memory.allocated_bytes == 0


def test_cancelled_waiting_sequences_leave_the_line_wherever_they_are(
    tokenizer: Tokenizer,
) -> None:
    """Only those at the head of the line left: behind a live one, requests whose clients
    had gone kept their places in the bounded queue, and new requests got 503s."""
    sched = Scheduler(FakeModel(), SchedulerConfig(max_batch=1, max_batch_tokens=8))
    gone = threading.Event()
    running, live = make_requests(tokenizer, 2)
    left = [make_sequence(tokenizer, [1, 2, 3], cancel=gone) for _ in range(3)]
    for seq in [running, live, *left]:
        sched.add(seq)
    sched.step()
    assert sched.running == [running] and len(sched.waiting) == 4
    gone.set()
    out = sched.step()
    assert list(sched.waiting) == [live] and set(left) <= set(out.finished)
    assert all(seq.cache is None for seq in left)


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="max_batch must"):
        SchedulerConfig(0, 10)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        SchedulerConfig(4, 2)


def test_a_conversations_next_turn_appends_to_its_entry_in_place() -> None:
    """A follow-up takes the entry's cache as is and writes after it: no copy of the KV on
    any turn (a copy of a long conversation's KV would cost its first token's time)."""
    cache = KVCache(CONFIG, dtype=np.float16)
    cache.advance(600)
    prefix = PrefixCache(budget_bytes=10**9)
    prefix.put(list(range(600)), cache)
    taken = prefix.take([*range(600), 7, 8, 9])
    assert taken is cache and taken.length == 600
    address = taken.k.__array_interface__["data"][0]
    rows = np.ones((3, CONFIG.n_kv_heads, CONFIG.head_dim), np.float16)
    for layer in range(CONFIG.n_layers):
        taken.write(layer, 600, rows, rows)
    taken.advance(3)
    assert taken.length == 603 and taken.k.__array_interface__["data"][0] == address
