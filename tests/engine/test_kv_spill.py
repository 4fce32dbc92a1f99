"""``KVSpill`` and the prefix cache's disk tier: bit-exact round trips, eviction to disk,
the disk budget, restarts, bad files ignored, and greedy outputs unchanged by a prefix that
comes back from disk (real tiny model through the ``Scheduler``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bitserve.engine.generate import Generator
from bitserve.engine.kv_spill import SUFFIX, KVSpill, SpillHeader, spill_key
from bitserve.engine.loader import LoadedModel, load_model
from bitserve.engine.prefix_cache import MIN_DISK_TOKENS, PrefixCache
from bitserve.engine.scheduler import Scheduler, SchedulerConfig
from bitserve.engine.sequence import Sequence
from bitserve.engine.types import GenerationRequest, SamplingParams
from bitserve.model.config import ModelConfig
from bitserve.model.kv_cache import KVCache, KVMemory

CONFIG = ModelConfig(
    arch="bitnet-b1.58",
    n_layers=3,
    dim=16,
    ffn_dim=32,
    n_heads=2,
    n_kv_heads=2,
    vocab_size=64,
    context_length=4096,
    rope_dim=8,
    rope_theta=10000.0,
    norm_eps=1e-5,
    activation="relu2",
)
KEY = "model-a"


def filled_cache(
    n: int, dtype: type = np.float16, seed: int = 0, memory: KVMemory | None = None
) -> KVCache:
    """A cache of ``n`` valid positions of random values (and stale ones after them)."""
    cache = KVCache(CONFIG, dtype=dtype, memory=memory)
    rng = np.random.default_rng(seed)
    cache.k[:, : n + 5] = rng.standard_normal(cache.k[:, : n + 5].shape).astype(dtype)
    cache.v[:, : n + 5] = rng.standard_normal(cache.v[:, : n + 5].shape).astype(dtype)
    cache.advance(n)
    return cache


def file_size(n: int, dtype: type = np.float16) -> int:
    layout = (CONFIG.n_layers, CONFIG.n_kv_heads, CONFIG.head_dim)
    return SpillHeader(np.dtype(dtype), layout, n, 0).nbytes


def spill_files(spill: KVSpill) -> list[Path]:
    return sorted(spill.directory.glob(f"*{SUFFIX}"))


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("background", [True, False])
def test_round_trip_is_bit_identical(tmp_path: Path, dtype: type, background: bool) -> None:
    spill = KVSpill(tmp_path, 1 << 30, KEY, background=background)
    tokens = np.arange(100, 137)
    original = filled_cache(37, dtype, seed=1)
    want_k, want_v = original.k[:, :37].copy(), original.v[:, :37].copy()
    assert spill.save(tokens, original)
    spill.flush()
    assert original.length == 0 and original.nbytes == 0  # released once written
    entry, n = spill.best([*range(100, 130), 5, 6])
    assert entry is not None and n == 30
    cache = spill.load(entry, 29, lambda: KVCache(CONFIG, dtype=dtype))
    assert cache is not None and cache.length == 29 and cache.dtype == np.dtype(dtype)
    assert cache.nbytes == cache.bytes_for(29) > 0
    assert same_bits(cache.k[:, :29], want_k[:, :29]) and same_bits(cache.v[:, :29], want_v[:, :29])
    assert spill_files(spill) == [] and len(spill) == 0 and spill.nbytes == 0
    spill.close()


def test_load_of_an_entry_still_being_written_waits_for_it(tmp_path: Path) -> None:
    spill = KVSpill(tmp_path, 1 << 30, KEY)
    original = filled_cache(301, seed=2)
    want = original.k[:, :301].copy()
    spill.save(np.arange(301), original)  # no flush: the writer may still be at it
    entry, n = spill.best(np.arange(400))
    assert entry is not None and n == 301
    cache = spill.load(entry, n, lambda: KVCache(CONFIG, dtype=np.float16))
    assert cache is not None and same_bits(cache.k[:, :301], want)
    spill.close()


def test_disk_budget_deletes_the_oldest_files(tmp_path: Path) -> None:
    spill = KVSpill(tmp_path, 2 * file_size(25), KEY)  # two files, not three
    for i in range(3):
        spill.save(np.arange(20) + 1000 * i, filled_cache(20, seed=i))
    spill.flush()
    assert len(spill_files(spill)) == 2 and spill.nbytes == 2 * file_size(20)
    assert spill.best(np.arange(20))[0] is None  # the first (oldest) is gone
    assert spill.best(np.arange(20) + 2000)[1] == 20
    assert not spill.save(np.arange(100), filled_cache(100))  # larger than the budget
    spill.save(np.arange(25) + 1000, filled_cache(25))  # supersedes the entry it extends
    spill.flush()
    assert sorted(len(e.tokens) for e in spill.entries) == [20, 25]
    assert len(spill_files(spill)) == 2
    spill.close()


def test_restart_finds_the_files_and_another_model_does_not(tmp_path: Path) -> None:
    spill = KVSpill(tmp_path, 1 << 30, KEY)
    original = filled_cache(50, seed=3)
    want = original.v[:, :50].copy()
    spill.save(np.arange(50), original)
    spill.save(np.arange(30) + 500, filled_cache(30))
    spill.close()
    assert len(KVSpill(tmp_path, 1 << 30, "model-b")) == 0
    again = KVSpill(tmp_path, 1 << 30, KEY)
    assert sorted(len(e.tokens) for e in again.entries) == [30, 50]
    entry, n = again.best(np.arange(60))
    assert entry is not None and n == 50
    cache = again.load(entry, 50, lambda: KVCache(CONFIG, dtype=np.float16))
    assert cache is not None and same_bits(cache.v[:, :50], want)
    again.close()  # a restart: the folder is the next process's
    assert len(KVSpill(tmp_path, 1 << 30, KEY)) == 1  # the loaded file is gone


def test_two_servers_on_one_folder_each_keep_their_own_files(tmp_path: Path) -> None:
    """Two servers sharing --cache-dir for one model deleted each other's files: a start
    deleted the other's files being written, and each evicted what its index held."""
    first = KVSpill(tmp_path, file_size(40), KEY, background=False)
    first.save(np.arange(40), filled_cache(40))
    (first.directory / f".writing{SUFFIX}.tmp").write_bytes(b"the first one's write")
    second = KVSpill(tmp_path, file_size(40), KEY, background=False)
    assert second.directory != first.directory and len(second) == 0
    assert (first.directory / f".writing{SUFFIX}.tmp").exists()
    second.save(np.arange(40) + 500, filled_cache(40, seed=1))  # its budget: one file
    assert len(spill_files(first)) == len(spill_files(second)) == 1
    first.close()
    second.close()
    again = KVSpill(tmp_path, 1 << 30, KEY)  # a restart takes the first folder back
    assert again.directory == first.directory and len(again) == 1
    again.close()


def test_truncated_and_garbage_files_are_ignored_and_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spill = KVSpill(tmp_path, 1 << 30, KEY, background=False)
    for i in range(3):
        spill.save(np.arange(40) + 100 * i, filled_cache(40, seed=i))
    first, second, third = (e.path for e in sorted(spill.entries, key=lambda e: e.last_used))
    with open(first, "r+b") as f:
        f.truncate(os.path.getsize(first) - 7)
    second.write_bytes(os.urandom(os.path.getsize(second)))
    (spill.directory / f"junk{SUFFIX}").write_bytes(b"not a spill file")
    (spill.directory / f".half{SUFFIX}.tmp").write_bytes(b"a crash mid-write")
    spill.close()  # a restart: the folder is the next process's
    with caplog.at_level(logging.WARNING):
        again = KVSpill(tmp_path, 1 << 30, KEY)
    assert [e.path for e in again.entries] == [third]
    assert spill_files(again) == [third]
    assert sorted(p.name for p in again.directory.iterdir()) == [".lock", third.name]
    assert sum("ignoring KV spill file" in r.message for r in caplog.records) == 3


def test_a_corrupt_payload_is_detected_at_load(tmp_path: Path) -> None:
    spill = KVSpill(tmp_path, 1 << 30, KEY, background=False)
    spill.save(np.arange(40), filled_cache(40))
    entry = spill.entries[0]
    with open(entry.path, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        f.write(b"\xff\x00\xee")
    memory = KVMemory()
    assert spill.load(entry, 40, lambda: KVCache(CONFIG, dtype=np.float16, memory=memory)) is None
    assert not entry.path.exists() and memory.allocated_bytes == 0


def test_spill_key_names_the_model_file_and_layout(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"x" * 10)
    key = spill_key(path, "float16", (30, 5, 128))
    assert key == spill_key(path, np.float16, (30, 5, 128))
    assert key != spill_key(path, "float32", (30, 5, 128))
    assert key != spill_key(path, "float16", (30, 4, 128))
    os.utime(path, ns=(1, 1))
    assert key != spill_key(path, "float16", (30, 5, 128))


def test_eviction_spills_and_a_longer_prompt_hits_from_disk(tmp_path: Path) -> None:
    memory = KVMemory()
    spill = KVSpill(tmp_path, 1 << 30, KEY)
    one_entry = KVCache(CONFIG, dtype=np.float16).bytes_for(40)  # f16 K and V of 40 positions
    prefix = PrefixCache(one_entry, spill, lambda: KVCache(CONFIG, dtype=np.float16, memory=memory))
    a = filled_cache(40, seed=4, memory=memory)
    want = a.k[:, :40].copy()
    prefix.put(np.arange(40), a)
    prefix.put(np.arange(40) + 100, filled_cache(40, seed=5, memory=memory))  # evicts a
    spill.flush()
    assert len(prefix) == 1 and len(spill_files(spill)) == 1
    assert prefix.stats.evictions == 1 and prefix.stats.spilled == 1
    assert memory.allocated_bytes == prefix.nbytes  # the spilled cache's RAM is back
    cache = prefix.take([*range(40), 7, 8])
    assert cache is not None and cache.length == 40 and same_bits(cache.k[:, :40], want)
    assert prefix.stats.hits == 1 and prefix.stats.disk_hits == 1
    assert prefix.stats.cached_tokens == 40 and spill_files(spill) == []
    # RAM wins a tie, and a longer RAM prefix beats a shorter disk one
    spill.save(np.arange(40) + 100, cache)
    spill.flush()
    ram = prefix.take([*range(100, 140), 1])
    assert ram is not None and prefix.stats.disk_hits == 1 and len(spill) == 1
    spill.close()


@pytest.fixture(scope="module")
def loaded(gqa_model_path: Path) -> Iterator[LoadedModel]:
    model = load_model(gqa_model_path)
    yield model
    model.close()


def greedy(loaded: LoadedModel, sched: Scheduler, prompt: list[int]) -> tuple[Sequence, list[int]]:
    """Run ``prompt`` alone through ``sched``: the sequence and its 8 greedy tokens."""
    req = GenerationRequest(prompt, SamplingParams(temperature=0), max_tokens=8, ignore_eos=True)
    seq = Generator(loaded.model, loaded.tokenizer).start_sequence(req)
    sched.add(seq)
    tokens = []
    while sched.has_work:
        tokens += [event.token_id for _, event in sched.step().events]
    return seq, tokens


def test_a_prefix_back_from_disk_never_changes_outputs(loaded: LoadedModel, tmp_path: Path) -> None:
    model = loaded.model
    config = SchedulerConfig(4, 32)
    rng = np.random.default_rng(21)
    history, follow_up = rng.integers(0, 256, 70).tolist(), rng.integers(0, 256, 9).tolist()
    layout = (model.config.n_layers, model.config.n_kv_heads, model.config.head_dim)
    spill = KVSpill(tmp_path, 1 << 30, spill_key(loaded.path, "float16", layout))
    prefix = PrefixCache(1, spill)  # 1 byte of RAM: every finished entry goes to disk
    warm = Scheduler(model, config, prefix)
    prefix.make_cache = lambda: model.new_cache(None, np.float16, warm.memory)
    _, first = greedy(loaded, warm, history)
    spill.flush()
    assert len(spill) == 1 and len(prefix) == 0 and warm.memory.allocated_bytes == 0
    continued = [*history, *first, *follow_up]
    seq, warm_tokens = greedy(loaded, warm, continued)
    assert seq.num_cached_tokens == len(history) + len(first) - 1
    assert prefix.stats.disk_hits == 1
    _, cold_tokens = greedy(loaded, Scheduler(model, config), continued)
    assert warm_tokens == cold_tokens
    spill.close()  # a restart: the folder is the next process's
    restarted = Scheduler(
        model, config, PrefixCache(1, KVSpill(tmp_path, 1 << 30, spill.directory.name))
    )
    assert restarted.prefix_cache is not None
    restarted.prefix_cache.make_cache = lambda: model.new_cache(None, np.float16, restarted.memory)
    seq, again = greedy(loaded, restarted, continued)
    assert again == cold_tokens and seq.num_cached_tokens == len(continued) - 1


@pytest.mark.parametrize("where", ["ram", "disk"])
def test_a_shared_header_is_copied_and_the_entry_stays_for_its_owner(
    tmp_path: Path, where: str
) -> None:
    spill = KVSpill(tmp_path, 1 << 30, KEY)
    budget = 1 if where == "disk" else 1 << 30  # 1 byte: every entry goes to disk
    prefix = PrefixCache(budget, spill, lambda: KVCache(CONFIG, dtype=np.float16))
    owner = np.arange(200)
    original = filled_cache(200, seed=6)
    want = original.k[:, :40].copy()
    prefix.put(owner, original)
    spill.flush()
    other = prefix.take([*range(40), 999, 998])  # shares 40 of its 200 tokens
    assert other is not None and other.length == 40 and same_bits(other.k[:, :40], want)
    assert len(prefix) + len(spill) == 1  # the owner's entry is still there ...
    mine = prefix.take([*range(200), 5])
    assert mine is not None and mine.length == 200  # ... whole
    assert prefix.stats.disk_hits == (2 if where == "disk" else 0)
    assert len(prefix) + len(spill) == 0
    spill.close()


def test_a_few_shared_tokens_are_not_read_from_disk(tmp_path: Path) -> None:
    spill = KVSpill(tmp_path, 1 << 30, KEY)
    prefix = PrefixCache(1, spill, lambda: KVCache(CONFIG, dtype=np.float16))
    prefix.put(np.arange(200), filled_cache(200))
    assert prefix.take([*range(MIN_DISK_TOKENS - 1), 999]) is None
    assert prefix.take([*range(MIN_DISK_TOKENS), 999]) is not None
    assert len(spill) == 1 and prefix.stats.hits == 1
    spill.close()


def test_entries_are_reused_within_their_scope_only_in_ram_and_on_disk(tmp_path: Path) -> None:
    """A prefix-cache entry belongs to the scope (API key) whose request computed it:
    another scope never gets it, so no key learns from cache hits what another sent."""
    memory = KVMemory()
    spill = KVSpill(tmp_path, 1 << 30, KEY)
    one_entry = KVCache(CONFIG, dtype=np.float16).bytes_for(40)
    prefix = PrefixCache(one_entry, spill, lambda: KVCache(CONFIG, dtype=np.float16, memory=memory))
    prompt = [*range(40), 7]
    prefix.put(np.arange(40), filled_cache(40, seed=6, memory=memory), scope="alice")
    assert prefix.cached_length(prompt, "bob") == 0 and prefix.take(prompt, scope="bob") is None
    assert prefix.take(prompt) is None  # nor the unscoped (keyless) requests
    # bob's identical prompt is an entry of its own; it does not supersede alice's
    prefix.put(np.arange(40), filled_cache(40, seed=7, memory=memory), scope="bob")
    spill.flush()
    assert len(prefix) == 1 and len(spill) == 1  # alice's was evicted to disk, not dropped
    (on_disk,) = spill.entries
    assert on_disk.scope == "alice" and on_disk.path.name.startswith("alice.")
    spill.close()
    again = KVSpill(tmp_path, 1 << 30, KEY)  # a restart reads the scope from the name
    assert [e.scope for e in again.entries] == ["alice"]
    assert again.best(prompt, "bob") == (None, 0)
    entry, n = again.best(prompt, "alice")
    assert entry is not None and n == 40
    again.close()
    alices = prefix.take(prompt, scope="alice")  # from disk, for alice
    bobs = prefix.take(prompt, scope="bob")  # from RAM, for bob
    assert alices is not None and bobs is not None and prefix.stats.disk_hits == 1
