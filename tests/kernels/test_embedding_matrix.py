"""EmbeddingMatrix of every head/embedding type: the lookup equals ggml's dequantization and
the head (numpy and every native path) equals x times the dequantized matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as Q
from gguf.quants import dequantize

from bitserve.gguf import GGMLType, GGUFError, GGUFWriter, read_gguf
from bitserve.gguf.dense_quants import pack_q6_k, pack_q8_0, unpack_int8_blocks
from bitserve.gguf.quants import pack_q2_0
from bitserve.kernels import EmbeddingMatrix, NumpyBackend
from bitserve.kernels.native import NativeBackend

VOCAB, DIM = 300, 512
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q6_K", "Q2_0"]


@pytest.fixture(scope="module")
def heads(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """A file with one [VOCAB, DIM] matrix per type, and each one's exact float values."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((VOCAB, DIM)).astype(np.float32)
    bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)
    ternary = rng.integers(-1, 2, size=(VOCAB, DIM), dtype=np.int8)
    scales = rng.uniform(0.01, 0.1, size=(VOCAB, DIM // 64)).astype(np.float16).astype(np.float32)
    raw = {
        "F32": x,
        "F16": x.astype(np.float16),
        "BF16": bf16,
        "Q8_0": pack_q8_0(x),
        "Q6_K": pack_q6_k(x),
        "Q2_0": pack_q2_0(ternary, scales),
    }
    exact = {
        "F32": x,
        "F16": x.astype(np.float16).astype(np.float32),
        "BF16": (bf16.astype(np.uint32) << 16).view(np.float32),
        "Q8_0": dequantize(raw["Q8_0"].reshape(VOCAB, -1), Q.Q8_0),
        "Q6_K": dequantize(raw["Q6_K"].reshape(VOCAB, -1), Q.Q6_K),
        "Q2_0": ternary * np.repeat(scales, 64, axis=1),
    }
    w = GGUFWriter()
    for name, data in raw.items():
        w.add_tensor(name, data, GGMLType[name], (DIM, VOCAB))
    path = tmp_path_factory.mktemp("heads") / "heads.gguf"
    w.write(path)
    return path, exact


@pytest.mark.parametrize("gtype", TYPES)
def test_rows_are_ggml_dequantization(
    heads: tuple[Path, dict[str, np.ndarray]], gtype: str
) -> None:
    path, exact = heads
    with read_gguf(path) as g:
        m = EmbeddingMatrix.from_gguf(g, gtype, VOCAB, DIM)
        assert m.source == GGMLType[gtype] and m.shape == (VOCAB, DIM)
        ids = np.array([7, 0, VOCAB - 1, 7])
        np.testing.assert_array_equal(m.rows(ids), exact[gtype][ids])


@pytest.mark.parametrize("gtype", TYPES)
def test_head_is_the_dequantized_product(
    heads: tuple[Path, dict[str, np.ndarray]], native: NativeBackend, gtype: str
) -> None:
    path, exact = heads
    x = np.random.default_rng(1).standard_normal((3, DIM)).astype(np.float32)
    with read_gguf(path) as g:
        m = EmbeddingMatrix.from_gguf(g, gtype, VOCAB, DIM)
        want = x.astype(np.float64) @ exact[gtype].T.astype(np.float64)
        tol = 2e-2 if gtype == "Q2_0" else 1e-4  # a ternary head quantizes its activations
        for backend in (NumpyBackend(), native):
            got = backend.head(x, m)
            assert got.shape == (3, VOCAB) and got.dtype == np.float32
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def test_wrong_shape_names_the_tensor(tmp_path: Path) -> None:
    w = GGUFWriter()
    w.add_tensor("i2s", np.zeros(8 * 128 // 4 + 32, dtype=np.uint8), GGMLType.I2_S, (128, 8))
    w.write(tmp_path / "m.gguf")
    with read_gguf(tmp_path / "m.gguf") as g, pytest.raises(GGUFError, match="'i2s' has shape"):
        EmbeddingMatrix.from_gguf(g, "i2s", 128, 8)


@pytest.mark.parametrize("gtype", ["Q8_0", "Q6_K"])
def test_native_int8_rows_equal_the_numpy_packing(
    heads: tuple[Path, dict[str, np.ndarray]], gtype: str
) -> None:
    """The C repacking at load (seconds for a large head; numpy took ~13 s for Falcon3's
    Q6_K head) writes the bytes numpy's definition does."""
    path, _ = heads
    with read_gguf(path) as g:
        native = EmbeddingMatrix.from_gguf(g, gtype, VOCAB, DIM)
        values, scales = unpack_int8_blocks(g.raw(gtype), GGMLType[gtype], VOCAB, DIM)
        ref = EmbeddingMatrix.from_int8(values, scales, GGMLType[gtype])
    assert native.packed is None  # made when first read as a head, never for a lookup
    np.testing.assert_array_equal(native.int8_rows(), ref.int8_rows())
    assert native.block == ref.block == (32 if gtype == "Q8_0" else 16)
