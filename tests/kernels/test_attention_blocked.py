"""The blocked attention path (T > 1 new tokens, head_dim a multiple of 16): query rows of
one KV head's group by a run of tokens share every K/V row, in register tiles of 4 or 8 rows
and position tiles of 64. Shapes here leave tails in every tiling (rows not a multiple of
the tile, positions not a multiple of 3 or 64, blocks whose tokens see different counts
of positions), and each token's result must be the bits it gets decoded alone (T = 1)."""

from __future__ import annotations

import numpy as np
import pytest

from bitserve.kernels.backend import NumpyBackend
from bitserve.kernels.native import NativeBackend

# (T, start_pos, heads, kv_heads, dim): GQA groups of 1, 2, 4 and 6 heads
SHAPES = [
    (2, 0, 4, 4, 16),  # group 1: 2 rows, the first token sees one position
    (9, 61, 8, 4, 32),  # group 2: blocks straddle the first 64-position tile
    (29, 130, 20, 5, 128),  # 2B-4T's heads: a follow-up turn over a cached history
    (24, 130, 20, 5, 128),  # ...whose 3 blocks x 5 KV heads 2 threads split as 4 x 5
    (13, 3, 12, 2, 48),  # group 6: 30-row blocks, tails of 4 and 2 rows
    (40, 0, 8, 2, 64),  # a fresh prompt: causal from position 0, several blocks
]


def _inputs(
    t: int, start: int, heads: int, kv_heads: int, dim: int, kv_dtype: type
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(t * 1000 + start * 10 + heads)
    q = rng.standard_normal((t, heads, dim), dtype=np.float32)
    k = rng.standard_normal((start + t, kv_heads, dim), dtype=np.float32).astype(kv_dtype)
    v = rng.standard_normal((start + t, kv_heads, dim), dtype=np.float32).astype(kv_dtype)
    return q, k, v


@pytest.mark.parametrize(("t", "start", "heads", "kv_heads", "dim"), SHAPES)
@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16])
def test_blocked_attention_matches_oracle(
    native: NativeBackend, t: int, start: int, heads: int, kv_heads: int, dim: int, kv_dtype: type
) -> None:
    q, k, v = _inputs(t, start, heads, kv_heads, dim, kv_dtype)
    got = native.attention(q, k, v, start)
    np.testing.assert_allclose(got, NumpyBackend().attention(q, k, v, start), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("t", "start", "heads", "kv_heads", "dim"), SHAPES)
@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16])
def test_blocked_attention_equals_decode_bit_for_bit(
    native: NativeBackend, t: int, start: int, heads: int, kv_heads: int, dim: int, kv_dtype: type
) -> None:
    """Every token of a T-token call equals the same token decoded alone over its prefix,
    and the other thread count gives the same bits (chunks split differently)."""
    q, k, v = _inputs(t, start, heads, kv_heads, dim, kv_dtype)
    batch = native.attention(q, k, v, start)
    for i in range(t):
        end = start + i + 1
        alone = native.attention(q[i : i + 1], k[:end], v[:end], start + i)
        np.testing.assert_array_equal(batch[i], alone[0], err_msg=f"token {i}")
    other = NativeBackend(native.name, threads=3 - native.threads)
    np.testing.assert_array_equal(other.attention(q, k, v, start), batch)


@pytest.mark.parametrize("t", [2, 3, 5, 8, 11])
def test_any_split_of_a_prompt_gives_the_same_bits(native: NativeBackend, t: int) -> None:
    """A 23-token prompt run as chunks of t tokens (a different block and tile layout per
    chunk) gives every token the bits it gets from the whole prompt in one call."""
    q, k, v = _inputs(23, 0, 8, 2, 64, np.float16)
    whole = native.attention(q, k, v, 0)
    for lo in range(0, 23, t):
        hi = min(lo + t, 23)
        part = native.attention(q[lo:hi], k[:hi], v[:hi], lo)
        np.testing.assert_array_equal(part, whole[lo:hi], err_msg=f"tokens {lo}..{hi - 1}")


def test_large_scores_do_not_overflow(native: NativeBackend) -> None:
    """Scores in the thousands (max-subtracted before exp) stay finite and match."""
    q, k, v = _inputs(7, 70, 8, 2, 32, np.float32)
    q *= 40.0
    got = native.attention(q, k, v, 70)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, NumpyBackend().attention(q, k, v, 70), rtol=1e-4, atol=1e-5)
