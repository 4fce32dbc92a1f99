"""The head's tiled layout (kernels.tensors.tile_rows): each 4 rows as one run of their
64-byte lines in turn. The native head reads it to the plain layout's bits, and the
embedding lookup and the numpy head read the same rows from it."""

from __future__ import annotations

import numpy as np
import pytest

from bitserve.gguf.constants import GGMLType
from bitserve.kernels import EmbeddingMatrix, NumpyBackend
from bitserve.kernels.native import NativeBackend
from bitserve.kernels.tensors import can_tile, tile_rows, tiled_rows

KINDS = {
    "f16": (np.float16, GGMLType.F16),
    "f32": (np.float32, GGMLType.F32),
    "bf16": (np.uint16, GGMLType.BF16),
}


def matrices(kind: str, vocab: int, dim: int, seed: int) -> tuple[EmbeddingMatrix, EmbeddingMatrix]:
    """(plain, tiled) copies of one random ``kind`` matrix"""
    dtype, source = KINDS[kind]
    values = np.random.default_rng(seed).standard_normal((vocab, dim), dtype=np.float32)
    data = (
        (values.view(np.uint32) >> 16).astype(np.uint16) if kind == "bf16" else values.astype(dtype)
    )
    tiled = np.empty_like(data)
    tile_rows(data, tiled)
    plain = EmbeddingMatrix(kind, vocab, dim, source, data=data)
    return plain, EmbeddingMatrix(kind, vocab, dim, source, data=tiled, tiled=True)


@pytest.mark.parametrize("n_rows", [1, 4, 7, 9, 12])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.uint16])
def test_tiles_are_each_four_rows_lines_in_turn_and_read_back(n_rows: int, dtype: type) -> None:
    rows = np.random.default_rng(n_rows).integers(0, 255, (n_rows, 96), dtype=np.uint8)
    rows = rows.view(dtype)  # 96 bytes a row is not whole lines: widen to 192
    rows = np.ascontiguousarray(np.concatenate([rows, rows], axis=1))
    assert can_tile(rows)
    tiled = np.empty_like(rows)
    tile_rows(rows, tiled)
    raw, flat = rows.view(np.uint8), tiled.view(np.uint8).reshape(-1)
    whole = n_rows // 4 * 4
    for v in range(whole):  # line l of row r of tile t at t·4·192 + 64·(4l + r)
        t, r = divmod(v, 4)
        for line in range(3):
            at = t * 4 * 192 + 64 * (4 * line + r)
            np.testing.assert_array_equal(flat[at : at + 64], raw[v, 64 * line : 64 * line + 64])
    np.testing.assert_array_equal(tiled[whole:], rows[whole:])  # the last rows stay plain
    ids = np.random.default_rng(1).integers(0, n_rows, 20)
    np.testing.assert_array_equal(tiled_rows(tiled, ids), rows[ids])


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize(("dim", "vocab"), [(64, 517), (2560, 301), (96, 8)])
def test_a_tiled_head_gives_the_plain_heads_bits(
    native: NativeBackend, kind: str, dim: int, vocab: int
) -> None:
    plain, tiled = matrices(kind, vocab, dim, seed=dim + vocab)
    if not native.tiles_heads:  # the scalar kernel reads plain rows only, and says so
        with pytest.raises(ValueError, match="AVX2"):
            native.head(np.zeros((1, dim), dtype=np.float32), tiled)
        return
    for t in (1, 2, 3, 4, 5, 9):  # every token block shape, then the odd ones left over
        x = np.random.default_rng(t).standard_normal((t, dim), dtype=np.float32)
        np.testing.assert_array_equal(native.head(x, tiled), native.head(x, plain))
    ids = np.arange(vocab)
    np.testing.assert_array_equal(tiled.rows(ids), plain.rows(ids))  # the embedding lookup
    x = np.random.default_rng(0).standard_normal((2, dim), dtype=np.float32)
    np.testing.assert_array_equal(NumpyBackend().head(x, tiled), NumpyBackend().head(x, plain))


def test_a_tiled_head_needs_whole_lines(native: NativeBackend) -> None:
    part_lines = np.zeros((12, 40), dtype=np.float16)  # 80 bytes a row
    assert not can_tile(part_lines)
    bad = EmbeddingMatrix("f16", 12, 40, GGMLType.F16, data=part_lines, tiled=True)
    with pytest.raises(ValueError, match="64-byte lines" if native.tiles_heads else "AVX2"):
        native.head(np.zeros((1, 40), dtype=np.float32), bad)
