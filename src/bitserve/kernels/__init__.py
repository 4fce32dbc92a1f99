"""Kernels of the forward pass: the numpy oracle and the native C paths.

``get_backend()`` picks the fastest available path (AVX-512 VNNI, else AVX2 when the CPU
has it, else the portable scalar C, else numpy when the extension is not built);
``BITSERVE_KERNEL=numpy|scalar|avx2|avx512`` forces one, and so does the ``name`` argument.
"""

from __future__ import annotations

import os

from bitserve.kernels.backend import Backend, NumpyBackend
from bitserve.kernels.native import NativeBackend, available_kernels
from bitserve.kernels.tensors import ActQuant, EmbeddingMatrix, TernaryWeight

__all__ = [
    "ActQuant",
    "Backend",
    "EmbeddingMatrix",
    "NativeBackend",
    "NumpyBackend",
    "TernaryWeight",
    "available_kernels",
    "get_backend",
]


def get_backend(name: str | None = None, threads: int | None = None, head: str = "f16") -> Backend:
    """The backend ``name`` (or ``$BITSERVE_KERNEL``, or the best available).

    ``threads``: kernel threads (default: physical cores); ``head``: ``"f16"`` (exact) or
    ``"int8"`` (half the head's memory traffic, slightly different logits). Both are
    ignored by the numpy backend.
    """
    name = name or os.environ.get("BITSERVE_KERNEL") or None
    native = available_kernels()
    if name is None:
        name = native[0] if native else "numpy"
    if name == "numpy":
        return NumpyBackend()
    if name in native:
        return NativeBackend(name, threads=threads, head=head)
    raise ValueError(
        f"unknown or unavailable kernel {name!r}; available: {', '.join([*native, 'numpy'])}"
    )
