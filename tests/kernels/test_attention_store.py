"""The attention kernels store the new tokens' keys and values into the cache themselves
(``k_new``/``v_new``): the cache then holds exactly what numpy's assignment would (float16
rounded as ``astype``), and the result is that of storing first, then attending."""

from __future__ import annotations

import numpy as np
import pytest

from bitserve.kernels import NumpyBackend
from bitserve.kernels.native import NativeBackend

H, KVH, D = 8, 2, 32


def edge_values(n: int, seed: int) -> np.ndarray:
    """float32s around every float16 rounding case: ties, subnormals, overflow, zeros."""
    rng = np.random.default_rng(seed)
    halves = rng.integers(0, 0x7C00, n, dtype=np.uint16).view(np.float16).astype(np.float32)
    below = np.nextafter(halves, np.float32(0))
    ulp = np.abs(np.spacing(halves.astype(np.float16)).astype(np.float32))
    ties = halves + ulp / 2  # exactly halfway up: rounds to the even neighbour
    special = np.array(
        [0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e6, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0001,
         3 * 2.0**-26, 2.0**-14 - 2.0**-26, 6.1e-5, np.inf],
        dtype=np.float32,
    )  # fmt: skip
    values = np.concatenate(
        [halves, below, ties, special, rng.standard_normal(n).astype(np.float32)]
    )
    signs = np.where(rng.random(values.size) < 0.5, -1, 1).astype(np.float32)
    return values * signs


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_stored_rows_are_numpys_assignment(native: NativeBackend, dtype: type) -> None:
    values = edge_values(4000, seed=1)
    t = values.size // (KVH * D) // 4
    rows = values[: 4 * t * KVH * D].reshape(4, t, KVH, D)
    start = 3
    s = start + t
    q = np.random.default_rng(2).standard_normal((t, H, D), dtype=np.float32)
    k, v = np.zeros((s, KVH, D), dtype), np.zeros((s, KVH, D), dtype)
    with np.errstate(over="ignore"):
        native.attention(q, k, v, start, rows[0], rows[1])
        want_k, want_v = rows[0].astype(dtype), rows[1].astype(dtype)
    np.testing.assert_array_equal(k[start:].view(np.uint8), want_k.view(np.uint8))
    np.testing.assert_array_equal(v[start:].view(np.uint8), want_v.view(np.uint8))
    assert not k[:start].any() and not v[:start].any()  # nothing else written


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_store_then_attend_equals_attend_on_a_written_cache(
    native: NativeBackend, dtype: type
) -> None:
    rng = np.random.default_rng(3)
    start, t = 37, 5
    q = rng.standard_normal((t, H, D), dtype=np.float32)
    k = rng.standard_normal((start + t, KVH, D), dtype=np.float32).astype(dtype)
    v = rng.standard_normal((start + t, KVH, D), dtype=np.float32).astype(dtype)
    k_new = rng.standard_normal((t, KVH, D), dtype=np.float32)
    v_new = rng.standard_normal((t, KVH, D), dtype=np.float32)
    written_k, written_v = k.copy(), v.copy()
    written_k[start:], written_v[start:] = k_new, v_new
    want = native.attention(q, written_k, written_v, start)
    got = native.attention(q, k, v, start, k_new, v_new)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(k, written_k)
    np.testing.assert_array_equal(v, written_v)
    oracle_k, oracle_v = np.zeros_like(k), np.zeros_like(v)
    oracle_k[:start], oracle_v[:start] = k[:start], v[:start]
    oracle = NumpyBackend().attention(q, oracle_k, oracle_v, start, k_new, v_new)
    np.testing.assert_allclose(got, oracle, rtol=2e-5, atol=2e-6)
    np.testing.assert_array_equal(oracle_k, written_k)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_decode_stores_each_sequences_row_at_its_own_position(
    native: NativeBackend, dtype: type
) -> None:
    rng = np.random.default_rng(4)
    lengths = [1, 9, 130]
    q = rng.standard_normal((len(lengths), H, D), dtype=np.float32)
    kv = [
        tuple(rng.standard_normal((s, KVH, D), dtype=np.float32).astype(dtype) for _ in "kv")
        for s in lengths
    ]
    k_new = rng.standard_normal((len(lengths), KVH, D), dtype=np.float32)
    v_new = rng.standard_normal((len(lengths), KVH, D), dtype=np.float32)
    written = [(k.copy(), v.copy()) for k, v in kv]
    for b, (k, v) in enumerate(written):
        k[-1], v[-1] = k_new[b], v_new[b]
    want = native.attention_decode(q, written)
    got = native.attention_decode(q, kv, k_new, v_new)
    np.testing.assert_array_equal(got, want)
    for (k, v), (wk, wv) in zip(kv, written, strict=True):
        np.testing.assert_array_equal(k, wk)
        np.testing.assert_array_equal(v, wv)
    oracle_kv = [(k.copy(), v.copy()) for k, v in kv]
    oracle = NumpyBackend().attention_decode(q, oracle_kv, k_new, v_new)
    np.testing.assert_allclose(got, oracle, rtol=2e-5, atol=2e-6)


def test_store_refuses_what_it_cannot_write(native: NativeBackend) -> None:
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, H, D), dtype=np.float32)
    k = np.zeros((6, KVH, D), np.float16)
    new = rng.standard_normal((2, KVH, D), dtype=np.float32)
    out = np.empty_like(q)
    pool, impl = native._pool, native._impl
    read_only = k.copy()
    read_only.flags.writeable = False
    with pytest.raises((BufferError, ValueError)):
        pool.attention(q, read_only, k, 4, out, impl, new, new)
    with pytest.raises(ValueError, match="together"):
        pool.attention(q, k, k.copy(), 4, out, impl, new, None)
    with pytest.raises(ValueError, match="k_new"):
        pool.attention(q, k, k.copy(), 4, out, impl, new[:1], new[:1])
    strided = np.zeros((6, KVH, 2 * D), np.float16)[:, :, ::2]
    with pytest.raises((BufferError, ValueError)):
        native.attention(q, strided, strided.copy(), 4, new, new)  # never a silent copy
    with pytest.raises(ValueError, match="k_new"):
        pool.attention_decode(
            q, (k, k.copy()), (k.copy(), k.copy()), out, impl, new[:, :1].copy(), new
        )


def test_one_of_k_new_v_new_alone_is_refused() -> None:
    q = np.zeros((1, H, D), np.float32)
    k = np.zeros((1, KVH, D), np.float32)
    new = np.zeros((1, KVH, D), np.float32)
    for backend in (NumpyBackend(), NativeBackend("scalar", threads=1)):
        with pytest.raises(ValueError, match="together"):
            backend.attention(q, k, k.copy(), 0, new, None)
        with pytest.raises(ValueError, match="together"):
            backend.attention_decode(q, [(k, k.copy())], None, new)


def head_major(a: np.ndarray, capacity: int) -> np.ndarray:
    """``a [S, KVH, D]`` copied into head-major memory ``[KVH, capacity, D]`` (a KVCache's
    layout) and returned as the ``[S, KVH, D]`` view of it the model passes the kernels."""
    s, kvh, d = a.shape
    view = np.zeros((kvh, capacity, d), a.dtype).transpose(1, 0, 2)[:s]
    view[...] = a
    return view


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("t", [1, 9])  # the per-head path and the blocked (prefill) path
def test_head_major_caches_are_read_and_written_in_place(
    native: NativeBackend, dtype: type, t: int
) -> None:
    rng = np.random.default_rng(11)
    start = 45
    q = rng.standard_normal((t, H, D), dtype=np.float32)
    k = rng.standard_normal((start + t, KVH, D), dtype=np.float32).astype(dtype)
    v = rng.standard_normal((start + t, KVH, D), dtype=np.float32).astype(dtype)
    new_k, new_v = rng.standard_normal((2, t, KVH, D), dtype=np.float32)
    want = native.attention(q, k, v, start, new_k, new_v)
    k_head, v_head = head_major(np.zeros_like(k), 64), head_major(np.zeros_like(v), 64)
    k_head[:start], v_head[:start] = k[:start], v[:start]
    got = native.attention(q, k_head, v_head, start, new_k, new_v)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    # the new rows landed in the head-major memory itself: no copy was stored into
    np.testing.assert_array_equal(k_head.view(np.uint8), k.view(np.uint8))
    np.testing.assert_array_equal(v_head.view(np.uint8), v.view(np.uint8))
    again = native.attention(q, k_head, v_head, start)  # reading only
    np.testing.assert_array_equal(again.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_head_major_decode_equals_position_major(native: NativeBackend, dtype: type) -> None:
    rng = np.random.default_rng(12)
    lengths = [5, 30, 46]
    q = rng.standard_normal((len(lengths), H, D), dtype=np.float32)
    new_k, new_v = rng.standard_normal((2, len(lengths), KVH, D), dtype=np.float32)
    flat = [
        tuple(rng.standard_normal((n, KVH, D), dtype=np.float32).astype(dtype) for _ in "kv")
        for n in lengths
    ]
    heads = [(head_major(k, 48), head_major(v, 48)) for k, v in flat]
    want = native.attention_decode(q, flat, new_k, new_v)
    got = native.attention_decode(q, heads, new_k, new_v)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    for (k, v), (kh, vh) in zip(flat, heads, strict=True):
        np.testing.assert_array_equal(kh.view(np.uint8), k.view(np.uint8))
        np.testing.assert_array_equal(vh.view(np.uint8), v.view(np.uint8))


def test_k_and_v_must_share_a_layout(native: NativeBackend) -> None:
    q = np.zeros((1, H, D), np.float32)
    k = head_major(np.zeros((4, KVH, D), np.float32), 8)
    with pytest.raises(ValueError, match="same strides"):
        native._pool.attention(q, k, np.zeros((4, KVH, D), np.float32), 3, np.empty_like(q),
                               native._impl, np.zeros((1, KVH, D), np.float32),
                               np.zeros((1, KVH, D), np.float32))  # fmt: skip
