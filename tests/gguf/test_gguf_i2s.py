"""The I2_S codec (spec §2): test vector, round trips, and the scale/padding contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bitserve.gguf import GGMLType, GGUFWriter, read_gguf
from bitserve.gguf.quants import i2s_scale, pack_i2s, unpack_i2s, unpack_i2s_codes


def _pack_by_the_spec(ternary: np.ndarray, scale: float) -> bytes:
    """Spec §2 read literally, one weight at a time: an independent oracle for pack_i2s."""
    flat = [int(v) for v in ternary.reshape(-1)]
    out = bytearray(len(flat) // 4)
    for k, value in enumerate(flat):
        block, within = divmod(k, 128)
        group, j = divmod(within, 32)
        out[32 * block + j] |= (value + 1) << (6 - 2 * group)
    return bytes(out) + np.float32(scale).astype("<f4").tobytes() + bytes(28)


def test_spec_test_vector() -> None:
    ternary = np.array([(k % 3) - 1 for k in range(128)], dtype=np.int8)
    packed = pack_i2s(ternary, 0.5).tobytes()
    assert len(packed) == 64
    assert packed[:4] == bytes([0x24, 0x49, 0x92, 0x24])
    assert packed[32:36] == bytes([0x00, 0x00, 0x00, 0x3F])
    codes, scale = unpack_i2s(np.frombuffer(packed, dtype=np.uint8), 1, 128)
    np.testing.assert_array_equal(codes[0], ternary)
    assert scale == 0.5


@pytest.mark.parametrize("seed", range(6))
def test_round_trip_random_shapes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows, cols = int(rng.integers(1, 9)), 128 * int(rng.integers(1, 7))
    ternary = rng.integers(-1, 2, size=(rows, cols), dtype=np.int8)
    scale = float(np.float32(rng.uniform(0.01, 4.0)))
    packed = pack_i2s(ternary, scale)
    assert packed.dtype == np.uint8
    assert len(packed) == rows * cols // 4 + 32
    assert packed.tobytes() == _pack_by_the_spec(ternary, scale)
    codes, got_scale = unpack_i2s(packed, rows, cols)
    assert codes.dtype == np.int8
    np.testing.assert_array_equal(codes, ternary)
    assert got_scale == scale


def test_scale_comes_from_the_four_bytes_after_the_codes() -> None:
    ternary = np.zeros((2, 128), dtype=np.int8)
    packed = pack_i2s(ternary, 1.0).copy()
    packed[64:68] = np.frombuffer(np.float32(-3.25).astype("<f4").tobytes(), dtype=np.uint8)
    assert i2s_scale(packed, 2, 128) == -3.25


def test_padding_is_never_read() -> None:
    rng = np.random.default_rng(7)
    ternary = rng.integers(-1, 2, size=(3, 256), dtype=np.int8)
    clean = pack_i2s(ternary, 0.75)
    garbage = clean.copy()
    garbage[-28:] = rng.integers(0, 256, size=28, dtype=np.uint8)
    assert garbage.tobytes() != clean.tobytes()
    codes, scale = unpack_i2s(garbage, 3, 256)
    np.testing.assert_array_equal(codes, ternary)
    assert scale == 0.75
    # stronger: without the 28 bytes at all, decoding still works
    codes, scale = unpack_i2s(clean[:-28], 3, 256)
    np.testing.assert_array_equal(codes, ternary)
    assert scale == 0.75


def test_garbage_padding_in_a_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    ternary = rng.integers(-1, 2, size=(4, 128), dtype=np.int8)
    packed = pack_i2s(ternary, 1.5).copy()
    packed[-28:] = 0xA5
    w = GGUFWriter()
    w.add_tensor("w", packed, GGMLType.I2_S, (128, 4))
    w.write(tmp_path / "w.gguf")
    with read_gguf(tmp_path / "w.gguf") as gf:
        info = gf.tensors["w"]
        assert info.nbytes == 4 * 128 // 4 + 32
        codes, scale = unpack_i2s(gf.raw("w"), *info.shape)
    np.testing.assert_array_equal(codes, ternary)
    assert scale == 1.5


def test_rows_start_at_row_times_cols_over_4() -> None:
    rng = np.random.default_rng(9)
    ternary = rng.integers(-1, 2, size=(5, 384), dtype=np.int8)
    packed = pack_i2s(ternary, 1.0)
    for r in range(5):
        row_bytes = packed[r * 384 // 4 : (r + 1) * 384 // 4]
        np.testing.assert_array_equal(unpack_i2s_codes(row_bytes, 1, 384)[0], ternary[r])


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="multiple of 128"):
        pack_i2s(np.zeros((2, 64), dtype=np.int8), 1.0)
    with pytest.raises(ValueError, match="-1, 0 or \\+1"):
        pack_i2s(np.full((1, 128), 2, dtype=np.int8), 1.0)


def test_unpack_rejects_short_or_misshaped_buffers() -> None:
    packed = pack_i2s(np.zeros((2, 128), dtype=np.int8), 1.0)
    with pytest.raises(ValueError, match="multiple of 128"):
        unpack_i2s_codes(packed, 4, 64)
    with pytest.raises(ValueError, match="needs 96 bytes"):
        unpack_i2s_codes(packed[:64], 3, 128)
    with pytest.raises(ValueError, match="no scale"):
        i2s_scale(packed[:66], 2, 128)
