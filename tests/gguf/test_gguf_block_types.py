"""Q2_0 (both variants), Q8_0 and Q6_K codecs, the TQ packers, and the reader's Q2_0 variant
detection. Where the PyPI ``gguf`` package knows a type it is the reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from bitserve.gguf import GGMLType, GGUFError, GGUFWriter, read_gguf
from bitserve.gguf.dense_quants import pack_q6_k, pack_q8_0, unpack_q6_k, unpack_q8_0
from bitserve.gguf.quants import (
    pack_q2_0,
    pack_tq1_0,
    pack_tq2_0,
    unpack_q2_0,
    unpack_tq1_0,
    unpack_tq2_0,
)


def _ternary(rng: np.random.Generator, rows: int, cols: int, top: int = 1) -> np.ndarray:
    return rng.integers(-1, top + 1, size=(rows, cols), dtype=np.int8)


def _f16_scales(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    return rng.uniform(0.01, 2.0, size=(rows, n)).astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("block", [64, 128])
def test_q2_0_round_trip_with_code_plus_two(block: int) -> None:
    rng = np.random.default_rng(block)
    values = _ternary(rng, 3, 512, top=2)  # the fourth code (+2) is part of the format
    scales = _f16_scales(rng, 3, 512 // block)
    raw = pack_q2_0(values, scales, block)
    assert raw.nbytes == 3 * 512 // block * (2 + block // 4)
    got, got_scales = unpack_q2_0(raw, 3, 512, block)
    np.testing.assert_array_equal(got, values)
    np.testing.assert_array_equal(got_scales, scales)


def test_q2_0_byte_layout() -> None:
    """Scale first, then weight j at bits 2(j % 4) of byte j / 4 (ggml's dequantize_row_q2_0)."""
    values = np.zeros((1, 64), dtype=np.int8) - 1  # code 0 everywhere
    values[0, 5] = 2  # code 3 at byte 1, bits 2-3
    values[0, 63] = 0  # code 1 at byte 15, bits 6-7
    raw = pack_q2_0(values, np.array([[0.5]]))
    assert raw[:2].tobytes() == np.float16(0.5).tobytes()
    assert raw[2 + 1] == 3 << 2 and raw[2 + 15] == 1 << 6
    assert raw.nbytes == 18


@pytest.mark.parametrize(
    ("pack", "unpack", "qtype"),
    [(pack_tq2_0, unpack_tq2_0, Q.TQ2_0), (pack_tq1_0, unpack_tq1_0, Q.TQ1_0)],
)
def test_tq_packers_match_gguf_byte_for_byte(pack: object, unpack: object, qtype: Q) -> None:
    assert callable(pack) and callable(unpack)
    rng = np.random.default_rng(int(qtype))
    values = _ternary(rng, 4, 512)
    scales = _f16_scales(rng, 4, 2)
    values[0, :256] = 0  # an all-zero block: gguf stores d = 0 there
    scales[0, 0] = 0
    raw = pack(values, scales)
    weights = values.astype(np.float32) * np.repeat(scales, 256, axis=1)
    np.testing.assert_array_equal(raw.reshape(4, -1), quantize(weights, qtype))
    got, got_scales = unpack(raw, 4, 512)
    np.testing.assert_array_equal(got, values)
    np.testing.assert_array_equal(got_scales, scales)


def test_q8_0_matches_gguf() -> None:
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 96)).astype(np.float32) * 3
    x[1, :32] = 0  # an all-zero block
    raw = pack_q8_0(x)
    np.testing.assert_array_equal(raw.reshape(5, -1), quantize(x, Q.Q8_0))
    values, scales = unpack_q8_0(raw, 5, 96)
    weights = np.repeat(scales, 32, axis=1) * values
    np.testing.assert_array_equal(weights, dequantize(raw.reshape(5, -1), Q.Q8_0))


def test_q6_k_unpacks_as_gguf_dequantizes() -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 512)).astype(np.float32)
    raw = pack_q6_k(x)
    assert raw.nbytes == 3 * 2 * 210
    values, scales = unpack_q6_k(raw, 3, 512)
    assert values.min() >= -32 and values.max() <= 31
    weights = np.repeat(scales, 16, axis=1) * values
    np.testing.assert_array_equal(weights, dequantize(raw.reshape(3, -1), Q.Q6_K))
    step = np.repeat(np.abs(x).reshape(3, -1, 16).max(axis=2) / 31, 16, axis=1)
    assert np.all(np.abs(weights - x) <= 0.6 * step)  # a real quantizer, not only a layout


def _q2_0_file(path: Path, block: int, shapes: list[tuple[int, int]]) -> Path:
    w = GGUFWriter()
    rng = np.random.default_rng(0)
    for i, (rows, cols) in enumerate(shapes):
        values, scales = _ternary(rng, rows, cols), _f16_scales(rng, rows, cols // block)
        w.add_tensor(f"t{i}", pack_q2_0(values, scales, block), GGMLType.Q2_0, (cols, rows), block)
    w.add_array("norm", np.ones(8, dtype=np.float32))
    w.write(path)
    return path


@pytest.mark.parametrize("block", [64, 128])
def test_reader_tells_the_q2_0_variants_apart(tmp_path: Path, block: int) -> None:
    path = _q2_0_file(tmp_path / f"g{block}.gguf", block, [(16, 256), (4, 1024)])
    with read_gguf(path) as g:
        assert g.q2_0_block == block
        values, _ = unpack_q2_0(g.raw("t0"), 16, 256, block)
        assert values.shape == (16, 256)
        assert g.tensors["t1"].nbytes == 4 * 1024 // block * (2 + block // 4)


@pytest.mark.parametrize("last", [False, True])
def test_truncated_g64_file_is_not_mistaken_for_g128(tmp_path: Path, last: bool) -> None:
    """The writer's offsets decide, never the file's length: a download cut short inside its
    last Q2_0 tensor (by less than g128 would need) is still g64, hence refused."""
    w = GGUFWriter()
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        values, scales = _ternary(rng, 64, 1024), _f16_scales(rng, 64, 16)
        w.add_tensor(name, pack_q2_0(values, scales), GGMLType.Q2_0, (1024, 64))
    if not last:
        w.add_array("norm", np.ones(8, dtype=np.float32))
    w.write(tmp_path / "g64.gguf")
    data = (tmp_path / "g64.gguf").read_bytes()
    cut = 64 + (0 if last else 32 + 32)  # past the norm, into tensor b
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - cut])
    with pytest.raises(GGUFError, match="past the end"):
        read_gguf(tmp_path / "cut.gguf")
    with read_gguf(tmp_path / "g64.gguf") as g:
        assert g.q2_0_block == 64


def test_q2_0_row_length_must_fill_blocks(tmp_path: Path) -> None:
    w = GGUFWriter()
    w.add_tensor("t", np.zeros(18 * 3, dtype=np.uint8), GGMLType.Q2_0, (96, 2))  # rows of 96
    w.write(tmp_path / "bad.gguf")
    with pytest.raises(GGUFError, match="row length 96, not a multiple of 64"):
        read_gguf(tmp_path / "bad.gguf")
