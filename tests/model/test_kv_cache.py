"""KVCache: layout, bounds, truncation."""

from __future__ import annotations

import numpy as np
import pytest

from bitserve.model import ContextFullError, KVCache, ModelConfig

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


def test_layout_defaults_to_the_context_length() -> None:
    cache = KVCache(CONFIG)
    assert cache.k.shape == cache.v.shape == (3, 16, 2, 16)
    assert cache.k.dtype == cache.v.dtype == np.float32
    assert (cache.length, cache.max_seq, cache.free) == (0, 16, 16)
    assert KVCache(CONFIG, max_seq=5).k.shape == (3, 5, 2, 16)
    with pytest.raises(ValueError, match="positive"):
        KVCache(CONFIG, max_seq=0)


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
