"""The weights a decode step streams, copied out of the file's memory map into one private
mapping backed by huge pages, in the order the forward reads them.

Generation reads every ternary code and the whole head once per token, so it runs at the
speed memory streams them in. From the file's map they stream from 4 KB page-cache pages:
one TLB miss every 4 KB (where the hardware prefetchers also stop), 210 separate regions
for 2B-4T. One anonymous mapping with ``MADV_HUGEPAGE`` holds them in 2 MB pages, one
after the other in forward order. Measured on 2B-4T (2 threads, interleaved A/B in one
process): a decode step 3-5% faster; Falcon's and Bonsai's block-scaled weights are
repacked copies in numpy arrays already, which numpy itself puts on huge pages.

The bytes are read with ``pread`` straight into the arena, so the file's pages are never
mapped into the process (its resident size is the arena, not the arena and the map), by
several threads: most of a load is the first touch of the arena's fresh pages (2B-4T on
the project's VM, 8 loads each in ABBA order: 0.30-1.92 s from one thread, 0.22-0.62 s from
two; 0.14 s from the map).
The price: the copy is private, so processes serving the same file no longer share it
through the page cache; ``--mmap`` keeps the map for that case.

A float head is copied in the tiled layout when the backend's head kernel reads it
(``Backend.tiles_heads``, ``kernels.tensors.tile_rows``): the kernel reads 4 rows at once,
and from one linear stream of their lines it runs faster than from 4 interleaved rows
when memory is fast (the project's VM, 2 threads, interleaved A/B by bandwidth phase: at
75-76 GB/s 2B-4T's F16 head 8% and Falcon3-7B's 2.3% faster, at 46-49 GB/s 0.5-0.7%).
So are I2_S codes on AVX-512 (``Backend.tiles_ternary``; a decode step 0.9-1.4% faster
at 41-67 GB/s, docs/families.md "Speed").
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import mmap
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from bitserve.gguf.reader import GGUFFile
from bitserve.kernels import EmbeddingMatrix, TernaryWeight
from bitserve.kernels.tensors import FLOAT_KINDS, TILE_ROWS, can_tile, tile_rows
from bitserve.model.arch import PROJECTIONS
from bitserve.model.weights import LayerWeights, ModelWeights

HUGE_PAGE = 2 << 20
ALIGNMENT = 64  # each array starts on a cache line
READ_PIECE = 16 << 20  # pread in pieces (Linux reads at most ~2 GB per call)
READ_THREADS = min(4, os.cpu_count() or 1)  # first touches of fresh pages, in parallel


class Arena:
    """``nbytes`` of anonymous memory, 2 MB aligned, with huge pages asked for; :meth:`take`
    hands out consecutive cache-line-aligned pieces. The pieces keep the mapping alive."""

    def __init__(self, nbytes: int) -> None:
        self._map = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):  # before the first touch: faults take 2 MB pages
            with contextlib.suppress(OSError):  # a kernel without THP: 4 KB pages, still one run
                self._map.madvise(mmap.MADV_HUGEPAGE)
        whole = np.frombuffer(self._map, dtype=np.uint8)
        start = -whole.ctypes.data % HUGE_PAGE
        self._bytes = whole[start : start + nbytes]
        self._used = 0

    def take(self, nbytes: int) -> np.ndarray:
        """The next ``nbytes`` (uint8), starting on a cache line."""
        piece = self._bytes[self._used : self._used + nbytes]
        if piece.size != nbytes:
            left = self._bytes.size - self._used
            raise ValueError(f"arena full: {nbytes} bytes asked, {left} left")
        self._used += -(-nbytes // ALIGNMENT) * ALIGNMENT
        return piece


def resident_weights(
    weights: ModelWeights,
    gguf: GGUFFile,
    head: bool = True,
    tile_head: bool = False,
    tile_ternary: bool = False,
) -> ModelWeights:
    """``weights`` with every streamed array that is a view of ``gguf``'s map (I2_S codes,
    float heads unless not ``head``) replaced by a copy in one :class:`Arena`, in forward
    order; arrays the loader already copied (repacked, dequantized) stay where they are.
    With ``tile_head``, a float head whose rows are whole 64-byte lines is copied tiled;
    with ``tile_ternary``, so are I2_S codes whose rows are. I2_S codes the loader copied
    (repacked, reordered) are tiled in place: ``weights`` must not be used afterwards."""
    offsets = {id(a): (a, gguf.file_offset(a)) for a in _streamed(weights, head)}  # once each
    mapped = [(a, offset) for a, offset in offsets.values() if offset is not None]
    tile_as: dict[int, tuple[int, int]] = {}  # id(array) → (rows, row bytes) to copy tiled
    data = _tiled_head(weights.head) if head and tile_head else None
    if data is not None and offsets[id(data)][1] is not None:  # the map's: copied tiled below
        tile_as[id(data)] = (len(data), data.nbytes // len(data))
    if tile_ternary:
        for w in _ternary_weights(weights, head):
            if w.can_tile and not w.tiled:  # I2_S whose rows are whole lines
                tile_as[id(w.raw)] = (w.n_out, w.n_in // 4)
    arena = Arena(sum(-(-a.nbytes // ALIGNMENT) * ALIGNMENT for a, _ in mapped)) if mapped else None
    copies: dict[int, np.ndarray] = {}
    reads: list[Callable[[], None]] = []  # pieces, read in parallel
    for a, offset in mapped:
        assert arena is not None
        piece = arena.take(a.nbytes)
        copies[id(a)] = piece.view(a.dtype).reshape(a.shape)
        n_rows, row_bytes = tile_as.get(id(a), (0, 0))
        tiled_bytes = n_rows * row_bytes  # read tiled, whole tiles per piece; the rest as it is
        if n_rows:
            step = max(1, READ_PIECE // row_bytes // TILE_ROWS) * TILE_ROWS
            rows = piece[:tiled_bytes].reshape(n_rows, row_bytes)
            reads += [
                functools.partial(_read_tiled, gguf, offset + lo * row_bytes, rows[lo : lo + step])
                for lo in range(0, n_rows, step)
            ]
        out = piece.data
        reads += [
            functools.partial(_pread, gguf, offset + lo, out[lo : lo + READ_PIECE])
            for lo in range(tiled_bytes, a.nbytes, READ_PIECE)
        ]
    with ThreadPoolExecutor(READ_THREADS) as pool:  # faulting the pages in is most of it
        list(pool.map(lambda read: read(), reads))
    for w in _ternary_weights(weights, head):  # codes the loader copied: tiled in place
        if id(w.raw) in tile_as and id(w.raw) not in copies:
            copies[id(w.raw)] = w.tiled_copy(out=w.raw).raw

    def moved(a: np.ndarray) -> np.ndarray:
        return copies.get(id(a), a)

    def ternary(w: TernaryWeight) -> TernaryWeight:
        scales = moved(w.scales) if w.scales is not None else None
        tiled = w.tiled or id(w.raw) in tile_as
        return dataclasses.replace(w, raw=moved(w.raw), scales=scales, tiled=tiled)

    def matrix(m: EmbeddingMatrix | None) -> EmbeddingMatrix | None:
        if m is None:
            return None
        head_ternary = ternary(m.ternary) if m.ternary is not None else None
        data = moved(m.data) if m.data is not None else None
        is_tiled = m.data is not None and id(m.data) in tile_as  # a tied embedding reads it too
        return dataclasses.replace(m, data=data, ternary=head_ternary, tiled=is_tiled)

    def layer(lw: LayerWeights) -> LayerWeights:
        projections: dict[str, Any] = {p: ternary(getattr(lw, p)) for p in PROJECTIONS}
        return dataclasses.replace(lw, **projections)

    token_embd = matrix(weights.token_embd)
    assert token_embd is not None
    return dataclasses.replace(
        weights,
        layers=tuple(layer(lw) for lw in weights.layers),
        token_embd=token_embd,
        output=matrix(weights.output),
    )


def _ternary_weights(weights: ModelWeights, head: bool) -> Iterator[TernaryWeight]:
    """The ternary weights a decode step reads, in order (a ternary head's last, if ``head``)."""
    for lw in weights.layers:
        for p in PROJECTIONS:
            yield getattr(lw, p)
    if head and weights.head.ternary is not None:
        yield weights.head.ternary


def _streamed(weights: ModelWeights, head: bool) -> Iterator[np.ndarray]:
    """The arrays one decode step reads in full, in the order it reads them (the head's
    last, if ``head``)."""
    for w in _ternary_weights(weights, head):
        yield from _ternary_arrays(w)
    if head and weights.head.ternary is None and weights.head.data is not None:
        yield weights.head.data


def _tiled_head(matrix: EmbeddingMatrix) -> np.ndarray | None:
    """The head's rows if the tiled layout can hold them (f32/f16/bf16, whole lines)."""
    data = matrix.data
    if matrix.kind not in FLOAT_KINDS.values() or data is None or not can_tile(data):
        return None
    return data


def _read_tiled(gguf: GGUFFile, offset: int, dest: np.ndarray) -> None:
    """Rows ``dest [n, dim]`` read from ``offset`` of ``gguf``'s file, written tiled
    (``n`` a whole number of tiles, or the matrix's last rows): read, then tiled in place."""
    _pread(gguf, offset, dest.reshape(-1).view(np.uint8).data)
    tile_rows(dest, dest)


def _ternary_arrays(w: TernaryWeight) -> Iterator[np.ndarray]:
    yield w.raw
    if w.scales is not None:
        yield w.scales


def _pread(gguf: GGUFFile, offset: int, dest: memoryview) -> None:
    """``len(dest)`` bytes of ``gguf``'s file from ``offset`` into ``dest``."""
    done = 0
    while done < len(dest):
        n = os.preadv(gguf.fileno(), [dest[done:]], offset + done)
        if n <= 0:
            raise OSError(f"{gguf.path}: short read at byte {offset + done}")
        done += n
