"""TQ2_0 / TQ1_0 unpack and TQ → I2_S repacking, checked against the PyPI ``gguf`` quantizer."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from bitserve.gguf import GGMLType, GGUFError
from bitserve.gguf.quants import (
    pack_i2s,
    repack_to_i2s,
    unpack_i2s,
    unpack_tq1_0,
    unpack_tq2_0,
)

Unpack = Callable[[np.ndarray, int, int], tuple[np.ndarray, np.ndarray]]
TQ_TYPES: list[tuple[GGMLType, GGMLQuantizationType, Unpack]] = [
    (GGMLType.TQ2_0, GGMLQuantizationType.TQ2_0, unpack_tq2_0),
    (GGMLType.TQ1_0, GGMLQuantizationType.TQ1_0, unpack_tq1_0),
]
TQ_IDS = ["TQ2_0", "TQ1_0"]


def _ternary(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    return rng.integers(-1, 2, size=(rows, cols)).astype(np.int8)


def _quantize(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """gguf's quantizer, as the flat bytes a GGUF file would hold."""
    return np.ascontiguousarray(quantize(values.astype(np.float32), qtype)).reshape(-1)


@pytest.mark.parametrize(("gtype", "qtype", "unpack"), TQ_TYPES, ids=TQ_IDS)
@pytest.mark.parametrize("seed", range(4))
def test_unpack_matches_gguf(
    gtype: GGMLType, qtype: GGMLQuantizationType, unpack: Unpack, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    rows, cols = int(rng.integers(1, 6)), 256 * int(rng.integers(1, 5))
    ternary = _ternary(rng, rows, cols)
    scale = float(rng.uniform(0.05, 3.0))
    raw = _quantize(ternary * np.float32(scale), qtype)
    codes, scales = unpack(raw, rows, cols)
    assert (codes.dtype, codes.shape) == (np.int8, (rows, cols))
    assert (scales.dtype, scales.shape) == (np.float32, (rows, cols // 256))
    np.testing.assert_array_equal(codes, ternary)
    np.testing.assert_array_equal(scales, np.float32(np.float16(scale)))
    expected = dequantize(raw.reshape(rows, -1), qtype)
    np.testing.assert_array_equal(codes * np.repeat(scales, 256, axis=1), expected)


@pytest.mark.parametrize(("gtype", "qtype", "unpack"), TQ_TYPES, ids=TQ_IDS)
def test_unpack_every_position_of_a_block(
    gtype: GGMLType, qtype: GGMLQuantizationType, unpack: Unpack
) -> None:
    """One nonzero weight at each of the 256 positions: catches any swapped index."""
    ternary = np.eye(256, dtype=np.int8) - np.eye(256, k=3, dtype=np.int8)
    codes, scales = unpack(_quantize(2 * ternary, qtype), 256, 256)
    np.testing.assert_array_equal(codes, ternary)
    np.testing.assert_array_equal(scales, np.full((256, 1), 2.0, dtype=np.float32))


@pytest.mark.parametrize(("gtype", "qtype", "unpack"), TQ_TYPES, ids=TQ_IDS)
def test_unpack_block_scales_per_row(
    gtype: GGMLType, qtype: GGMLQuantizationType, unpack: Unpack
) -> None:
    rng = np.random.default_rng(11)
    ternary = _ternary(rng, 3, 768)
    ternary[:, ::7] = 1  # every block holds a nonzero weight
    block_scales = rng.uniform(0.1, 2.0, size=(3, 3)).astype(np.float32)
    codes, scales = unpack(_quantize(ternary * np.repeat(block_scales, 256, axis=1), qtype), 3, 768)
    np.testing.assert_array_equal(codes, ternary)
    np.testing.assert_array_equal(scales, block_scales.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("unpack", [unpack_tq2_0, unpack_tq1_0], ids=TQ_IDS)
def test_unpack_rejects_bad_shapes(unpack: Unpack) -> None:
    with pytest.raises(ValueError, match="multiple of 256"):
        unpack(np.zeros(1000, dtype=np.uint8), 1, 128)
    with pytest.raises(ValueError, match="needs"):
        unpack(np.zeros(10, dtype=np.uint8), 2, 256)


@pytest.mark.parametrize(("gtype", "qtype", "unpack"), TQ_TYPES, ids=TQ_IDS)
@pytest.mark.parametrize("seed", range(3))
def test_repack_to_i2s_keeps_every_weight(
    gtype: GGMLType, qtype: GGMLQuantizationType, unpack: Unpack, seed: int
) -> None:
    rng = np.random.default_rng(100 + seed)
    rows, cols = int(rng.integers(1, 5)), 256 * int(rng.integers(1, 4))
    ternary = _ternary(rng, rows, cols)
    ternary[0, :256] = 0  # an all-zero block: gguf stores scale 0 for it
    scale = float(rng.uniform(0.05, 3.0))
    raw = _quantize(ternary * np.float32(scale), qtype)
    i2s, got_scale = repack_to_i2s(raw, gtype, rows, cols)
    assert got_scale == float(np.float16(scale))
    assert len(i2s) == rows * cols // 4 + 32
    codes, stored_scale = unpack_i2s(i2s, rows, cols)
    assert stored_scale == got_scale
    np.testing.assert_array_equal(codes, ternary)
    expected = dequantize(raw.reshape(rows, -1), qtype)
    np.testing.assert_array_equal(codes * np.float32(stored_scale), expected)


@pytest.mark.parametrize(("gtype", "qtype", "unpack"), TQ_TYPES, ids=TQ_IDS)
def test_repack_refuses_differing_block_scales(
    gtype: GGMLType, qtype: GGMLQuantizationType, unpack: Unpack
) -> None:
    rng = np.random.default_rng(5)
    ternary = _ternary(rng, 2, 256)
    ternary[:, 0] = 1
    values = ternary * np.array([[0.5], [0.7]], dtype=np.float32)
    with pytest.raises(GGUFError) as exc:
        repack_to_i2s(_quantize(values, qtype), gtype, 2, 256, path="m.gguf", name="blk.0.w")
    assert exc.value.path == "m.gguf"
    assert "'blk.0.w'" in exc.value.problem
    assert "block scales" in exc.value.problem
    assert "0.5" in exc.value.problem and "0.7" in exc.value.problem


@pytest.mark.parametrize(("gtype", "qtype", "unpack"), TQ_TYPES, ids=TQ_IDS)
def test_repack_accepts_f16_rounding_and_zero_blocks(
    gtype: GGMLType, qtype: GGMLQuantizationType, unpack: Unpack
) -> None:
    """Scales one f16 step apart are the same BitNet scale; an all-zero block has none."""
    base = np.float16(0.8)
    next_up = np.nextafter(base, np.float16(1.0))
    row_scales = np.array([base, base, next_up, 0], dtype=np.float32)[:, None]
    ternary = _ternary(np.random.default_rng(6), 4, 256)
    ternary[:3, 0] = 1
    ternary[3] = 0
    i2s, scale = repack_to_i2s(_quantize(ternary * row_scales, qtype), gtype, 4, 256)
    assert scale == float(base)  # the scale most blocks hold
    codes, _ = unpack_i2s(i2s, 4, 256)
    np.testing.assert_array_equal(codes, ternary)


def test_repack_zeroes_blocks_whose_scale_is_zero() -> None:
    """gguf-style TQ2_0 bytes with nonzero codes but d = 0 hold zero weights."""
    blocks = np.zeros((2, 66), dtype=np.uint8)
    blocks[:, :64] = 0b10_10_10_10  # every weight +1
    blocks[0, 64:] = np.frombuffer(np.float16(0.5).tobytes(), dtype=np.uint8)
    i2s, scale = repack_to_i2s(blocks.reshape(-1), GGMLType.TQ2_0, 2, 256)
    codes, _ = unpack_i2s(i2s, 2, 256)
    assert scale == 0.5
    np.testing.assert_array_equal(codes[0], np.ones(256, dtype=np.int8))
    np.testing.assert_array_equal(codes[1], np.zeros(256, dtype=np.int8))


def test_repack_refuses_code_3() -> None:
    blocks = np.zeros((1, 66), dtype=np.uint8)
    blocks[0, :64] = 0b01_01_01_01
    blocks[0, 5] = 0b11  # code 3 → value 2
    blocks[0, 64:] = np.frombuffer(np.float16(1.0).tobytes(), dtype=np.uint8)
    codes, _ = unpack_tq2_0(blocks.reshape(-1), 1, 256)
    assert codes.max() == 2  # unpack shows it rather than hiding it
    with pytest.raises(GGUFError, match="code 3"):
        repack_to_i2s(blocks.reshape(-1), GGMLType.TQ2_0, 1, 256, name="w")


def test_repack_all_zero_tensor() -> None:
    raw = _quantize(np.zeros((2, 256), dtype=np.float32), GGMLQuantizationType.TQ1_0)
    i2s, scale = repack_to_i2s(raw, GGMLType.TQ1_0, 2, 256)
    assert scale == 0.0
    np.testing.assert_array_equal(unpack_i2s(i2s, 2, 256)[0], np.zeros((2, 256), dtype=np.int8))


def test_repack_i2s_is_a_pass_through_view() -> None:
    ternary = _ternary(np.random.default_rng(3), 2, 128)
    packed = pack_i2s(ternary, 0.25)
    i2s, scale = repack_to_i2s(packed, GGMLType.I2_S, 2, 128)
    assert scale == 0.25
    assert np.shares_memory(i2s, packed)
    assert i2s.tobytes() == packed.tobytes()


def test_repack_refuses_float_types() -> None:
    with pytest.raises(GGUFError, match="not ternary"):
        repack_to_i2s(np.zeros(1024, dtype=np.uint8), GGMLType.F32, 1, 256, name="x")
