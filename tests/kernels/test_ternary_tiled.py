"""I2_S codes in the tiled layout (TernaryWeight.tiled_copy, csrc/native.h TILE_ROWS):
each 4 rows' 64-byte lines in turn. Every native path reads it to the numpy oracle's
bits, as it reads the plain layout, and the numpy side reads the same codes back."""

from __future__ import annotations

import numpy as np
import pytest

from bitserve.gguf.quants import pack_i2s
from bitserve.kernels import NumpyBackend, TernaryWeight, _native, reference  # type: ignore[attr-defined]
from bitserve.kernels.native import NativeBackend
from bitserve.kernels.tensors import _tile_rows_numpy, repack_blocked

# (T, K, N): K multiples of 256 (whole lines a row), N around the 4-row tile, T across the
# 4-token tile and the 32-row chunks
SHAPES = [
    (1, 256, 4),
    (1, 2560, 45),
    (2, 512, 7),
    (3, 6912, 130),
    (4, 768, 64),
    (5, 1536, 33),
    (9, 3072, 70),
    (17, 1024, 131),
]


def weights(n: int, k: int, seed: int) -> tuple[np.ndarray, TernaryWeight, TernaryWeight]:
    """(ternary values, plain weight, its tiled copy)"""
    rng = np.random.default_rng(seed)
    ternary = rng.integers(-1, 2, size=(n, k), dtype=np.int8)
    scale = float(np.float32(rng.uniform(0.1, 3.0)))
    plain = TernaryWeight(pack_i2s(ternary, scale), n, k, scale)
    return ternary, plain, plain.tiled_copy()


@pytest.mark.parametrize("n", [4, 5, 8, 11])
def test_tiles_are_each_four_rows_lines_in_turn(n: int) -> None:
    _, plain, tiled = weights(n, 768, seed=n)
    row_bytes, whole = 192, n // 4 * 4
    rows = plain.raw[: n * row_bytes].reshape(n, row_bytes)
    flat = tiled.raw
    for v in range(whole):  # line l of row r of tile t at t·4·192 + 64·(4l + r)
        t, r = divmod(v, 4)
        for line in range(3):
            at = t * 4 * row_bytes + 64 * (4 * line + r)
            np.testing.assert_array_equal(flat[at : at + 64], rows[v, 64 * line : 64 * line + 64])
    tail = slice(whole * row_bytes, n * row_bytes)
    np.testing.assert_array_equal(flat[tail], plain.raw[tail])  # the last rows stay plain
    np.testing.assert_array_equal(flat[n * row_bytes :], plain.raw[n * row_bytes :])  # scale
    assert tiled.tiled and not plain.tiled and tiled.scale == plain.scale


@pytest.mark.parametrize(("t", "k", "n"), SHAPES)
def test_tiled_codes_give_the_oracle_s_bits(native: NativeBackend, t: int, k: int, n: int) -> None:
    ternary, plain, tiled = weights(n, k, seed=k + n)
    rng = np.random.default_rng(t)
    q = rng.integers(-128, 128, size=(t, k), dtype=np.int8)
    np.testing.assert_array_equal(
        native.ternary_int(q, tiled), reference.ternary_matmul_int(q, ternary)
    )
    x = rng.standard_normal((t, k), dtype=np.float32)
    y = native.bitlinear(x, tiled)
    np.testing.assert_array_equal(y, reference.bitlinear(x, ternary, tiled.scale))
    np.testing.assert_array_equal(y, native.bitlinear(x, plain))


def test_fused_weights_in_either_layout_give_each_one_s_bits(native: NativeBackend) -> None:
    (_, q_plain, q_tiled), (_, k_plain, k_tiled) = weights(64, 1024, 1), weights(22, 1024, 2)
    x = np.random.default_rng(3).standard_normal((3, 1024), dtype=np.float32)
    alone = [native.bitlinear(x, w) for w in (q_plain, k_plain)]
    for pair in ([q_tiled, k_tiled], [q_tiled, k_plain], [q_plain, k_tiled]):  # one call, or two
        for y, want in zip(native.bitlinear_many(x, pair), alone, strict=True):
            np.testing.assert_array_equal(y, want)


def test_the_numpy_side_reads_the_same_codes_back() -> None:
    ternary, plain, tiled = weights(13, 512, seed=4)
    np.testing.assert_array_equal(tiled.codes(), plain.codes())
    np.testing.assert_array_equal(tiled.ternary_f32(), ternary.astype(np.float32))
    ids = np.array([12, 0, 5, 3, 12])
    np.testing.assert_array_equal(tiled.dequantize_rows(ids), plain.dequantize_rows(ids))
    x = np.random.default_rng(5).standard_normal((2, 512), dtype=np.float32)
    np.testing.assert_array_equal(
        NumpyBackend().bitlinear(x, tiled), reference.bitlinear(x, ternary, tiled.scale)
    )


def test_only_i2s_rows_of_whole_lines_are_tiled(native: NativeBackend) -> None:
    part_lines = TernaryWeight(pack_i2s(np.zeros((8, 384), np.int8), 1.0), 8, 384, 1.0)
    assert not part_lines.can_tile
    with pytest.raises(ValueError, match="cannot be tiled"):
        part_lines.tiled_copy()
    with pytest.raises(ValueError, match="whole 64-byte lines"):
        TernaryWeight(part_lines.raw, 8, 384, 1.0, tiled=True)
    with pytest.raises(ValueError, match="cannot be tiled"):
        weights(8, 256, seed=6)[2].tiled_copy()  # once is enough
    codes, scales = repack_blocked(np.zeros((4, 256), np.int8), np.ones((4, 4), np.float16), 64)
    blocked = TernaryWeight(codes, 4, 256, 1.0, scales, 64)
    assert not blocked.can_tile
    with pytest.raises(ValueError, match="whole 64-byte lines"):  # the kernel checks too
        native._pool.bitlinear(
            np.zeros((1, 384), np.float32), part_lines.raw, True, 8, 1.0,
            np.empty((1, 8), np.float32), native._impl,
        )  # fmt: skip


@pytest.mark.parametrize(("n", "row_bytes"), [(1, 64), (4, 64), (7, 192), (12, 1728), (130, 640)])
def test_the_c_tiling_meets_the_numpy_definition_in_place_too(n: int, row_bytes: int) -> None:
    rows = np.random.default_rng(n).integers(0, 256, (n, row_bytes), dtype=np.uint8)
    want = np.empty_like(rows)
    _tile_rows_numpy(rows, want)
    into = np.empty_like(rows)
    _native.tile_rows(rows, into)
    np.testing.assert_array_equal(into, want)
    in_place = rows.copy()
    _native.tile_rows(in_place, in_place)
    np.testing.assert_array_equal(in_place, want)


def test_the_c_tiling_refuses_partial_lines_and_overlaps() -> None:
    rows = np.zeros((8, 192), dtype=np.uint8)
    with pytest.raises(ValueError, match="whole 64-byte lines"):
        _native.tile_rows(np.zeros((8, 96), np.uint8), np.zeros((8, 96), np.uint8))
    flat = np.zeros(8 * 192 + 64, dtype=np.uint8)
    with pytest.raises(ValueError, match="in place or into another array"):
        _native.tile_rows(flat[:-64].reshape(8, 192), flat[64:].reshape(8, 192))
    with pytest.raises(ValueError):
        _native.tile_rows(rows, np.zeros((4, 192), np.uint8))
