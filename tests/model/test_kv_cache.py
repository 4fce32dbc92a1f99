"""KVCache: layout, in-place writes over the whole context, bounds, truncation, memory
accounting (and that untouched or trimmed positions really cost no memory)."""

from __future__ import annotations

import dataclasses
import mmap
import os

import numpy as np
import pytest

from bitserve.model import ContextFullError, KVCache, ModelConfig
from bitserve.model.kv_cache import KVMemory

CONFIG = ModelConfig(
    arch="bitnet-b1.58",
    n_layers=3,
    dim=64,
    ffn_dim=128,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=32,
    context_length=16,
    rope_dim=16,
    rope_theta=500000.0,
    norm_eps=1e-5,
    activation="relu2",
)


def kv(n: int, value: float) -> np.ndarray:
    return np.full((n, CONFIG.n_kv_heads, CONFIG.head_dim), value, np.float32)


def test_starts_empty_and_max_seq_defaults_to_the_context_length() -> None:
    cache = KVCache(CONFIG)
    assert cache.k.shape == cache.v.shape == (3, 16, 2, 16)
    assert cache.k.dtype == cache.v.dtype == np.float32
    assert (cache.length, cache.max_seq, cache.free, cache.nbytes) == (0, 16, 16, 0)
    assert KVCache(CONFIG, max_seq=5).max_seq == 5
    with pytest.raises(ValueError, match="positive"):
        KVCache(CONFIG, max_seq=0)
    with pytest.raises(ValueError, match="dtype"):
        KVCache(CONFIG, dtype=np.int8)


def test_writes_in_place_and_counts_the_written_positions() -> None:
    config = dataclasses.replace(CONFIG, context_length=100)
    memory = KVMemory()
    cache = KVCache(config, dtype=np.float16, memory=memory)
    address = cache.k.__array_interface__["data"][0]
    page, runs = mmap.PAGESIZE, 2 * 3 * 2  # k and v, 3 layers, 2 KV heads (f16)
    rows_per_page = page // (CONFIG.head_dim * 2)
    assert cache.bytes_for(0) == 0
    assert cache.bytes_for(1) == cache.bytes_for(rows_per_page) == runs * page
    assert cache.bytes_for(rows_per_page + 1) == 2 * runs * page
    for pos in range(100):
        cache.write(0, pos, kv(1, pos), kv(1, -pos))
        cache.advance(1)
        assert cache.nbytes == memory.allocated_bytes == cache.bytes_for(pos + 1)
    assert cache.k.__array_interface__["data"][0] == address  # never moved, never copied
    k, v = cache.view(0, 100)
    np.testing.assert_array_equal(k[:, 0, 0], np.arange(100, dtype=np.float16))
    np.testing.assert_array_equal(v[:, 1, 3], -np.arange(100, dtype=np.float16))
    assert k.dtype == np.float16 and all(k[:, h].flags.c_contiguous for h in range(2))
    d = CONFIG.head_dim
    assert k.strides == (d * 2, 100 * d * 2, 2)  # head-major: each head's rows one run
    cache.truncate(40)
    assert cache.nbytes == cache.bytes_for(100)  # until trimmed
    cache.trim()
    assert cache.nbytes == memory.allocated_bytes == cache.bytes_for(40)
    np.testing.assert_array_equal(cache.view(0, 40)[0][:, 0, 0], np.arange(40))
    copy = cache.copy(10)
    assert (copy.length, copy.max_seq, copy.nbytes) == (10, 100, cache.bytes_for(10))
    assert memory.allocated_bytes == cache.nbytes + copy.nbytes
    np.testing.assert_array_equal(copy.view(0, 10)[1], cache.view(0, 10)[1])
    cache.release()
    copy.release()
    peak = max(cache.bytes_for(100), cache.bytes_for(40) + cache.bytes_for(10))
    assert memory.allocated_bytes == 0 and memory.peak_bytes == peak
    assert (cache.length, cache.nbytes) == (0, 0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_only_written_positions_take_memory() -> None:
    """A 2B-4T-sized cache (30 layers, 5 KV heads of 128, f16, 4096 positions: 315 MB of
    address space): memory follows the written positions, and trim/release give it back."""
    config = dataclasses.replace(
        CONFIG, n_layers=30, dim=2560, n_heads=20, n_kv_heads=5, context_length=4096
    )
    before = _rss_bytes()
    cache = KVCache(config, dtype=np.float16)
    assert _rss_bytes() - before < 4 * 2**20  # nothing committed yet
    rows = np.ones((1000, 5, 128), np.float16)
    for layer in range(30):
        cache.write(layer, 0, rows, rows)
    cache.advance(1000)
    grown = _rss_bytes() - before
    page = mmap.PAGESIZE  # 300 head runs of 1000 rows of 256 B each, in whole pages
    assert cache.nbytes == 300 * -(-256_000 // page) * page
    assert 0.9 * cache.nbytes < grown < 1.1 * cache.nbytes + 4 * 2**20
    cache.truncate(100)
    cache.trim()
    assert _rss_bytes() - before < 0.15 * grown
    cache.release()
    assert _rss_bytes() - before < 4 * 2**20


def _committed_bytes() -> int:
    with open("/proc/meminfo") as f:
        line = next(line for line in f if line.startswith("Committed_AS:"))
    return int(line.split()[1]) * 1024


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="needs Linux /proc")
def test_the_context_is_not_charged_up_front() -> None:
    """Four 2B-4T-sized caches (1.2 GB of address space) add no commit charge: under
    strict overcommit or an address-space limit a server still gets its caches."""
    config = dataclasses.replace(
        CONFIG, n_layers=30, dim=2560, n_heads=20, n_kv_heads=5, context_length=4096
    )
    before = _committed_bytes()
    caches = [KVCache(config, dtype=np.float16) for _ in range(4)]
    assert _committed_bytes() - before < 256 * 2**20
    assert sum(c.nbytes for c in caches) == 0


def test_write_view_advance() -> None:
    cache = KVCache(CONFIG, max_seq=8)
    for layer in range(CONFIG.n_layers):
        cache.write(layer, 0, kv(3, layer), kv(3, -layer))
    cache.advance(3)
    cache.write(1, 3, kv(2, 7.0), kv(2, 8.0))
    k, v = cache.view(1, 5)
    assert k.shape == v.shape == (5, 2, 16)
    np.testing.assert_array_equal(k[:, 0, 0], [1, 1, 1, 7, 7])
    np.testing.assert_array_equal(v[:, 0, 0], [-1, -1, -1, 8, 8])
    assert cache.length == 3  # writing alone does not make positions valid


def test_writing_at_a_negative_position_is_refused_as_such() -> None:
    cache = KVCache(CONFIG, max_seq=4)
    with pytest.raises(ValueError, match="write at position -1") as e:
        cache.write(0, -1, kv(2, 1.0), kv(2, 1.0))
    assert not isinstance(e.value, ContextFullError)  # not a "context full" message


def test_writing_past_max_seq_raises_before_changing_anything() -> None:
    cache = KVCache(CONFIG, max_seq=4)
    cache.write(0, 0, kv(3, 1.0), kv(3, 1.0))
    cache.advance(3)
    with pytest.raises(ContextFullError) as e:
        cache.write(0, 3, kv(2, 9.0), kv(2, 9.0))
    assert (e.value.length, e.value.n_new, e.value.max_seq) == (3, 2, 4)
    assert not np.any(cache.k == 9.0)
    with pytest.raises(ContextFullError):
        cache.check_room(2)
    with pytest.raises(ContextFullError):
        cache.advance(2)
    assert cache.length == 3
    cache.check_room(1)


def test_truncate() -> None:
    cache = KVCache(CONFIG)
    cache.advance(10)
    cache.truncate(4)
    assert (cache.length, cache.free) == (4, 12)
    cache.truncate(0)
    assert cache.length == 0
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(1)
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(-1)
