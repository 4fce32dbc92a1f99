"""Batch invariance: a token's result is the same bits alone, in a batch of T, on 1 or 2
threads. Batched decode (several sequences through one call) relies on it to give the same
greedy tokens as decoding each sequence alone."""

from __future__ import annotations

import numpy as np
import pytest

from bitserve.gguf import GGMLType
from bitserve.gguf.quants import pack_i2s
from bitserve.kernels import ActQuant, EmbeddingMatrix, TernaryWeight
from bitserve.kernels.native import NativeBackend, available_kernels

T = 11  # more than one 8-token tile, not a multiple of it


def _rows_alone(fn: object, x: np.ndarray) -> np.ndarray:
    """``fn`` applied to each row of ``x`` on its own, stacked back."""
    assert callable(fn)
    return np.concatenate([fn(x[i : i + 1]) for i in range(x.shape[0])])


def _other_threads(native: NativeBackend, head: str = "f16") -> NativeBackend:
    return NativeBackend(native.name, threads=3 - native.threads, head=head)


@pytest.mark.parametrize(("n_in", "n_out"), [(256, 37), (2560, 301)])
def test_bitlinear_is_batch_invariant(native: NativeBackend, n_in: int, n_out: int) -> None:
    rng = np.random.default_rng(n_in + n_out)
    ternary = rng.integers(-1, 2, size=(n_out, n_in), dtype=np.int8)
    w = TernaryWeight(pack_i2s(ternary, 0.7), n_out, n_in, 0.7)
    x = rng.standard_normal((T, n_in), dtype=np.float32)
    batch = native.bitlinear(x, w)
    np.testing.assert_array_equal(batch, _rows_alone(lambda r: native.bitlinear(r, w), x))
    np.testing.assert_array_equal(batch, _other_threads(native).bitlinear(x, w))


@pytest.mark.parametrize("act", list(ActQuant))
@pytest.mark.parametrize(
    ("n_in", "n_out", "group"), [(448, 37, 64), (2560, 301, 128), (1024, 9, 256)]
)
def test_blocked_bitlinear_is_batch_invariant(
    native: NativeBackend, n_in: int, n_out: int, group: int, act: ActQuant
) -> None:
    """Block-scaled weights (TQ1_0/TQ2_0/Q2_0), both activation quantizations."""
    rng = np.random.default_rng(n_in + n_out)
    values = rng.integers(-1, 2, size=(n_out, n_in), dtype=np.int8)
    scales = rng.uniform(0.1, 1, size=(n_out, n_in // group)).astype(np.float16)
    w = TernaryWeight.from_values(values, scales.astype(np.float32), act)
    x = rng.standard_normal((T, n_in), dtype=np.float32)
    batch = native.bitlinear(x, w)
    np.testing.assert_array_equal(batch, _rows_alone(lambda r: native.bitlinear(r, w), x))
    np.testing.assert_array_equal(batch, _other_threads(native).bitlinear(x, w))


@pytest.mark.parametrize("head", ["f16", "int8"])
@pytest.mark.parametrize(("dim", "vocab"), [(64, 300), (2560, 777)])
def test_head_is_batch_invariant(native: NativeBackend, head: str, dim: int, vocab: int) -> None:
    rng = np.random.default_rng(dim + vocab)
    emb = rng.standard_normal((vocab, dim), dtype=np.float32).astype(np.float16)
    x = rng.standard_normal((T, dim), dtype=np.float32)
    backend = NativeBackend(native.name, threads=native.threads, head=head)
    batch = backend.head(x, emb)
    np.testing.assert_array_equal(batch, _rows_alone(lambda r: backend.head(r, emb), x))
    np.testing.assert_array_equal(batch, _other_threads(native, head).head(x, emb))


@pytest.mark.parametrize("kind", ["bf16", "q8_0", "q6_k"])
def test_packed_heads_are_batch_invariant(native: NativeBackend, kind: str) -> None:
    """BF16 bits and the int8-block rows of Q8_0/Q6_K heads, read as they are."""
    rng = np.random.default_rng(7)
    emb = rng.standard_normal((301, 512), dtype=np.float32)
    if kind == "bf16":
        m = EmbeddingMatrix(
            "bf16", 301, 512, GGMLType.BF16, data=(emb.view(np.uint32) >> 16).astype(np.uint16)
        )
    else:
        block = 32 if kind == "q8_0" else 16
        scales = np.abs(emb).reshape(301, -1, block).max(axis=2) / 127
        values = np.rint(emb / np.repeat(scales, block, axis=1)).astype(np.int8)
        m = EmbeddingMatrix.from_int8(values, scales.astype(np.float32), GGMLType.Q8_0)
    x = rng.standard_normal((T, 512), dtype=np.float32)
    batch = native.head(x, m)
    np.testing.assert_array_equal(batch, _rows_alone(lambda r: native.head(r, m), x))
    np.testing.assert_array_equal(batch, _other_threads(native).head(x, m))


def test_f32_head_is_batch_invariant(native: NativeBackend) -> None:
    rng = np.random.default_rng(5)
    emb = rng.standard_normal((500, 200), dtype=np.float32)  # 200: a scalar tail too
    x = rng.standard_normal((T, 200), dtype=np.float32)
    batch = native.head(x, emb)
    np.testing.assert_array_equal(batch, _rows_alone(lambda r: native.head(r, emb), x))


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(20, 5, 128), (6, 3, 20), (12, 2, 48)])
@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16])
def test_attention_is_batch_invariant(
    native: NativeBackend, heads: int, kv_heads: int, dim: int, kv_dtype: type
) -> None:
    """T new tokens at once equal each token decoded alone over the same cache prefix."""
    rng = np.random.default_rng(heads + dim)
    start = 13
    q = rng.standard_normal((T, heads, dim), dtype=np.float32)
    k = rng.standard_normal((start + T, kv_heads, dim), dtype=np.float32).astype(kv_dtype)
    v = rng.standard_normal((start + T, kv_heads, dim), dtype=np.float32).astype(kv_dtype)
    batch = native.attention(q, k, v, start)
    for i in range(T):
        end = start + i + 1
        alone = native.attention(q[i : i + 1], k[:end], v[:end], start + i)
        np.testing.assert_array_equal(batch[i], alone[0])
    np.testing.assert_array_equal(batch, _other_threads(native).attention(q, k, v, start))


def _mode(head: str) -> str:
    """The backend's head mode for an embedding kind: F32 embeddings run under "f16"."""
    return "int8" if head == "int8" else "f16"


def _embedding(rng: np.random.Generator, head: str, vocab: int, dim: int) -> np.ndarray:
    emb = rng.standard_normal((vocab, dim), dtype=np.float32)
    return emb if head == "f32" else emb.astype(np.float16)


@pytest.mark.parametrize("head", ["f16", "int8", "f32"])
@pytest.mark.parametrize("dim", [37, 203, 1029])  # tails past the 8-lane steps and 64-byte lines
def test_head_is_batch_invariant_for_every_t(native: NativeBackend, head: str, dim: int) -> None:
    """Every T from 1 to 11 (odd and even, several register blocks of tokens) gives each
    token the bits it gets alone; 263 rows = a full 256-row chunk, a 4-row block and 3
    single rows."""
    rng = np.random.default_rng(dim)
    emb = _embedding(rng, head, 263, dim)
    x = rng.standard_normal((T, dim), dtype=np.float32)
    backend = NativeBackend(native.name, threads=native.threads, head=_mode(head))
    alone = _rows_alone(lambda r: backend.head(r, emb), x)
    for t in range(1, T + 1):
        np.testing.assert_array_equal(backend.head(x[:t], emb), alone[:t], err_msg=f"T={t}")
    other = _other_threads(native, _mode(head))
    np.testing.assert_array_equal(other.head(x, emb), alone)


@pytest.mark.parametrize("head", ["f16", "int8", "f32"])
def test_scalar_head_sums_in_the_documented_order(head: str) -> None:
    """The scalar head is, bit for bit, 8 float32 lanes summed over k in steps of 8, the
    lanes added as ((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7)), then the tail in order (the
    order the AVX2 path follows with FMA): the order head.c documents."""
    rng = np.random.default_rng(7)
    dim, vocab = 203, 40
    emb = _embedding(rng, head, vocab, dim)
    x = rng.standard_normal((3, dim), dtype=np.float32)
    backend = NativeBackend("scalar", threads=1, head=_mode(head))
    e = emb.astype(np.float32)
    if head == "int8":
        q, scale = backend.prepare_head(emb)
        e = q.astype(np.float32)
    lanes = np.zeros((x.shape[0], vocab, 8), dtype=np.float32)
    main = dim - dim % 8
    for k in range(0, main, 8):
        lanes += x[:, None, k : k + 8] * e[None, :, k : k + 8]
    a = lanes[..., :4] + lanes[..., 4:]
    want = (a[..., 0] + a[..., 2]) + (a[..., 1] + a[..., 3])
    for k in range(main, dim):
        want += x[:, None, k] * e[None, :, k]
    if head == "int8":
        want /= scale[None, :]
    np.testing.assert_array_equal(backend.head(x, emb), want)


@pytest.mark.parametrize("head", ["f16", "int8", "f32"])
def test_avx512_head_blocks_equal_the_avx2_ones(head: str) -> None:
    """The AVX-512VL register blocks (4 rows by 4 or 3 tokens) only regroup the dot products:
    every T gives the AVX2 path's bits (which the per-T test above ties to T = 1)."""
    kernels = available_kernels()
    if "avx512" not in kernels or "avx2" not in kernels:
        pytest.skip("needs both the AVX2 and the AVX-512 paths")
    rng = np.random.default_rng(31)
    emb = _embedding(rng, head, 263, 203)
    x = rng.standard_normal((T, 203), dtype=np.float32)
    wide = NativeBackend("avx512", threads=2, head=_mode(head))
    narrow = NativeBackend("avx2", threads=1, head=_mode(head))
    for t in (3, 4, 5, 7, 8, T):
        np.testing.assert_array_equal(
            wide.head(x[:t], emb), narrow.head(x[:t], emb), err_msg=f"T={t}"
        )


@pytest.mark.parametrize("layout", ["i2s", "g64", "g256-b32"])
def test_bitlinear_many_equals_separate_calls(native: NativeBackend, layout: str) -> None:
    """q/k/v in one fused task: each output the bits of its own call, at any T."""
    rng = np.random.default_rng(len(layout))
    shapes = [(320, 512), (64, 512), (64, 512)]
    weights = []
    for n_out, n_in in shapes:
        values = rng.integers(-1, 2, size=(n_out, n_in), dtype=np.int8)
        if layout == "i2s":
            weights.append(TernaryWeight(pack_i2s(values, 0.5), n_out, n_in, 0.5))
        else:
            group = int(layout[1:].split("-")[0])
            act = ActQuant.BLOCK32 if layout.endswith("b32") else ActQuant.PER_TOKEN
            scales = rng.uniform(0.1, 1, size=(n_out, n_in // group)).astype(np.float32)
            weights.append(TernaryWeight.from_values(values, scales, act).with_output_scale(1.5))
    for t in (1, 5):
        x = rng.standard_normal((t, 512), dtype=np.float32)
        fused = native.bitlinear_many(x, weights)
        for y, w in zip(fused, weights, strict=True):
            np.testing.assert_array_equal(y, native.bitlinear(x, w))


def test_gfni_and_shift_mask_code_planes_give_the_same_bits() -> None:
    """The AVX-512 kernels extract code planes with GFNI where the CPU has it; the shift and
    mask they use elsewhere (and at T > 1 for I2_S) must give the same bits at every T."""
    if "avx512" not in available_kernels():
        pytest.skip("needs the AVX-512 path")
    from bitserve.kernels import _native  # type: ignore[attr-defined]

    with_gfni = NativeBackend("avx512", threads=2)
    without = NativeBackend("avx512", threads=2)
    without._pool = _native.Pool(2, gfni=False)
    rng = np.random.default_rng(9)
    values = rng.integers(-1, 3, size=(37, 768), dtype=np.int8)
    scales = rng.uniform(0.1, 1, size=(37, 12)).astype(np.float32)
    weights = [
        TernaryWeight(pack_i2s(np.clip(values, -1, 1), 0.5), 37, 768, 0.5),
        TernaryWeight.from_values(values, scales, ActQuant.BLOCK32),
        TernaryWeight.from_values(values, scales, ActQuant.PER_TOKEN),
    ]
    for t in (1, 3):
        x = rng.standard_normal((t, 768), dtype=np.float32)
        for w in weights:
            np.testing.assert_array_equal(with_gfni.bitlinear(x, w), without.bitlinear(x, w))
