"""Activation quantization and the ternary matmul: bit for bit equal to the numpy oracle."""

from __future__ import annotations

import numpy as np
import pytest

from bitserve.gguf.quants import pack_i2s
from bitserve.kernels import NumpyBackend, TernaryWeight, reference
from bitserve.kernels.native import NativeBackend

# (T, K, N): K multiples of 128, most an odd number of blocks (the AVX-512 path pairs
# blocks), N not a multiple of the 32-row chunk, of the 4-row tile or of the thread split, T
# around and across the 4-token and 8-token tiles; one token with rows longer than 64 blocks
# (AVX2 decode takes those in K segments, 32 rows at a time)
SHAPES = [
    (2, 256, 6),
    (4, 2560, 45),
    (5, 512, 130),
    (6, 6912, 7),
    (1, 128, 1),
    (1, 384, 37),
    (1, 2432, 70),
    (3, 640, 33),
    (8, 1152, 64),
    (9, 896, 65),
    (17, 1920, 31),
    (30, 3456, 97),
    (1, 8320, 70),
    (1, 12416, 97),
]


def _weight(rng: np.random.Generator, n_out: int, n_in: int) -> tuple[np.ndarray, TernaryWeight]:
    ternary = rng.integers(-1, 2, size=(n_out, n_in), dtype=np.int8)
    scale = float(np.float32(rng.uniform(0.1, 3.0)))
    return ternary, TernaryWeight(pack_i2s(ternary, scale), n_out, n_in, scale)


def _activations(rng: np.random.Generator, t: int, k: int) -> np.ndarray:
    x = rng.standard_normal((t, k), dtype=np.float32) * np.float32(rng.uniform(0.01, 10))
    x[0, rng.integers(k)] *= 40  # an outlier, as real activations have
    # exact .5 multiples of the step hit the round-half-even rule
    x[-1, :8] = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.0, 3.5], dtype=np.float32) / 127
    return x


@pytest.mark.parametrize(("t", "k", "n"), SHAPES)
def test_quantize_equals_oracle(native: NativeBackend, t: int, k: int, n: int) -> None:
    x = _activations(np.random.default_rng(k + t), t, k)
    q, scale, total = native.quantize(x)
    q_ref, s_ref = reference.quantize_activations(x)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(scale, s_ref)
    np.testing.assert_array_equal(total, q_ref.astype(np.int32).sum(axis=1))


def test_quantize_odd_width_and_zero_row(native: NativeBackend) -> None:
    x = np.random.default_rng(5).standard_normal((3, 45), dtype=np.float32)  # scalar tail
    x[1] = 0.0  # absmax clamps to 1e-5: scale 127e5, all zeros
    q, scale, _ = native.quantize(x)
    q_ref, s_ref = reference.quantize_activations(x)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(scale, s_ref)


@pytest.mark.parametrize(("t", "k", "n"), SHAPES)
def test_ternary_int_equals_oracle(native: NativeBackend, t: int, k: int, n: int) -> None:
    rng = np.random.default_rng(1000 * t + n)
    ternary, w = _weight(rng, n, k)
    q = rng.integers(-128, 128, size=(t, k), dtype=np.int8)  # extremes included
    q[0, :] = -128
    np.testing.assert_array_equal(
        native.ternary_int(q, w), reference.ternary_matmul_int(q, ternary)
    )


@pytest.mark.parametrize(("t", "k", "n"), SHAPES)
def test_bitlinear_bit_exact(native: NativeBackend, t: int, k: int, n: int) -> None:
    rng = np.random.default_rng(7 * t + k + n)
    ternary, w = _weight(rng, n, k)
    x = _activations(rng, t, k)
    y = native.bitlinear(x, w)
    assert y.dtype == np.float32 and y.shape == (t, n)
    np.testing.assert_array_equal(y, reference.bitlinear(x, ternary, w.scale))
    np.testing.assert_array_equal(y, NumpyBackend().bitlinear(x, w))


def test_bitlinear_reads_only_the_codes(native: NativeBackend) -> None:
    """The 28 bytes after the scale are undefined: garbage there changes nothing."""
    rng = np.random.default_rng(3)
    ternary, w = _weight(rng, 40, 256)
    raw = w.raw.copy()
    raw[-28:] = 0xFF
    x = _activations(rng, 2, 256)
    y = native.bitlinear(x, TernaryWeight(raw, 40, 256, w.scale))
    np.testing.assert_array_equal(y, reference.bitlinear(x, ternary, w.scale))


def test_bitlinear_from_a_read_only_view(native: NativeBackend) -> None:
    rng = np.random.default_rng(4)
    ternary, w = _weight(rng, 8, 128)
    raw = np.frombuffer(w.raw.tobytes(), dtype=np.uint8)  # read-only, like the mmap
    x = _activations(rng, 1, 128)
    y = native.bitlinear(x, TernaryWeight(raw, 8, 128, w.scale))
    np.testing.assert_array_equal(y, reference.bitlinear(x, ternary, w.scale))


def test_bad_arguments_raise_before_the_kernel(native: NativeBackend) -> None:
    rng = np.random.default_rng(6)
    _, w = _weight(rng, 8, 256)
    with pytest.raises(ValueError, match="bytes"):
        native.bitlinear(np.zeros((1, 256), np.float32), TernaryWeight(w.raw[:100], 8, 256, 1.0))
    with pytest.raises(ValueError, match="multiple of 128"):
        native.bitlinear(np.zeros((1, 200), np.float32), TernaryWeight(w.raw, 8, 200, 1.0))
    with pytest.raises(TypeError, match="dtype"):
        native.ternary_int(
            np.zeros((1, 256), np.int8), TernaryWeight(w.raw.view(np.float32), 8, 256, 1.0)
        )
