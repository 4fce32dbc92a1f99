"""Fixtures for the kernel tests: every native path and thread count, skipped when not built."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bitserve.kernels.native import NativeBackend, available_kernels

PATHS = [(kernel, threads) for kernel in ("scalar", "avx2", "avx512") for threads in (1, 2)]


@pytest.fixture(params=PATHS, ids=[f"{k}-{t}t" for k, t in PATHS])
def native(request: pytest.FixtureRequest) -> Iterator[NativeBackend]:
    kernel, threads = request.param
    if kernel not in available_kernels():
        pytest.skip(f"native kernel {kernel!r} is not available here")
    yield NativeBackend(kernel, threads=threads)
