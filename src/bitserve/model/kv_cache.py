"""The key/value cache of one sequence: every layer in one pair of arrays that grow on demand.

Positions ``0..length-1`` hold valid keys and values; everything after ``length`` is stale
and is overwritten by the next :meth:`KVCache.write`. Storage starts small and doubles
(capped at ``max_seq``) when a write needs more room, so a sequence pays only for the
positions it uses instead of the whole context. Writing past ``max_seq`` raises
:class:`ContextFullError` before anything is modified; the caller decides what to do.

A :class:`KVMemory` shared by several caches counts the bytes they hold, so an engine can
show (and tests can check) that finished and cancelled sequences gave their memory back:
:meth:`KVCache.release` returns a cache's bytes at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bitserve.model.config import ModelConfig

MIN_CAPACITY = 16  # positions allocated by the first write
KV_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


class ContextFullError(ValueError):
    """A forward pass would put more tokens in a cache than its ``max_seq``."""

    def __init__(self, length: int, n_new: int, max_seq: int) -> None:
        super().__init__(
            f"context full: {length} cached + {n_new} new tokens exceed max_seq {max_seq}"
        )
        self.length = length
        self.n_new = n_new
        self.max_seq = max_seq


@dataclass(slots=True)
class KVMemory:
    """Bytes held by the caches that share this counter (``allocated_bytes``) and the most
    ever held at once (``peak_bytes``). Only the thread that owns the caches writes it."""

    allocated_bytes: int = 0
    peak_bytes: int = 0

    def add(self, n_bytes: int) -> None:
        self.allocated_bytes += n_bytes
        self.peak_bytes = max(self.peak_bytes, self.allocated_bytes)


class KVCache:
    """``k``, ``v``: ``[n_layers, capacity, n_kv_heads, head_dim]`` float32 or float16.

    Invariants: ``0 <= length <= capacity <= max_seq``; positions ``< length`` are valid in
    every layer; ``memory`` (if any) counts exactly ``nbytes`` for this cache until
    :meth:`release`. ``capacity`` grows by doubling; it never shrinks except by
    :meth:`shrink_to_fit` and :meth:`release`.
    """

    def __init__(
        self,
        config: ModelConfig,
        max_seq: int | None = None,
        dtype: np.dtype | type = np.float32,
        memory: KVMemory | None = None,
    ) -> None:
        max_seq = config.context_length if max_seq is None else max_seq
        if max_seq <= 0:
            raise ValueError(f"max_seq must be positive, got {max_seq}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in KV_DTYPES:
            raise ValueError(f"KV cache dtype must be float32 or float16, got {self.dtype}")
        self.layout = (config.n_layers, config.n_kv_heads, config.head_dim)
        self.max_seq = max_seq
        self.length = 0
        self.memory = memory
        self.k, self.v = self._allocate(0)

    def _allocate(self, capacity: int) -> tuple[np.ndarray, np.ndarray]:
        n_layers, n_kv, head_dim = self.layout
        shape = (n_layers, capacity, n_kv, head_dim)
        return np.empty(shape, self.dtype), np.empty(shape, self.dtype)

    @property
    def capacity(self) -> int:
        """Positions allocated now (``<= max_seq``)."""
        return int(self.k.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes held by ``k`` and ``v``."""
        return int(self.k.nbytes + self.v.nbytes)

    @property
    def free(self) -> int:
        """Positions still available."""
        return self.max_seq - self.length

    def check_room(self, n_new: int) -> None:
        """Raise :class:`ContextFullError` unless ``n_new`` more tokens fit."""
        if n_new > self.free:
            raise ContextFullError(self.length, n_new, self.max_seq)

    def reserve(self, n_positions: int) -> None:
        """Make room for positions ``0..n_positions-1`` (``<= max_seq``), doubling the
        capacity as needed; the valid positions are kept."""
        if n_positions > self.max_seq:
            raise ContextFullError(self.length, n_positions - self.length, self.max_seq)
        if n_positions <= self.capacity:
            return
        grown = max(n_positions, 2 * self.capacity, MIN_CAPACITY)
        self._resize(min(grown, self.max_seq))

    def _resize(self, capacity: int) -> None:
        old_bytes, keep = self.nbytes, min(self.capacity, capacity)
        k, v = self._allocate(capacity)
        k[:, :keep] = self.k[:, :keep]
        v[:, :keep] = self.v[:, :keep]
        self.k, self.v = k, v
        if self.memory is not None:
            self.memory.add(self.nbytes - old_bytes)

    def shrink_to_fit(self) -> None:
        """Drop the unused capacity beyond ``length`` (one copy of the valid positions)."""
        if self.capacity > self.length:
            self._resize(self.length)

    def set_slack(self, slack: int) -> None:
        """Make the capacity ``length + slack`` (at most ``max_seq``), growing or shrinking
        with one copy of the valid positions; nothing happens if it already is."""
        target = min(self.length + slack, self.max_seq)
        if self.capacity != target:
            self._resize(target)

    def release(self) -> None:
        """Give all memory back at once; the cache is empty (and reusable) afterwards."""
        if self.memory is not None:
            self.memory.add(-self.nbytes)
        self.k, self.v = self._allocate(0)
        self.length = 0

    def write(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Store ``k``, ``v`` ``[T, n_kv_heads, head_dim]`` at positions ``start..start+T-1``
        (converted to the cache's dtype), growing the storage if needed."""
        end = start + k.shape[0]
        if start < 0 or end > self.max_seq:
            raise ContextFullError(start, k.shape[0], self.max_seq)
        self.reserve(end)
        self.k[layer, start:end] = k
        self.v[layer, start:end] = v

    def view(self, layer: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values of positions ``0..end-1`` of ``layer``: contiguous
        ``[end, KVH, D]`` views."""
        return self.k[layer, :end], self.v[layer, :end]

    def advance(self, n_new: int) -> None:
        """Mark ``n_new`` more positions valid (after every layer wrote them)."""
        self.check_room(n_new)
        self.reserve(self.length + n_new)
        self.length += n_new

    def truncate(self, n: int) -> None:
        """Keep only the first ``n`` positions (``0 <= n <= length``)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {n}")
        self.length = n

    def copy(self, n: int | None = None) -> KVCache:
        """A new cache (same ``memory`` counter) holding the first ``n`` positions
        (default: all ``length``), sized exactly to them."""
        n = self.length if n is None else n
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot copy {n} positions of a cache of {self.length}")
        other = KVCache.__new__(KVCache)
        other.dtype, other.layout, other.max_seq = self.dtype, self.layout, self.max_seq
        other.memory, other.length = self.memory, 0
        other.k, other.v = self._allocate(0)
        other._resize(n)
        other.k[:, :n] = self.k[:, :n]
        other.v[:, :n] = self.v[:, :n]
        other.length = n
        return other

    def __repr__(self) -> str:
        n_layers, n_kv, head_dim = self.layout
        return (
            f"KVCache(length={self.length}, capacity={self.capacity}, max_seq={self.max_seq}, "
            f"layers={n_layers}, kv_heads={n_kv}, head_dim={head_dim}, dtype={self.dtype})"
        )
