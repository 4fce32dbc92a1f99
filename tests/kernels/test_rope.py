"""NEOX RoPE in C: bit for bit the numpy oracle (separate products, no FMA)."""

from __future__ import annotations

import numpy as np
import pytest

from bitserve.kernels import NumpyBackend, reference
from bitserve.kernels.native import NativeBackend
from bitserve.model.bitnet import rope_tables


@pytest.mark.parametrize(
    ("t", "h", "d", "start"), [(1, 20, 128, 4000), (7, 4, 16, 0), (33, 5, 64, 9)]
)
def test_rope_equals_the_oracle(native: NativeBackend, t: int, h: int, d: int, start: int) -> None:
    rng = np.random.default_rng(t * h + d)
    x = rng.standard_normal((t, h, d), dtype=np.float32) * np.float32(rng.uniform(0.1, 50))
    cos, sin = rope_tables(start + t, d, 500000.0)
    got = native.rope(x, cos[start:], sin[start:])
    want = reference.rope_neox(x, cos[start:], sin[start:])
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(NumpyBackend().rope(x, cos[start:], sin[start:]), want)


def test_rope_checks_shapes(native: NativeBackend) -> None:
    x = np.zeros((2, 3, 8), np.float32)
    with pytest.raises(ValueError):
        native.rope(x, np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="even"):
        native.rope(
            np.zeros((2, 3, 7), np.float32),
            np.zeros((2, 3), np.float32),
            np.zeros((2, 3), np.float32),
        )
