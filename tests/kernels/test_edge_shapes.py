"""Edge shapes against the numpy oracle through the Python API: every token count 1..17 (the
4- and 8-token tiles and their remainders), row counts and widths off the block, tile and
chunk sizes, one row, head dims up to 256 and off the 16-float vector step, and inputs that
start one element into their buffer (numpy slices). ``scripts/sanitize`` runs these under
AddressSanitizer and UBSan, which is where a read past an edge would show."""

from __future__ import annotations

import numpy as np
import pytest

from bitserve.gguf.quants import pack_i2s
from bitserve.kernels import ActQuant, NumpyBackend, TernaryWeight, reference
from bitserve.kernels.native import NativeBackend

ORACLE = NumpyBackend()


def shifted(a: np.ndarray) -> np.ndarray:
    """``a`` as a slice starting one element into a larger buffer (aligned to its items, not
    to the 64 bytes numpy's own arrays start on)."""
    flat = np.empty(a.size + 1, a.dtype)
    out = flat[1:].reshape(a.shape)
    out[...] = a
    return out


@pytest.mark.parametrize(("k", "n"), [(128, 1), (384, 37), (768, 5)])
def test_i2s_bitlinear_every_token_count(native: NativeBackend, k: int, n: int) -> None:
    rng = np.random.default_rng(k + n)
    ternary = rng.integers(-1, 2, (n, k), dtype=np.int8)
    w = TernaryWeight(shifted(pack_i2s(ternary, 0.5)), n, k, 0.5)
    for t in range(1, 18):
        x = rng.standard_normal((t, k), dtype=np.float32)
        want = reference.bitlinear(x, ternary, 0.5)
        np.testing.assert_array_equal(native.bitlinear(shifted(x), w), want)
        np.testing.assert_array_equal(native.bitlinear_many(shifted(x), [w, w])[1], want)


@pytest.mark.parametrize(
    ("k", "n", "group"), [(64, 1, 64), (320, 9, 64), (384, 3, 128), (512, 33, 256)]
)
@pytest.mark.parametrize("act", list(ActQuant))
def test_blocked_bitlinear_every_token_count(
    native: NativeBackend, k: int, n: int, group: int, act: ActQuant
) -> None:
    rng = np.random.default_rng(k + n + group)
    values = rng.integers(-1, 2, (n, k), dtype=np.int8)
    scales = rng.uniform(0.1, 2.0, (n, k // group)).astype(np.float16).astype(np.float32)
    w = TernaryWeight.from_values(values, scales, act)
    odd = TernaryWeight(shifted(w.raw), n, k, 1.0, shifted(w.scales), group, act, w.source)  # type: ignore[arg-type]
    for t in range(1, 18):
        x = rng.standard_normal((t, k), dtype=np.float32)
        want = ORACLE.bitlinear(x, w)
        np.testing.assert_array_equal(native.bitlinear(shifted(x), odd), want)
        np.testing.assert_array_equal(native.bitlinear_many(shifted(x), [odd, odd])[0], want)


@pytest.mark.parametrize(("dim", "vocab"), [(8, 1), (40, 5), (256, 9), (264, 13)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_head_every_token_count(native: NativeBackend, dim: int, vocab: int, dtype: type) -> None:
    rng = np.random.default_rng(dim + vocab)
    emb = rng.standard_normal((vocab, dim), dtype=np.float32).astype(dtype)
    for t in (1, 2, 3, 4, 5, 8, 9, 16, 17):
        x = rng.standard_normal((t, dim), dtype=np.float32)
        got = native.head(shifted(x), shifted(emb))
        np.testing.assert_allclose(got, ORACLE.head(x, emb), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("h", "kvh", "d"), [(1, 1, 2), (4, 1, 6), (8, 2, 80), (4, 2, 128), (2, 1, 256), (64, 2, 16)]
)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_attention_heads_and_head_dims(
    native: NativeBackend, h: int, kvh: int, d: int, dtype: type
) -> None:
    """Prefill of 1..17 tokens after a few cached ones, and decode of batches 1..17 with
    ragged lengths, head dims off the 16-float step (the scalar fallback) and up to 256."""
    rng = np.random.default_rng(h * d)
    for t in (1, 2, 5, 17):
        start = int(rng.integers(0, 40))
        q = rng.standard_normal((t, h, d), dtype=np.float32)
        k = rng.standard_normal((start + t, kvh, d), dtype=np.float32).astype(dtype)
        v = rng.standard_normal((start + t, kvh, d), dtype=np.float32).astype(dtype)
        got = native.attention(shifted(q), shifted(k), shifted(v), start)
        np.testing.assert_allclose(got, ORACLE.attention(q, k, v, start), rtol=1e-4, atol=1e-5)
    for b in range(1, 18):
        q = rng.standard_normal((b, h, d), dtype=np.float32)
        caches = [
            tuple(rng.standard_normal((s, kvh, d), dtype=np.float32).astype(dtype) for _ in "kv")
            for s in rng.integers(1, 50, b)
        ]
        got = native.attention_decode(shifted(q), [(shifted(k), shifted(v)) for k, v in caches])
        want = ORACLE.attention_decode(q, caches)  # type: ignore[arg-type]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("t", "n"), [(1, 1), (1, 7), (3, 8), (17, 33), (2, 1000)])
def test_row_wise_kernels(native: NativeBackend, t: int, n: int) -> None:
    rng = np.random.default_rng(t * n)
    x, u = (rng.standard_normal((t, n), dtype=np.float32) for _ in "xu")
    w = rng.standard_normal(n, dtype=np.float32)
    np.testing.assert_array_equal(
        native.rmsnorm(shifted(x), shifted(w), 1e-6), reference.rmsnorm(x, w, 1e-6)
    )
    np.testing.assert_array_equal(
        native.relu2_mul(shifted(x), shifted(u)), reference.relu2_mul(x, u)
    )
    np.testing.assert_allclose(
        native.silu_mul(shifted(x), shifted(u)), reference.silu_mul(x, u), rtol=1e-6, atol=1e-7
    )
    q, scale, _ = native.quantize(shifted(x))
    q_ref, s_ref = reference.quantize_activations(x)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(scale, s_ref)
    if n % 2 == 0:
        y = rng.standard_normal((t, 3, n), dtype=np.float32)
        cos, sin = (rng.standard_normal((t, n // 2), dtype=np.float32) for _ in "cs")
        np.testing.assert_array_equal(
            native.rope(shifted(y), shifted(cos), shifted(sin)), reference.rope_neox(y, cos, sin)
        )
