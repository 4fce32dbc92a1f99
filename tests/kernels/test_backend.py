"""Backend selection: names, $BITSERVE_KERNEL, threads, and the memory-read probe."""

from __future__ import annotations

import numpy as np
import pytest

from bitserve.kernels import NativeBackend, NumpyBackend, available_kernels, get_backend
from bitserve.kernels.native import _count_cpus, default_threads


def test_default_is_the_best_native_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BITSERVE_KERNEL", raising=False)
    backend = get_backend()
    if available_kernels():
        assert isinstance(backend, NativeBackend) and backend.name == available_kernels()[0]
    else:
        assert isinstance(backend, NumpyBackend)


@pytest.mark.parametrize("name", ["numpy", "scalar", "avx2", "avx512"])
def test_env_forces_a_path(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    if name != "numpy" and name not in available_kernels():
        pytest.skip(f"{name} not available")
    monkeypatch.setenv("BITSERVE_KERNEL", name)
    assert get_backend().name == name
    assert get_backend("numpy").name == "numpy"  # an explicit name wins


def test_unknown_kernel_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITSERVE_KERNEL", "cuda")
    with pytest.raises(ValueError, match="cuda"):
        get_backend()


def test_threads_and_head_options() -> None:
    if not available_kernels():
        pytest.skip("native kernels not built")
    backend = get_backend("scalar", threads=3, head="int8")
    assert isinstance(backend, NativeBackend)
    assert backend.threads == 3 and backend.head_mode == "int8"
    with pytest.raises(ValueError, match="head"):
        NativeBackend("scalar", head="int4")
    assert default_threads() >= 1


def test_cpu_list_parsing() -> None:
    assert _count_cpus("0") == 1
    assert _count_cpus("0,4\n") == 2
    assert _count_cpus("0-3,8") == 5


def test_read_memory_touches_every_line() -> None:
    if not available_kernels():
        pytest.skip("native kernels not built")
    backend = get_backend(available_kernels()[0], threads=2)
    assert isinstance(backend, NativeBackend)
    buf = np.zeros(3 << 20, dtype=np.uint8)
    base = backend.read_memory(buf)
    buf[(2 << 20) + 64] = 1  # a change in the last chunk must change the checksum
    assert backend.read_memory(buf) != base


def test_the_normal_install_built_the_native_extension() -> None:
    """`pip install -e .` compiles the C kernels; the skips above are for other builds, so
    the suite must not silently skip every native test because the extension is missing."""
    from bitserve.kernels import native

    assert native.available_kernels(), "bitserve.kernels._native did not build or import"
    assert "scalar" in native.available_kernels()  # the portable path always exists
