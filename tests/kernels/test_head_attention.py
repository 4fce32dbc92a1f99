"""The LM head (F16, F32, int8) and attention against the numpy oracle, to float tolerance."""

from __future__ import annotations

import numpy as np
import pytest

from bitserve.kernels import NumpyBackend, reference
from bitserve.kernels.native import NativeBackend


@pytest.mark.parametrize(("t", "dim", "vocab"), [(1, 64, 300), (1, 2560, 517), (3, 100, 257)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_head_matches_oracle(
    native: NativeBackend, t: int, dim: int, vocab: int, dtype: type
) -> None:
    rng = np.random.default_rng(dim + vocab)
    x = rng.standard_normal((t, dim), dtype=np.float32)
    emb = rng.standard_normal((vocab, dim), dtype=np.float32).astype(dtype)
    got = native.head(x, emb)
    want = NumpyBackend().head(x, emb)
    assert got.shape == (t, vocab) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.sqrt(dim))


def test_int8_rows_equal_oracle(native: NativeBackend) -> None:
    rng = np.random.default_rng(11)
    emb = rng.standard_normal((700, 384), dtype=np.float32).astype(np.float16)
    emb[3] = 0  # an all-zero row: the 1e-5 floor, no division by zero
    backend = NativeBackend(native.name, threads=native.threads, head="int8")
    q, scale = backend.prepare_head(emb)
    q_ref, s_ref = reference.quantize_head_rows(emb)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(scale, s_ref)
    assert backend.prepare_head(emb)[0] is q  # computed once per embedding


def test_int8_head_matches_its_oracle_and_agrees_with_f16(native: NativeBackend) -> None:
    rng = np.random.default_rng(12)
    emb = rng.standard_normal((3000, 256), dtype=np.float32).astype(np.float16)
    x = rng.standard_normal((64, 256), dtype=np.float32)
    backend = NativeBackend(native.name, threads=native.threads, head="int8")
    got = backend.head(x, emb)
    want = reference.head_int8(x, *reference.quantize_head_rows(emb))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    exact = NumpyBackend().head(x, emb)
    agreement = (got.argmax(axis=1) == exact.argmax(axis=1)).mean()
    assert agreement >= 0.9, agreement
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 0.02


@pytest.mark.parametrize(
    ("t", "start", "heads", "kv_heads", "dim"),
    [
        (1, 0, 4, 4, 16),
        (1, 37, 20, 5, 128),
        (5, 0, 8, 2, 64),
        (7, 9, 6, 3, 20),
        (2, 11, 12, 4, 32),  # 3 query heads per KV head
        (3, 5, 12, 2, 48),  # 6 per KV head: a run of 4 heads and one of 2
    ],
)
@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16])
def test_attention_matches_oracle(
    native: NativeBackend, t: int, start: int, heads: int, kv_heads: int, dim: int, kv_dtype: type
) -> None:
    rng = np.random.default_rng(t * 100 + start)
    q = rng.standard_normal((t, heads, dim), dtype=np.float32)
    k = rng.standard_normal((start + t, kv_heads, dim), dtype=np.float32).astype(kv_dtype)
    v = rng.standard_normal((start + t, kv_heads, dim), dtype=np.float32).astype(kv_dtype)
    got = native.attention(q, k, v, start)
    np.testing.assert_allclose(got, NumpyBackend().attention(q, k, v, start), rtol=1e-4, atol=1e-5)


def test_attention_rejects_a_short_cache(native: NativeBackend) -> None:
    q = np.zeros((2, 4, 8), np.float32)
    k = np.zeros((3, 2, 8), np.float32)
    with pytest.raises(ValueError, match="k_cache"):
        native.attention(q, k, k, 2)  # needs start + T = 4 positions
