"""Arrays at any address and sizes at any magnitude through the native bindings: a typed array
that does not start on a whole item is a ValueError (the kernels read items through typed
pointers), byte arrays work at every offset, the backend copies what the bindings refuse,
and a size whose byte count would overflow, or that a kernel cannot take, is a ValueError,
never a wrapped-around check or undefined behaviour.

The byte-offset cases read the same bits either way on x86; what they guard against is the
undefined behaviour (misaligned loads) that ``scripts/sanitize`` (UBSan) reports."""

from __future__ import annotations

import numpy as np
import pytest

from bitserve.gguf.constants import GGMLType
from bitserve.gguf.dense_quants import pack_q6_k, pack_q8_0
from bitserve.kernels import EmbeddingMatrix, TernaryWeight
from bitserve.kernels.native import NativeBackend, _native

pytestmark = pytest.mark.skipif(_native is None, reason="the native extension is not built")


def at_offset(a: np.ndarray, offset: int) -> np.ndarray:
    """A copy of ``a`` whose data starts ``offset`` bytes past a 64-byte boundary."""
    buf = np.empty(a.nbytes + 128, np.uint8)
    start = -buf.ctypes.data % 64 + offset
    out = buf[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def test_a_typed_array_off_its_items_is_a_value_error(native: NativeBackend) -> None:
    pool, impl = native._pool, native._impl
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 64), dtype=np.float32)
    odd = at_offset(x, 2)
    assert not odd.flags.aligned
    with pytest.raises(ValueError, match="x: the data is not aligned to its 4-byte items"):
        pool.rmsnorm(odd, np.ones(64, np.float32), 1e-6, np.empty_like(x), impl)
    emb = at_offset(rng.standard_normal((5, 64), dtype=np.float32).astype(np.float16), 1)
    with pytest.raises(ValueError, match="embedding: the data is not aligned to its 2-byte"):
        pool.head(x, emb, None, np.empty((2, 5), np.float32), impl)
    k = rng.standard_normal((3, 1, 16), dtype=np.float32).astype(np.float16)
    q, out = np.zeros((1, 2, 16), np.float32), np.zeros((1, 2, 16), np.float32)
    with pytest.raises(ValueError, match="k_cache: the data is not aligned"):
        pool.attention(q, at_offset(k, 1), k, 2, out, impl)
    with pytest.raises(ValueError, match="k_cache: the data is not aligned"):
        pool.attention_decode(q, (at_offset(k, 1),), (k,), out, impl)


@pytest.mark.parametrize("offset", [1, 2, 3, 6])
def test_the_backend_reads_arrays_at_any_byte_offset(native: NativeBackend, offset: int) -> None:
    """Each kernel on arrays off their items' alignment gives the bits of aligned ones."""
    rng = np.random.default_rng(offset)
    x = rng.standard_normal((3, 256), dtype=np.float32)
    w = rng.standard_normal(256, dtype=np.float32)
    emb = rng.standard_normal((7, 256), dtype=np.float32).astype(np.float16)
    values = rng.integers(-1, 2, (5, 256), dtype=np.int8)
    blocked = TernaryWeight.from_values(values, np.full((5, 4), 0.5, np.float32))
    odd_scales = TernaryWeight(
        blocked.raw, 5, 256, 1.0, at_offset(blocked.scales, offset), 64, source=blocked.source
    )  # fmt: skip
    k = rng.standard_normal((4, 2, 32), dtype=np.float32).astype(np.float16)
    v = rng.standard_normal((4, 2, 32), dtype=np.float32).astype(np.float16)
    q = rng.standard_normal((1, 4, 32), dtype=np.float32)
    o = lambda a: at_offset(a, offset)  # noqa: E731
    cases = [
        (native.rmsnorm(o(x), o(w), 1e-6), native.rmsnorm(x, w, 1e-6)),
        (native.silu_mul(o(x), o(x)), native.silu_mul(x, x)),
        (native.head(o(x), o(emb)), native.head(x, emb)),
        (native.bitlinear(o(x), odd_scales), native.bitlinear(x, blocked)),
        (native.bitlinear_many(o(x), [odd_scales, odd_scales])[1], native.bitlinear(x, blocked)),
        (native.attention(o(q), o(k), o(v), 3), native.attention(q, k, v, 3)),
        (native.attention_decode(o(q), [(o(k), o(v))]), native.attention(q, k, v, 3)),
    ]
    for got, want in cases:
        np.testing.assert_array_equal(got, want)
    q8, s8 = NativeBackend(native.name, threads=1, head="int8").prepare_head(o(emb))
    want_q8, want_s8 = native.prepare_head(emb)
    np.testing.assert_array_equal(q8, want_q8)
    np.testing.assert_array_equal(s8, want_s8)


@pytest.mark.parametrize("offset", [1, 2, 3])
@pytest.mark.parametrize(
    "source", [GGMLType.Q8_0, GGMLType.Q6_K, GGMLType.BF16], ids=lambda t: t.name
)
def test_byte_rows_at_any_offset(native: NativeBackend, source: GGMLType, offset: int) -> None:
    """head_packed's rows and repack_int8_rows' output are uint8: any start is theirs to take
    (their f32 scales and bf16 values are copied out, not read through a cast pointer)."""
    rng = np.random.default_rng(int(source))
    values = rng.standard_normal((9, 512), dtype=np.float32)
    x = rng.standard_normal((2, 512), dtype=np.float32)
    if source == GGMLType.BF16:
        bits = (values.view(np.uint32) >> 16).astype(np.uint16)
        plain = EmbeddingMatrix("bf16", 9, 512, source, data=bits)
        odd = EmbeddingMatrix("bf16", 9, 512, source, data=at_offset(bits, offset))
    else:
        raw = (pack_q8_0 if source == GGMLType.Q8_0 else pack_q6_k)(values)
        plain = EmbeddingMatrix(
            "int8", 9, 512, source, block=32 if source == GGMLType.Q8_0 else 16, raw=raw
        )
        rows = plain.int8_rows()
        into = at_offset(np.zeros_like(rows), offset)
        _native.repack_int8_rows(raw, int(source), 9, 512, into)
        np.testing.assert_array_equal(into, rows)
        odd = EmbeddingMatrix._from_packed(at_offset(rows, offset), 512, plain.block, source)
    np.testing.assert_array_equal(native.head(x, odd), native.head(x, plain))


BIG = 2**62  # rows whose byte counts overflow 64 bits


def test_sizes_whose_byte_counts_overflow_are_value_errors(native: NativeBackend) -> None:
    """Before, rows · bytes per row wrapped around to a small or negative number and passed
    the size check: repack_tq_i2s wrote far past its output, ternary_scan scanned nothing."""
    pool, impl = native._pool, native._impl
    block = np.zeros(66, np.uint8)
    with pytest.raises(ValueError, match="more bytes than an array can hold"):
        _native.ternary_scan(block, int(GGMLType.TQ2_0), BIG, 256)
    with pytest.raises(ValueError, match="more bytes than an array can hold"):
        _native.repack_tq_i2s(block, int(GGMLType.TQ2_0), BIG, 256, None, np.zeros(0, np.uint8))
    n_out = 2**60  # · 32 bytes a row: 2**65, which wrapped to 0
    empty = np.zeros((0, 128), np.float32)
    with pytest.raises(ValueError, match="more bytes than an array can hold"):
        pool.bitlinear(
            empty, np.zeros(32, np.uint8), False, n_out, 1.0, np.empty((0, n_out), np.float32), impl
        )
    q = np.zeros((1, 2, 16), np.float32)
    k = np.zeros((3, 1, 16), np.float32)
    with pytest.raises(ValueError, match="start_pos 9223372036854775807 is past the cache's 3"):
        pool.attention(q, k, k, 2**63 - 1, np.empty_like(q), impl)


def test_an_empty_embedding_row_is_a_value_error(native: NativeBackend) -> None:
    """quantize_f16_rows widens a row into a stack array of its width: 0 was a zero-length
    VLA (undefined behaviour), now refused like a width past 65536."""
    pool, impl = native._pool, native._impl
    for width in (0, 65537):
        emb = np.zeros((3, width), np.float16)
        with pytest.raises(ValueError, match=f"embedding width {width} is not 1..65536"):
            pool.quantize_f16_rows(emb, np.zeros(emb.shape, np.int8), np.zeros(3, np.float32), impl)
