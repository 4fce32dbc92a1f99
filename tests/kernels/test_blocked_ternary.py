"""Block-scaled ternary weights: TernaryWeight.from_gguf for every ternary type, the blocked
oracle against plain float arithmetic, and every native path bit for bit against the oracle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bitserve.gguf import GGMLType, GGUFError, GGUFWriter, read_gguf
from bitserve.gguf.quants import pack_i2s, pack_q2_0, pack_tq1_0, pack_tq2_0
from bitserve.kernels import ActQuant, NumpyBackend, TernaryWeight, reference
from bitserve.kernels.native import NativeBackend

# (T, K, N): K a multiple of 64 (Q2_0's block), with and without a ragged last super-block
SHAPES = [(1, 256, 5), (3, 64, 9), (4, 1024, 33), (5, 448, 17), (9, 2560, 41), (2, 6912, 7)]


def _scales(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    return rng.uniform(0.05, 1.5, size=(rows, n)).astype(np.float16).astype(np.float32)


def _blocked(rng: np.random.Generator, n: int, k: int, group: int, act: ActQuant) -> TernaryWeight:
    values = rng.integers(-1, 3, size=(n, k), dtype=np.int8)  # +2 included (Q2_0's 4th code)
    return TernaryWeight.from_values(values, _scales(rng, n, k // group), act)


def _activations(rng: np.random.Generator, t: int, k: int) -> np.ndarray:
    x = rng.standard_normal((t, k), dtype=np.float32) * np.float32(rng.uniform(0.01, 10))
    x[0, rng.integers(k)] *= 40
    x[-1, :32] = 0  # an all-zero 32-block: BLOCK32 scale 0
    return x


def _float_reference(x: np.ndarray, w: TernaryWeight) -> np.ndarray:
    """float64 of the same quantized activations times the dequantized weights."""
    weights = (w.codes().astype(np.float64) - 1) * np.repeat(w.block_scales(), w.group, axis=1)
    if w.act_quant == ActQuant.PER_TOKEN:
        q, s = reference.quantize_activations(x)
        return (q.astype(np.float64) @ weights.T) / s[:, None].astype(np.float64)
    q, d = reference.quantize_blocks32(x)
    return (q.astype(np.float64) * np.repeat(d, 32, axis=1)) @ weights.T


@pytest.mark.parametrize("act", list(ActQuant))
@pytest.mark.parametrize("group", [64, 128, 256])
def test_oracle_is_the_float_product(group: int, act: ActQuant) -> None:
    rng = np.random.default_rng(group)
    k = 1024 if group == 256 else 448 + (64 if group == 128 else 0)
    w = _blocked(rng, 13, k, group, act)
    x = _activations(rng, 4, k)
    y = reference.bitlinear_blocked(x, w.codes(), w.block_scales(), group, act.value)
    ref = _float_reference(x, w)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_repacked_codes_and_scales_round_trip() -> None:
    rng = np.random.default_rng(1)
    values = rng.integers(-1, 3, size=(6, 320), dtype=np.int8)
    scales = _scales(rng, 6, 5)
    w = TernaryWeight.from_values(values, scales)
    assert w.blocked and w.group == 64 and w.raw.shape == (6, 128)  # 2 super-blocks, padded
    np.testing.assert_array_equal(w.codes(), values + 1)
    np.testing.assert_array_equal(w.block_scales(), scales)
    rows = w.dequantize_rows(np.array([4, 0]))
    np.testing.assert_array_equal(rows, values[[4, 0]] * np.repeat(scales[[4, 0]], 64, axis=1))


@pytest.mark.parametrize("act", list(ActQuant))
@pytest.mark.parametrize(("t", "k", "n"), SHAPES)
def test_native_equals_oracle(native: NativeBackend, t: int, k: int, n: int, act: ActQuant) -> None:
    rng = np.random.default_rng(t * k + n)
    group = 64 if k % 128 else (128 if k % 256 else 256)
    w = _blocked(rng, n, k, group, act)
    x = _activations(rng, t, k)
    np.testing.assert_array_equal(native.bitlinear(x, w), NumpyBackend().bitlinear(x, w))


# ---- from_gguf ------------------------------------------------------------------------------


def _file(path: Path, tensors: dict[str, tuple[np.ndarray, GGMLType, tuple[int, int]]]) -> Path:
    w = GGUFWriter()
    for name, (raw, gtype, (rows, cols)) in tensors.items():
        w.add_tensor(name, raw, gtype, (cols, rows))
    w.write(path)
    return path


@pytest.fixture
def ternary_file(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(3)
    rows, cols = 8, 512
    values = {name: rng.integers(-1, 2, size=(rows, cols), dtype=np.int8) for name in "abcdf"}
    one = np.full((rows, 2), 0.75, dtype=np.float32)
    block = {"b": _scales(rng, rows, 2), "c": _scales(rng, rows, 2), "d": _scales(rng, rows, 8)}
    tensors = {
        "a": (pack_tq2_0(values["a"], one), GGMLType.TQ2_0, (rows, cols)),
        "b": (pack_tq2_0(values["b"], block["b"]), GGMLType.TQ2_0, (rows, cols)),
        "c": (pack_tq1_0(values["c"], block["c"]), GGMLType.TQ1_0, (rows, cols)),
        "d": (pack_q2_0(values["d"], block["d"]), GGMLType.Q2_0, (rows, cols)),
        "f": (pack_i2s(values["f"], 0.5), GGMLType.I2_S, (rows, cols)),
    }
    scales = {"a": one, **block, "f": np.full((rows, 1), 0.5, dtype=np.float32)}
    return _file(tmp_path / "t.gguf", tensors), {k: (values[k], scales[k]) for k in tensors}


def test_from_gguf_every_ternary_type(
    ternary_file: tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]],
) -> None:
    path, expected = ternary_file
    with read_gguf(path) as g:
        weights = {name: TernaryWeight.from_gguf(g, name, 8, 512) for name in expected}
        assert not weights["a"].blocked and weights["a"].scale == 0.75  # one scale: I2_S path
        assert not weights["f"].blocked and np.shares_memory(weights["f"].raw, g.raw("f"))
        assert weights["d"].act_quant == ActQuant.BLOCK32  # Q2_0: Bonsai's numerics
        assert weights["b"].act_quant == ActQuant.PER_TOKEN
        for name, (values, scales) in expected.items():
            w = weights[name]
            np.testing.assert_array_equal(w.codes(), values + 1, err_msg=name)
            if w.blocked:
                np.testing.assert_array_equal(w.block_scales(), scales, err_msg=name)
        order = np.array([3, 1, 0, 2, 7, 6, 5, 4])
        for name in ("d", "f"):
            w = TernaryWeight.from_gguf(g, name, 8, 512, row_order=order)
            np.testing.assert_array_equal(w.codes(), expected[name][0][order] + 1)


def test_from_gguf_errors(
    ternary_file: tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]],
) -> None:
    path, _ = ternary_file
    with read_gguf(path) as g:
        with pytest.raises(GGUFError, match="'a' has shape"):
            TernaryWeight.from_gguf(g, "a", 512, 8)
        with pytest.raises(GGUFError, match="not a permutation"):
            TernaryWeight.from_gguf(g, "a", 8, 512, row_order=np.zeros(8, dtype=np.int64))
        with pytest.raises(GGUFError, match="'f': I2_S holds one f32 scale"):
            TernaryWeight.from_gguf(g, "f", 8, 512, act_quant=ActQuant.BLOCK32)


def _repack_cases(tmp_path: Path) -> list[tuple[Path, str, int, int]]:
    """Files of every repack path: (path, tensor, rows, cols)."""
    rng = np.random.default_rng(11)
    rows = 12

    def values(cols: int) -> np.ndarray:
        return rng.integers(-1, 2, size=(rows, cols), dtype=np.int8)

    one = np.full((rows, 3), 0.375, dtype=np.float32)
    zero_block = one.copy()
    zero_block[2, 1] = 0  # a zero scale inside a one-scale tensor: its weights are zero
    g64 = _file(
        tmp_path / "g64.gguf",
        {
            "tq2_one": (pack_tq2_0(values(768), zero_block), GGMLType.TQ2_0, (rows, 768)),
            "tq1_one": (pack_tq1_0(values(768), one), GGMLType.TQ1_0, (rows, 768)),
            "tq2_blk": (
                pack_tq2_0(values(768), _scales(rng, rows, 3)),
                GGMLType.TQ2_0,
                (rows, 768),
            ),
            "tq1_blk": (
                pack_tq1_0(values(768), _scales(rng, rows, 3)),
                GGMLType.TQ1_0,
                (rows, 768),
            ),
            "q2_64": (pack_q2_0(values(448), _scales(rng, rows, 7)), GGMLType.Q2_0, (rows, 448)),
        },
    )
    w = GGUFWriter()
    w.add_tensor(
        "q2_128",
        pack_q2_0(values(2688), _scales(rng, rows, 21), 128),
        GGMLType.Q2_0,
        (2688, rows),
        128,
    )
    w.write(tmp_path / "g128.gguf")
    names = ["tq2_one", "tq1_one", "tq2_blk", "tq1_blk", "q2_64"]
    cols = {"tq2_one": 768, "tq1_one": 768, "tq2_blk": 768, "tq1_blk": 768, "q2_64": 448}
    return [(g64, n, rows, cols[n]) for n in names] + [
        (tmp_path / "g128.gguf", "q2_128", rows, 2688)
    ]


@pytest.mark.parametrize("ordered", [False, True])
def test_native_repack_equals_numpy(tmp_path: Path, ordered: bool) -> None:
    order = np.random.default_rng(2).permutation(12) if ordered else None
    for path, name, rows, cols in _repack_cases(tmp_path):
        with read_gguf(path) as g:
            info = g.tensors[name]
            w = TernaryWeight.from_gguf(g, name, rows, cols, row_order=order)
            ref = TernaryWeight._from_raw_numpy(
                g.raw(name), info.ggml_type, rows, cols, g.q2_0_block, order, w.act_quant
            )
            assert w.blocked == ref.blocked == name.endswith(("blk", "64", "128")), name
            np.testing.assert_array_equal(w.raw, ref.raw, err_msg=name)
            assert w.scale == ref.scale and w.group == ref.group, name
            if w.blocked:
                np.testing.assert_array_equal(w.scales, ref.scales, err_msg=name)


@pytest.mark.parametrize("act", list(ActQuant))
def test_output_scale(native: NativeBackend, act: ActQuant) -> None:
    """A file's separate per-tensor scale multiplies every output, on both layouts."""
    rng = np.random.default_rng(5)
    values = rng.integers(-1, 2, size=(19, 512), dtype=np.int8)
    x = _activations(rng, 3, 512)
    blocked = TernaryWeight.from_values(values, _scales(rng, 19, 8), act)
    weights = [blocked]
    if act == ActQuant.PER_TOKEN:
        weights.append(TernaryWeight(pack_i2s(values, 0.5), 19, 512, 0.5))
    for w in weights:
        scaled = w.with_output_scale(1.75)
        got = native.bitlinear(x, scaled)
        np.testing.assert_array_equal(got, NumpyBackend().bitlinear(x, scaled))
        np.testing.assert_allclose(got, 1.75 * native.bitlinear(x, w), rtol=1e-6, atol=1e-6)
