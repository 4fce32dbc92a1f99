"""RMSNorm and the squared-ReLU gate in C against the numpy oracle (and the model's own
functions), batch invariant."""

from __future__ import annotations

import numpy as np
import pytest

from bitserve.kernels import NumpyBackend, reference
from bitserve.kernels.native import NativeBackend, available_kernels
from bitserve.model.bitnet import relu_squared


@pytest.mark.parametrize(("t", "n"), [(1, 2560), (5, 6912), (9, 130), (3, 7)])
def test_rmsnorm_matches_oracle(native: NativeBackend, t: int, n: int) -> None:
    rng = np.random.default_rng(t * n)
    x = rng.standard_normal((t, n), dtype=np.float32) * np.float32(rng.uniform(0.01, 30))
    w = rng.standard_normal(n, dtype=np.float32)
    got = native.rmsnorm(x, w, 1e-5)
    want = reference.rmsnorm(x, w, 1e-5)
    assert got.dtype == np.float32 and got.shape == (t, n)
    # only the float64 summation order differs: at most a last-bit difference, rarely
    np.testing.assert_allclose(got, want, rtol=2e-7, atol=0)
    assert (got == want).mean() > 0.99


def test_rmsnorm_of_zeros_and_3d(native: NativeBackend) -> None:
    x = np.zeros((2, 3, 64), np.float32)
    x[1, 2] = np.arange(64, dtype=np.float32)
    w = np.full(64, 2.0, np.float32)
    got = native.rmsnorm(x, w, 1e-6)
    assert got.shape == x.shape
    np.testing.assert_allclose(got, reference.rmsnorm(x, w, 1e-6), rtol=2e-7, atol=0)
    assert not got[0].any()  # zero rows stay zero: eps keeps the root positive


@pytest.mark.parametrize(("t", "n"), [(1, 6912), (7, 640), (2, 5)])
def test_relu2_mul_is_bit_exact(native: NativeBackend, t: int, n: int) -> None:
    rng = np.random.default_rng(t + n)
    gate = rng.standard_normal((t, n), dtype=np.float32) * np.float32(4)
    up = rng.standard_normal((t, n), dtype=np.float32)
    gate[0, :3] = [0.0, -0.0, np.nan]  # signed zeros; NaN propagates like np.maximum
    got = native.relu2_mul(gate, up)
    np.testing.assert_array_equal(got, reference.relu2_mul(gate, up))
    np.testing.assert_array_equal(got, relu_squared(gate) * up)
    np.testing.assert_array_equal(got, NumpyBackend().relu2_mul(gate, up))


def test_row_glue_is_batch_invariant(native: NativeBackend) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((11, 2560), dtype=np.float32)
    up = rng.standard_normal((11, 2560), dtype=np.float32)
    w = rng.standard_normal(2560, dtype=np.float32)
    norm, gated = native.rmsnorm(x, w, 1e-5), native.relu2_mul(x, up)
    for i in range(11):
        np.testing.assert_array_equal(norm[i], native.rmsnorm(x[i : i + 1], w, 1e-5)[0])
        np.testing.assert_array_equal(gated[i], native.relu2_mul(x[i : i + 1], up[i : i + 1])[0])


def test_shape_errors(native: NativeBackend) -> None:
    with pytest.raises(ValueError, match="weight"):
        native.rmsnorm(np.zeros((2, 8), np.float32), np.ones(7, np.float32), 1e-5)
    with pytest.raises(ValueError):
        native.relu2_mul(np.zeros((2, 8), np.float32), np.zeros((2, 9), np.float32))


@pytest.mark.parametrize(("t", "n"), [(1, 2560), (4, 6912), (3, 7), (2, 130)])
def test_rmsnorm_simd_equals_scalar_bit_for_bit(t: int, n: int) -> None:
    """The AVX2 RMSNorm (4 float64 lanes) sums and divides in the scalar path's order."""
    if "avx2" not in available_kernels():
        pytest.skip("needs the AVX2 path")
    rng = np.random.default_rng(n + t)
    x = rng.standard_normal((t, n), dtype=np.float32) * np.float32(rng.uniform(0.01, 30))
    w = rng.standard_normal(n, dtype=np.float32)
    want = NativeBackend("scalar", threads=1).rmsnorm(x, w, 1e-5)
    for kernel in available_kernels():
        got = NativeBackend(kernel, threads=2).rmsnorm(x, w, 1e-5)
        np.testing.assert_array_equal(got, want, err_msg=kernel)


@pytest.mark.parametrize(("t", "n"), [(1, 12288), (7, 640), (2, 5), (3, 13)])
def test_silu_mul_matches_oracle(native: NativeBackend, t: int, n: int) -> None:
    """SwiGLU: within a few ulp of the numpy oracle and of float64, extreme gates included
    (where exp overflows, the kernel clamps it: a result below 1e-35 instead of 0)."""
    rng = np.random.default_rng(t * n)
    gate = rng.standard_normal((t, n), dtype=np.float32) * np.float32(6)
    up = rng.standard_normal((t, n), dtype=np.float32)
    gate[0, :4] = [0.0, -200.0, 200.0, -87.0]  # exp over/underflow territory
    got = native.silu_mul(gate, up)
    want = reference.silu_mul(gate, up)
    np.testing.assert_allclose(got, want, rtol=6e-7, atol=1e-35)
    with np.errstate(over="ignore"):
        exact = gate.astype(np.float64) / (1 + np.exp(-gate.astype(np.float64))) * up
    np.testing.assert_allclose(got, exact, rtol=6e-7, atol=1e-35)
    nan = native.silu_mul(np.full((1, 3), np.nan, np.float32), np.ones((1, 3), np.float32))
    assert np.isnan(nan).all()


def test_silu_mul_is_batch_invariant_and_the_same_on_every_path() -> None:
    rng = np.random.default_rng(3)
    gate = rng.standard_normal((9, 1003), dtype=np.float32) * np.float32(5)  # ragged rows
    up = rng.standard_normal((9, 1003), dtype=np.float32)
    want = NativeBackend("scalar", threads=1).silu_mul(gate, up)
    for kernel in available_kernels():
        backend = NativeBackend(kernel, threads=2)
        np.testing.assert_array_equal(backend.silu_mul(gate, up), want, err_msg=kernel)
        for i in range(9):
            row = backend.silu_mul(gate[i : i + 1], up[i : i + 1])[0]
            np.testing.assert_array_equal(row, want[i], err_msg=kernel)
