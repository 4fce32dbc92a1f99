"""The key/value cache of one sequence: every layer in one pair of arrays over the whole
context, in memory the kernel commits page by page as positions are first written.

Positions ``0..length-1`` hold valid keys and values; everything after ``length`` is stale
and is overwritten by the next :meth:`KVCache.write`. ``k`` and ``v`` span ``max_seq``
positions from the start, but they are views of one private anonymous memory map, so a
position costs memory only once written: a cache never grows, never copies itself, and a
conversation's next turn appends to it in place. :meth:`KVCache.trim` gives the memory of
the positions past ``length`` back to the system (``madvise``), :meth:`KVCache.release` all
of it. Writing past ``max_seq`` raises :class:`ContextFullError` before anything is
modified; the caller decides what to do.

A :class:`KVMemory` shared by several caches counts the bytes they hold (the positions ever
written and not trimmed), so an engine can show (and tests can check) that finished and
cancelled sequences gave their memory back.
"""

from __future__ import annotations

import math
import mmap
import sys
from dataclasses import dataclass

import numpy as np

from bitserve.model.config import ModelConfig

KV_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
# no commit charge for the whole context up front (Linux's value; Python < 3.13 lacks it)
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)


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
    """``k``, ``v``: ``[n_layers, max_seq, n_kv_heads, head_dim]`` float32 or float16, views
    of head-major memory (``[n_layers, n_kv_heads, max_seq, head_dim]``).

    Invariants: ``0 <= length <= max_seq``; positions ``< length`` are valid in every layer;
    ``nbytes`` is the memory (pages) of positions ``< resident`` (written since the last trim, at
    least ``length``), and ``memory`` (if any) counts exactly ``nbytes`` for this cache.
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
        self.config = config
        self.layout = (config.n_layers, config.n_kv_heads, config.head_dim)
        self.max_seq = max_seq
        self.length = 0
        self.resident = 0
        self.memory = memory
        # head-major memory: one run of max_seq rows per (k/v, layer, KV head), so attention,
        # which reads one KV head's rows at a time, streams them (2B-4T decode at 1,600
        # positions: 11.1 -> 7.9 ms for 30 layers' attention, against rows 5 heads apart)
        shape = (2, config.n_layers, config.n_kv_heads, max_seq, config.head_dim)
        size = math.prod(shape) * self.dtype.itemsize
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | MAP_NORESERVE)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):  # 4 KB commits: a 2 MB page per head run is
            self._map.madvise(mmap.MADV_NOHUGEPAGE)  # 600 MB for a one-token sequence
        kv = np.frombuffer(self._map, self.dtype).reshape(shape).transpose(0, 1, 3, 2, 4)
        self.k, self.v = kv[0], kv[1]
        self._runs = 2 * config.n_layers * config.n_kv_heads  # k then v, layer, head
        self._row_bytes = config.head_dim * self.dtype.itemsize  # one position of a run

    def bytes_for(self, n: int) -> int:
        """Memory that ``n`` written positions take: the whole pages of each head run (k/v,
        layer, KV head) they touch, as the kernel commits them. Exact when every run starts
        on a page (any real model's ``max_seq``), an upper bound when runs share pages. A
        one-token 2B-4T cache is 300 pages (1.2 MB), not 77 KB."""
        page = mmap.PAGESIZE
        return self._runs * (-(-n * self._row_bytes // page) * page)

    @property
    def nbytes(self) -> int:
        """Memory held: the pages of the positions written since the last trim."""
        return self.bytes_for(self.resident)

    @property
    def free(self) -> int:
        """Positions still available."""
        return self.max_seq - self.length

    def check_room(self, n_new: int) -> None:
        """Raise :class:`ContextFullError` unless ``n_new`` more tokens fit."""
        if n_new > self.free:
            raise ContextFullError(self.length, n_new, self.max_seq)

    def _set_resident(self, n: int) -> None:
        if self.memory is not None:
            self.memory.add(self.bytes_for(n) - self.bytes_for(self.resident))
        self.resident = n

    def trim(self) -> None:
        """Give back the memory of the positions past ``length``: the whole pages of each
        head run (k/v, layer, KV head) between ``length`` and ``resident`` (a page shared
        with a valid position, or with the next run, stays)."""
        if self.resident <= self.length:
            return
        page, row = mmap.PAGESIZE, self._row_bytes
        for run in range(self._runs):
            base = run * self.max_seq * row
            start = -(-(base + self.length * row) // page) * page  # rounded up
            end = (base + self.resident * row) // page * page  # rounded down
            if end > start:
                self._map.madvise(mmap.MADV_DONTNEED, start, end - start)
        self._set_resident(self.length)

    def release(self) -> None:
        """Give all memory back at once; the cache is empty (and reusable) afterwards."""
        self.length = 0
        self.trim()

    def reserve(self, end: int) -> None:
        """Count the memory of positions up to ``end`` before they are written (by
        :meth:`write`, or by the attention kernels straight into :meth:`view`)."""
        if end > self.max_seq:
            raise ContextFullError(self.length, end - self.length, self.max_seq)
        if end > self.resident:
            self._set_resident(end)

    def write(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Store ``k``, ``v`` ``[T, n_kv_heads, head_dim]`` at positions ``start..start+T-1``
        (converted to the cache's dtype)."""
        if start < 0:
            raise ValueError(f"write at position {start}")
        end = start + k.shape[0]
        if end > self.max_seq:  # reported as this write's start and size, not the length's
            raise ContextFullError(start, k.shape[0], self.max_seq)
        self.reserve(end)
        self.k[layer, start:end] = k
        self.v[layer, start:end] = v

    def view(self, layer: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values of positions ``0..end-1`` of ``layer``: ``[end, KVH, D]`` views,
        each head's rows contiguous (the native kernels take them as they are)."""
        return self.k[layer, :end], self.v[layer, :end]

    def advance(self, n_new: int) -> None:
        """Mark ``n_new`` more positions valid (after every layer wrote them)."""
        self.check_room(n_new)
        self.length += n_new
        if self.length > self.resident:
            self._set_resident(self.length)

    def truncate(self, n: int) -> None:
        """Keep only the first ``n`` positions (``0 <= n <= length``); their memory stays
        until :meth:`trim`."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {n}")
        self.length = n

    def copy(self, n: int | None = None) -> KVCache:
        """A new cache (same ``memory`` counter and ``max_seq``) holding the first ``n``
        positions (default: all ``length``)."""
        n = self.length if n is None else n
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot copy {n} positions of a cache of {self.length}")
        other = KVCache(self.config, self.max_seq, self.dtype, self.memory)
        other.k[:, :n] = self.k[:, :n]
        other.v[:, :n] = self.v[:, :n]
        other.advance(n)
        return other

    def __repr__(self) -> str:
        n_layers, n_kv, head_dim = self.layout
        return (
            f"KVCache(length={self.length}, resident={self.resident}, max_seq={self.max_seq}, "
            f"layers={n_layers}, kv_heads={n_kv}, head_dim={head_dim}, dtype={self.dtype})"
        )
