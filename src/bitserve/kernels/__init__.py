"""Kernels of the forward pass: the numpy oracle and (when built) the native C paths.

``get_backend()`` picks the fastest available path; ``BITSERVE_KERNEL=numpy|scalar|avx2``
forces one.
"""

from __future__ import annotations

import os

from bitserve.kernels.backend import Backend, NumpyBackend, TernaryWeight

__all__ = ["Backend", "NumpyBackend", "TernaryWeight", "get_backend"]


def get_backend(name: str | None = None, threads: int | None = None) -> Backend:
    """The backend ``name`` (or ``$BITSERVE_KERNEL``, or the best available)."""
    name = name or os.environ.get("BITSERVE_KERNEL") or "numpy"
    if name == "numpy":
        return NumpyBackend()
    raise ValueError(f"unknown kernel {name!r}; available: numpy")
