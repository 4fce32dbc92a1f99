"""The thread pool under churn: many short tasks of different chunk counts back to back,
more threads than cores, so workers often wake late into a task that is over or already
running the next one. Every result must still be exact (no chunk lost or run twice)."""

from __future__ import annotations

import numpy as np
import pytest

from bitserve.gguf.quants import pack_i2s
from bitserve.kernels import TernaryWeight, reference
from bitserve.kernels.native import NativeBackend, available_kernels


@pytest.mark.parametrize("threads", [2, 3])
def test_back_to_back_tasks_stay_exact(threads: int) -> None:
    if not available_kernels():
        pytest.skip("native kernels not built")
    backend = NativeBackend(available_kernels()[0], threads=threads)
    rng = np.random.default_rng(threads)
    shapes = [(1, 128, 33), (5, 256, 100), (2, 384, 400), (9, 128, 7)]  # 1 to 13 chunks
    weights = []
    for t, k, n in shapes:
        ternary = rng.integers(-1, 2, size=(n, k), dtype=np.int8)
        weights.append((t, ternary, TernaryWeight(pack_i2s(ternary, 1.0), n, k, 1.0)))
    for step in range(400):
        t, ternary, w = weights[step % len(weights)]
        q = rng.integers(-128, 128, size=(t, w.n_in), dtype=np.int8)
        got = backend.ternary_int(q, w)
        np.testing.assert_array_equal(got, reference.ternary_matmul_int(q, ternary))
