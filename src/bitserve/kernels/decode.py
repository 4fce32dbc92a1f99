"""A model's blocks as one table for the native decode step (``csrc/decode.c``).

Generating for one sequence runs every block on one token; through Python that is ~17
kernel calls per block, whose wrappers cost about a millisecond of a 20-27 ms 2B-4T token
while memory idles. :class:`DecodePlan` lays the blocks out once, at load, as a table of
addresses the C step walks (:meth:`NativeBackend.decode_token`), running the same kernels in
the same order: the same bits as the Python forward.

The table holds raw addresses, so the plan keeps every array it points into alive and checks
each one (dtype, contiguity, shape), and the shape's sizes against each other, here, where a
mistake is a ``ValueError``, not a crash: ``Pool.decode_token`` trusts a table it is given
and is private to :meth:`NativeBackend.decode_token`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bitserve.kernels.tensors import ActQuant, TernaryWeight

NORMS = 6  # attn_norm, attn_sub_norm, ffn_norm, ffn_sub_norm, q_norm, k_norm (module_decode.c)
WEIGHT_SLOTS = 5  # codes, scales (0: I2_S), n_out, gps | block32 << 8, scale's float32 bits
PROJECTIONS = 7  # q, k, v, o, gate, up, down
SLOTS = NORMS + PROJECTIONS * WEIGHT_SLOTS


@dataclass(frozen=True, slots=True)
class DecodeShape:
    """The sizes every block shares, and the family's choices the step needs."""

    n_layers: int
    dim: int
    q_dim: int
    kv_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    eps: float
    residual_scale: float = 1.0
    silu: bool = False  # SwiGLU, else squared ReLU

    def __post_init__(self) -> None:
        """The C step sizes its buffers from these: an inconsistent shape must fail here."""
        sizes = (self.n_layers, self.dim, self.n_heads, self.n_kv_heads, self.head_dim)
        if min(sizes) < 1 or self.ffn_dim < 1 or self.head_dim % 2:
            raise ValueError(f"decode shape {self}: sizes must be positive, head_dim even")
        if (
            self.q_dim != self.n_heads * self.head_dim
            or self.kv_dim != self.n_kv_heads * self.head_dim
        ):
            raise ValueError(f"decode shape {self}: q_dim/kv_dim must be heads times head_dim")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"decode shape {self}: n_heads must be a multiple of n_kv_heads")

    def fields(self) -> np.ndarray:
        """The integers of ``module_decode.c``'s shape array, in its order."""
        values = (self.n_layers, self.dim, self.q_dim, self.kv_dim, self.n_heads,
                  self.n_kv_heads, self.head_dim, self.ffn_dim, int(self.silu))  # fmt: skip
        return np.array(values, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class DecodeLayer:
    """One block: ``norms`` (:data:`NORMS` float arrays or ``None`` where the family has
    none) and ``projections`` (q, k, v, o, gate, up, down)."""

    norms: tuple[np.ndarray | None, ...]
    projections: tuple[TernaryWeight, ...]


class DecodePlan:
    """The table of ``layers`` for ``shape`` (see the module docstring)."""

    def __init__(self, layers: Sequence[DecodeLayer], shape: DecodeShape) -> None:
        if len(layers) != shape.n_layers:
            raise ValueError(f"{len(layers)} layers for a shape of {shape.n_layers}")
        self.shape = shape
        self.shape_fields = shape.fields()
        self._keep: list[np.ndarray] = []  # every array the table points into
        self.table = np.zeros((shape.n_layers, SLOTS), dtype=np.int64)
        widths = (shape.dim, shape.q_dim, shape.dim, shape.ffn_dim, shape.head_dim, shape.head_dim)
        n_in = (shape.dim,) * 3 + (shape.q_dim, shape.dim, shape.dim, shape.ffn_dim)
        n_out = (shape.q_dim, shape.kv_dim, shape.kv_dim, shape.dim, shape.ffn_dim, shape.ffn_dim,
                 shape.dim)  # fmt: skip
        for row, layer in zip(self.table, layers, strict=True):
            if len(layer.norms) != NORMS or len(layer.projections) != PROJECTIONS:
                raise ValueError(f"a layer needs {NORMS} norms and {PROJECTIONS} projections")
            if layer.norms[0] is None or layer.norms[2] is None:
                raise ValueError("a layer needs its attn_norm and ffn_norm")
            for i, (norm, width) in enumerate(zip(layer.norms, widths, strict=True)):
                if norm is not None:
                    row[i] = self._address(np.asarray(norm), np.float32, (width,))
            for j, w in enumerate(layer.projections):
                if (w.n_in, w.n_out) != (n_in[j], n_out[j]):
                    raise ValueError(f"projection {j} is [{w.n_out}, {w.n_in}], expected "
                                     f"[{n_out[j]}, {n_in[j]}]")  # fmt: skip
                row[NORMS + WEIGHT_SLOTS * j : NORMS + WEIGHT_SLOTS * (j + 1)] = self._weight(w)

    def _address(self, a: np.ndarray, dtype: type, shape: tuple[int, ...] | None) -> int:
        if a.dtype != dtype or not a.flags.c_contiguous or (shape and a.shape != shape):
            want = f"C-contiguous {np.dtype(dtype)} {shape or ''}"
            raise ValueError(f"a {a.dtype} array {a.shape} where a {want} is needed")
        if not a.flags.aligned:  # bytes at an odd offset (a file's small alignment): C reads items
            a = a.copy()
        self._keep.append(a)
        return int(a.ctypes.data)

    def _weight(self, w: TernaryWeight) -> list[int]:
        scale_bits = int(np.float32(w.scale).view(np.uint32))
        if not w.blocked:
            if w.raw.nbytes < w.n_out * w.n_in // 4 or w.n_in % 128:
                raise ValueError(f"I2_S weight [{w.n_out}, {w.n_in}]: {w.raw.nbytes} bytes")
            return [self._address(w.raw, np.uint8, None), 0, w.n_out, int(w.tiled), scale_bits]
        assert w.scales is not None
        gps, block32 = 256 // w.group, int(w.act_quant == ActQuant.BLOCK32)
        if block32 and w.n_in % 32:
            raise ValueError(f"BLOCK32 weight [{w.n_out}, {w.n_in}]: n_in not a multiple of 32")
        codes = self._address(w.raw, np.uint8, (w.n_out, 64 * w.n_super))
        scales = self._address(w.scales.view(np.float16), np.float16, (w.n_out, gps * w.n_super))
        return [codes, scales, w.n_out, gps | block32 << 8, scale_bits]
