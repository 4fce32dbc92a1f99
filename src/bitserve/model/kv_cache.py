"""The key/value cache of one sequence: float32, every layer in one pair of arrays.

Positions ``0..length-1`` hold valid keys and values; everything after ``length`` is stale
and is overwritten by the next :meth:`KVCache.write`. Writing past ``max_seq`` raises
:class:`ContextFullError` before anything is modified; the caller decides what to do.
"""

from __future__ import annotations

import numpy as np

from bitserve.model.config import ModelConfig


class ContextFullError(ValueError):
    """A forward pass would put more tokens in a cache than its ``max_seq``."""

    def __init__(self, length: int, n_new: int, max_seq: int) -> None:
        super().__init__(
            f"context full: {length} cached + {n_new} new tokens exceed max_seq {max_seq}"
        )
        self.length = length
        self.n_new = n_new
        self.max_seq = max_seq


class KVCache:
    """``k``, ``v``: float32 ``[n_layers, max_seq, n_kv_heads, head_dim]``.

    Invariant: ``0 <= length <= max_seq``; positions ``< length`` are valid in every layer.
    The arrays come from ``np.zeros`` (lazily committed pages), so a long ``max_seq`` costs
    memory only for the positions actually written.
    """

    def __init__(self, config: ModelConfig, max_seq: int | None = None) -> None:
        max_seq = config.context_length if max_seq is None else max_seq
        if max_seq <= 0:
            raise ValueError(f"max_seq must be positive, got {max_seq}")
        shape = (config.n_layers, max_seq, config.n_kv_heads, config.head_dim)
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)
        self.max_seq = max_seq
        self.length = 0

    @property
    def free(self) -> int:
        """Positions still available."""
        return self.max_seq - self.length

    def check_room(self, n_new: int) -> None:
        """Raise :class:`ContextFullError` unless ``n_new`` more tokens fit."""
        if n_new > self.free:
            raise ContextFullError(self.length, n_new, self.max_seq)

    def write(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Store ``k``, ``v`` ``[T, n_kv_heads, head_dim]`` at positions ``start..start+T-1``."""
        end = start + k.shape[0]
        if start < 0 or end > self.max_seq:
            raise ContextFullError(start, k.shape[0], self.max_seq)
        self.k[layer, start:end] = k
        self.v[layer, start:end] = v

    def view(self, layer: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values of positions ``0..end-1`` of ``layer``: ``[end, KVH, D]`` views."""
        return self.k[layer, :end], self.v[layer, :end]

    def advance(self, n_new: int) -> None:
        """Mark ``n_new`` more positions valid (after every layer wrote them)."""
        self.check_room(n_new)
        self.length += n_new

    def truncate(self, n: int) -> None:
        """Keep only the first ``n`` positions (``0 <= n <= length``)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {n}")
        self.length = n

    def __repr__(self) -> str:
        n_layers, _, n_kv, head_dim = self.k.shape
        return (
            f"KVCache(length={self.length}, max_seq={self.max_seq}, layers={n_layers}, "
            f"kv_heads={n_kv}, head_dim={head_dim})"
        )
