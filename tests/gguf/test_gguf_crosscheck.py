"""Files written by the PyPI ``gguf`` package: bitserve's reader must see what ``gguf.GGUFReader``
sees (metadata, types, tensor names, shapes, types, offsets and bytes)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType, GGUFValueType
from gguf.gguf_reader import GGUFReader
from gguf.gguf_writer import GGUFWriter as UpstreamWriter
from gguf.quants import dequantize, quantize

from bitserve.gguf import GGMLType, read_gguf
from bitserve.gguf.dense_quants import pack_q6_k
from bitserve.gguf.quants import repack_to_i2s, unpack_i2s
from bitserve.kernels import EmbeddingMatrix, TernaryWeight

V = GGUFValueType
Q = GGMLQuantizationType

METADATA: list[tuple[str, Any, GGUFValueType, GGUFValueType | None]] = [
    ("x.u8", 200, V.UINT8, None),
    ("x.i8", -100, V.INT8, None),
    ("x.u16", 60000, V.UINT16, None),
    ("x.i16", -30000, V.INT16, None),
    ("x.u32", 4_000_000_000, V.UINT32, None),
    ("x.i32", -2_000_000_000, V.INT32, None),
    ("x.u64", 2**63 + 5, V.UINT64, None),
    ("x.i64", -(2**62), V.INT64, None),
    ("x.f32", 1.0e-5, V.FLOAT32, None),
    ("x.f64", math.pi, V.FLOAT64, None),
    ("x.bool", True, V.BOOL, None),
    ("x.str", "bitnet-b1.58 ✓", V.STRING, None),
    ("x.a_i32", [1, -2, 3], V.ARRAY, None),
    ("x.a_u8", [0, 255], V.ARRAY, V.UINT8),
    ("x.a_u64", [2**64 - 1], V.ARRAY, V.UINT64),
    ("x.a_f32", [0.25, -1.5], V.ARRAY, None),
    ("x.a_f64", [0.1, 0.2], V.ARRAY, V.FLOAT64),
    ("x.a_bool", [True, False], V.ARRAY, None),
    ("x.a_str", ["Ġa", "<|eot_id|>", "é"], V.ARRAY, None),
]


def _tensors(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, Q | None]]:
    """name → (array handed to gguf's writer, raw type or None for float arrays)."""
    ternary = rng.integers(-1, 2, size=(4, 512)).astype(np.float32)
    bf16 = (rng.standard_normal((3, 8)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return {
        "norm.weight": (rng.standard_normal(16).astype(np.float32), None),
        "token_embd.weight": (rng.standard_normal((6, 32)).astype(np.float16), None),
        "cube.weight": (rng.standard_normal((2, 3, 4)).astype(np.float32), None),
        "bf16.weight": (bf16, Q.BF16),
        "tq2.weight": (quantize(ternary * np.float32(0.375), Q.TQ2_0), Q.TQ2_0),
        "tq1.weight": (quantize(ternary[:2] * np.float32(1.25), Q.TQ1_0), Q.TQ1_0),
        # block-scaled: every 256-block its own scale (a ramp over the blocks)
        "tq2_blocks.weight": (quantize(ternary * _ramp(4, 512), Q.TQ2_0), Q.TQ2_0),
        "tq1_blocks.weight": (quantize(ternary * _ramp(4, 512), Q.TQ1_0), Q.TQ1_0),
        "q8_0.weight": (quantize(rng.standard_normal((6, 64)).astype(np.float32), Q.Q8_0), Q.Q8_0),
        # gguf cannot quantize Q6_K: our packer's bytes, which gguf then reads
        "q6_k.weight": (pack_q6_k(rng.standard_normal((3, 512))).reshape(3, -1), Q.Q6_K),
    }


def _ramp(rows: int, cols: int) -> np.ndarray:
    """Distinct f16-exact block scales, one per 256 weights: 0.25, 0.375, 0.5, ..."""
    blocks = (np.arange(rows * cols // 256, dtype=np.float32) + 2) / 8
    return np.repeat(blocks.reshape(rows, -1), 256, axis=1)


def _write_upstream(path: Path, alignment: int | None) -> None:
    w = UpstreamWriter(path, "bitnet")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, value, vtype, sub_type in METADATA:
        w.add_key_value(key, value, vtype, sub_type)
    for name, (array, raw_dtype) in _tensors(np.random.default_rng(0)).items():
        w.add_tensor(name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module", params=[None, 64], ids=["default-alignment", "alignment-64"])
def upstream_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("upstream") / "upstream.gguf"
    _write_upstream(path, request.param)
    return path


def test_metadata_matches_gguf_reader(upstream_file: Path) -> None:
    theirs = GGUFReader(upstream_file)
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    with read_gguf(upstream_file) as ours:
        assert list(ours.metadata) == list(fields)
        for key, field in fields.items():
            assert ours.metadata_types[key] == field.types[0], key
            if field.types[0] == V.ARRAY:
                assert ours.metadata_array_types[key] == field.types[-1], key
            assert ours.metadata[key] == field.contents(), key
        assert ours.alignment == theirs.alignment
        assert ours.data_offset == theirs.data_offset


def test_metadata_values_are_what_was_written(upstream_file: Path) -> None:
    with read_gguf(upstream_file) as ours:
        assert ours.get("general.architecture") == "bitnet"
        for key, value, vtype, _ in METADATA:
            if vtype == V.FLOAT32:
                assert ours.get(key) == float(np.float32(value))
            elif key == "x.a_f32":
                assert ours.get(key) == [float(np.float32(v)) for v in value]
            else:
                assert ours.get(key) == value, key


def test_tensors_match_gguf_reader(upstream_file: Path) -> None:
    theirs = GGUFReader(upstream_file)
    with read_gguf(upstream_file) as ours:
        assert list(ours.tensors) == [t.name for t in theirs.tensors]
        for t in theirs.tensors:
            info = ours.tensors[t.name]
            assert info.dims == tuple(int(d) for d in t.shape), t.name
            assert int(info.ggml_type) == int(t.tensor_type), t.name
            assert info.n_elements == t.n_elements
            assert info.nbytes == t.n_bytes
            assert info.offset == t.data_offset
            assert ours.raw(t.name).tobytes() == np.asarray(t.data).tobytes(), t.name


def test_float_tensors_equal_what_was_written(upstream_file: Path) -> None:
    written = _tensors(np.random.default_rng(0))
    with read_gguf(upstream_file) as ours:
        for name in ("norm.weight", "token_embd.weight", "cube.weight"):
            np.testing.assert_array_equal(ours.array(name), written[name][0])
        bf16_bits = written["bf16.weight"][0]
        widened = (bf16_bits.astype(np.uint32) << 16).view(np.float32)
        np.testing.assert_array_equal(ours.array("bf16.weight"), widened)


@pytest.mark.parametrize(("name", "scale"), [("tq2.weight", 0.375), ("tq1.weight", 1.25)])
def test_ternary_tensors_repack_to_the_written_weights(
    upstream_file: Path, name: str, scale: float
) -> None:
    rng = np.random.default_rng(0)
    ternary = rng.integers(-1, 2, size=(4, 512)).astype(np.int8)  # as drawn in _tensors
    with read_gguf(upstream_file) as ours:
        info = ours.tensors[name]
        assert info.ggml_type in (GGMLType.TQ1_0, GGMLType.TQ2_0)
        rows, cols = info.shape
        i2s, got_scale = repack_to_i2s(ours.raw(name), info.ggml_type, rows, cols, name=name)
    codes, _ = unpack_i2s(i2s, rows, cols)
    np.testing.assert_array_equal(codes, ternary[:rows])
    assert got_scale == scale


@pytest.mark.parametrize(
    "name",
    [
        "tq2.weight",
        "tq1.weight",
        "tq2_blocks.weight",
        "tq1_blocks.weight",
        "q8_0.weight",
        "q6_k.weight",
    ],
)
def test_our_weights_are_gguf_dequantization(upstream_file: Path, name: str) -> None:
    """Every block-coded tensor gguf wrote (or read), through the kernels' weight types:
    the values equal gguf's own dequantization, per-block scales included."""
    theirs = {t.name: t for t in GGUFReader(upstream_file).tensors}[name]
    want = dequantize(np.asarray(theirs.data), theirs.tensor_type)
    with read_gguf(upstream_file) as ours:
        rows, cols = ours.tensors[name].shape
        if name.startswith("tq"):
            w = TernaryWeight.from_gguf(ours, name, rows, cols)
            assert w.blocked == name.endswith("blocks.weight")  # one scale: the I2_S path
            got = w.dequantize_rows(np.arange(rows))
        else:
            got = EmbeddingMatrix.from_gguf(ours, name, rows, cols).rows(np.arange(rows))
    np.testing.assert_array_equal(got, want.reshape(rows, cols))
