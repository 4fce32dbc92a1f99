"""attention_decode: one new token of each of several sequences in one call gives every
sequence the bits of attention() on it alone (native paths), and the oracle's values."""

from __future__ import annotations

import numpy as np
import pytest

from bitserve.kernels import NumpyBackend
from bitserve.kernels.native import NativeBackend

H, KVH, D = 8, 2, 32


def caches(
    lengths: list[int], dtype: type, seed: int = 0
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((len(lengths), H, D), dtype=np.float32)
    kv = [
        (
            rng.standard_normal((s, KVH, D), dtype=np.float32).astype(dtype),
            rng.standard_normal((s, KVH, D), dtype=np.float32).astype(dtype),
        )
        for s in lengths
    ]
    return q, kv


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("lengths", [[1], [5, 1, 77], [300, 3, 64, 65, 129, 2, 9]])
def test_each_row_is_its_sequence_alone(
    native: NativeBackend, dtype: type, lengths: list[int]
) -> None:
    q, kv = caches(lengths, dtype, seed=len(lengths))
    together = native.attention_decode(q, kv)
    assert together.shape == q.shape and together.dtype == np.float32
    for b, (k, v) in enumerate(kv):
        alone = native.attention(q[b : b + 1], k, v, k.shape[0] - 1)
        np.testing.assert_array_equal(together[b : b + 1], alone)
        oracle = NumpyBackend().attention(q[b : b + 1], k, v, k.shape[0] - 1)
        np.testing.assert_allclose(together[b : b + 1], oracle, rtol=2e-5, atol=2e-6)


def test_the_default_is_the_oracle_row_by_row() -> None:
    q, kv = caches([4, 1, 30], np.float32)
    out = NumpyBackend().attention_decode(q, kv)
    for b, (k, v) in enumerate(kv):
        np.testing.assert_array_equal(
            out[b : b + 1], NumpyBackend().attention(q[b : b + 1], k, v, k.shape[0] - 1)
        )


def test_bad_inputs_raise(native: NativeBackend) -> None:
    q, kv = caches([4, 6], np.float16)
    pool, impl = native._pool, native._impl
    out = np.empty_like(q)
    with pytest.raises(ValueError, match="one k and one v cache per row"):
        pool.attention_decode(q, (kv[0][0],), (kv[0][1],), out, impl)
    mixed = (kv[0][0], kv[1][0].astype(np.float32))
    with pytest.raises(TypeError, match="one dtype"):
        pool.attention_decode(q, mixed, (kv[0][1], kv[1][1]), out, impl)
    wrong_heads = (kv[0][0], np.zeros((6, 3, D), np.float16))
    with pytest.raises(ValueError):
        pool.attention_decode(
            q, wrong_heads, (kv[0][1], np.zeros((6, 3, D), np.float16)), out, impl
        )
    no_heads = np.zeros((2, 0, D), np.float32)
    with pytest.raises(ValueError, match="query heads"):
        pool.attention_decode(no_heads, (kv[0][0], kv[1][0]), (kv[0][1], kv[1][1]), no_heads, impl)
    with pytest.raises(ValueError, match="query heads"):
        pool.attention(no_heads[:1], kv[0][0], kv[0][1], 3, no_heads[:1], impl)
    empty = np.zeros((0, KVH, D), np.float16)
    with pytest.raises(ValueError, match="no positions"):
        pool.attention_decode(q, (kv[0][0], empty), (kv[0][1], empty), out, impl)
