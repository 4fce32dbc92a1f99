"""A memory-mapped GGUF reader: metadata, tensor table and zero-copy tensor views (spec §1).

The PyPI ``gguf`` package rejects tensor type 36 (I2_S), so bitserve reads the container
itself. Every problem with a file raises :class:`GGUFError` naming the file and the problem;
nothing here trusts a count or an offset before checking it against the file's size.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bitserve.gguf.constants import (
    BLOCK_LAYOUT,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    I2S_BLOCK,
    Q2_0_BLOCK,
    Q2_0_BLOCK_G128,
    SCALAR_FORMATS,
    GGMLType,
    GGUFValueType,
    tensor_nbytes,
)

SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4
MAX_ARRAY_NESTING = 8  # real files nest at most once; deeper nesting only exhausts the stack

# numpy dtypes of the numeric value types, for reading whole arrays at once
_ARRAY_DTYPES: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.BOOL: "<u1",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}


class GGUFError(ValueError):
    """A GGUF file is malformed or uses something bitserve does not support.
    ``unsupported``: a well-formed file of a kind bitserve lacks (a tensor type), which
    a pull keeps, rather than a damaged or foreign one."""

    def __init__(self, path: str | Path, problem: str, unsupported: bool = False) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem
        self.unsupported = unsupported


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One entry of the tensor table.

    ``dims`` is in GGUF order (``ne0``, the innermost/fastest dimension, first);
    ``shape`` is the numpy order (reversed), e.g. a linear layer is ``(out, in)``.
    ``offset`` is absolute in the file.
    """

    name: str
    dims: tuple[int, ...]
    ggml_type: GGMLType
    offset: int
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.dims))

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n


class _Cursor:
    """Sequential little-endian reads from a buffer; running past its end is an error."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def need(self, n: int, what: str) -> None:
        """Fail unless ``n`` more bytes exist; sizes beyond the whole file are called absurd."""
        if n > len(self.buf):
            raise GGUFError(
                self.path,
                f"absurd size: {what} at byte {self.pos} claims {n} bytes, "
                f"more than the whole file ({len(self.buf)} bytes)",
            )
        if n < 0 or self.pos + n > len(self.buf):
            raise GGUFError(
                self.path, f"truncated file: {what} at byte {self.pos} runs past the end"
            )

    def scalar(self, vtype: GGUFValueType, what: str) -> Any:
        fmt = SCALAR_FORMATS[vtype]
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def u32(self, what: str) -> int:
        return int(self.scalar(GGUFValueType.UINT32, what))

    def u64(self, what: str) -> int:
        return int(self.scalar(GGUFValueType.UINT64, what))

    def string(self, what: str) -> str:
        n = self.u64(f"{what} length")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(self.path, f"{what} is not valid UTF-8") from e

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.u32(what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise GGUFError(self.path, f"{what}: unknown metadata value type {raw}") from None

    def value(self, vtype: GGUFValueType, what: str, depth: int = 0) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            return self.array(what, depth)
        return self.scalar(vtype, what)

    def array_head(self, what: str) -> tuple[GGUFValueType, int]:
        """Element type and count of the array starting at the cursor (cursor not moved)."""
        start = self.pos
        etype = self.value_type(f"{what} element type")
        count = self.u64(f"{what} element count")
        self.pos = start
        return etype, count

    def array(self, what: str, depth: int = 0) -> list[Any]:
        if depth >= MAX_ARRAY_NESTING:
            raise GGUFError(self.path, f"{what}: arrays nested deeper than {MAX_ARRAY_NESTING}")
        etype = self.value_type(f"{what} element type")
        count = self.u64(f"{what} element count")
        if etype in _ARRAY_DTYPES:
            dtype = np.dtype(_ARRAY_DTYPES[etype])
            self.need(count * dtype.itemsize, what)
            values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            if etype == GGUFValueType.BOOL:
                return [bool(v) for v in values]
            return values.tolist()  # type: ignore[no-any-return]
        if etype == GGUFValueType.STRING:
            # every string takes at least its 8-byte length: reject absurd counts up front
            self.need(count * 8, what)
            return [self.string(f"{what}[{i}]") for i in range(count)]
        self.need(count * 12, what)  # nested arrays: at least a type and a count each
        return [self.value(etype, f"{what}[{i}]", depth + 1) for i in range(count)]


class GGUFFile:
    """An open GGUF file. Tensor data stays in the memory map; views are zero-copy.

    Use as a context manager or call :meth:`close`; arrays returned by :meth:`raw` and
    :meth:`array` must not be used after closing.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 - kept open for the mmap's lifetime
        except OSError as e:
            raise GGUFError(self.path, f"cannot open: {e.strerror or e}") from e
        try:
            size = os.fstat(self._file.fileno()).st_size
            if size == 0:
                raise GGUFError(self.path, "empty file (0 bytes), not a GGUF file")
            self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._buf = memoryview(self._mmap)
            self._parse()
        except BaseException:
            self.close()
            raise

    # ---- parsing -------------------------------------------------------------------------

    def _parse(self) -> None:
        cur = _Cursor(self._buf, self.path)
        n_tensors, n_kv = self._parse_header(cur)
        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, GGUFValueType] = {}
        self.metadata_array_types: dict[str, GGUFValueType] = {}
        for i in range(n_kv):
            self._parse_kv(cur, i)

        alignment = self.metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(self.path, f"general.alignment {alignment!r} is not a power of two")
        self.alignment = alignment

        entries = [self._read_tensor_info(cur, i) for i in range(n_tensors)]
        self.data_offset = -(-cur.pos // alignment) * alignment
        self.q2_0_block = self._q2_0_block(entries)
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, gtype, rel_offset in entries:
            if name in self.tensors:
                raise GGUFError(self.path, f"duplicate tensor name: {name!r} appears twice")
            self.tensors[name] = self._check_tensor(name, dims, gtype, rel_offset)
        self._check_overlaps()

    def _parse_header(self, cur: _Cursor) -> tuple[int, int]:
        """Check magic and version; return ``(tensor count, metadata count)``."""
        magic = bytes(self._buf[:4])
        if magic != GGUF_MAGIC:
            raise GGUFError(self.path, f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
        cur.pos = 4
        self.version = cur.u32("version in header")
        if self.version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(self.version.to_bytes(4, "little"), "big")
            hint = " (a big-endian file?)" if swapped in SUPPORTED_VERSIONS else ""
            raise GGUFError(
                self.path,
                f"unsupported GGUF version {self.version}{hint}; supported: {SUPPORTED_VERSIONS}",
            )
        n_tensors = cur.u64("tensor count in header")
        n_kv = cur.u64("metadata count in header")
        # smallest entries: a metadata key/value takes 13 bytes, a tensor-table entry 32
        for count, min_bytes, what in ((n_kv, 13, "metadata"), (n_tensors, 32, "tensor")):
            if count * min_bytes > len(self._buf):
                raise GGUFError(
                    self.path,
                    f"absurd {what} count {count} in header for a file of {len(self._buf)} bytes",
                )
        return n_tensors, n_kv

    def _parse_kv(self, cur: _Cursor, i: int) -> None:
        key = cur.string(f"metadata key #{i}")
        if key in self.metadata:
            raise GGUFError(self.path, f"duplicate metadata key {key!r}")
        vtype = cur.value_type(f"metadata {key!r}")
        if vtype == GGUFValueType.ARRAY:
            self.metadata_array_types[key] = cur.array_head(f"metadata {key!r}")[0]
        self.metadata[key] = cur.value(vtype, f"metadata {key!r}")
        self.metadata_types[key] = vtype

    def _check_overlaps(self) -> None:
        """Tensor byte ranges must not overlap (each is a separate array in the writer)."""
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values())
        for (_, end, name), (start, _, nxt) in itertools.pairwise(spans):
            if start < end:
                raise GGUFError(self.path, f"tensors {name!r} and {nxt!r} overlap in the file")

    def _q2_0_block(self, entries: list[tuple[str, tuple[int, ...], int, int]]) -> int:
        """The block size of this file's Q2_0 tensors: 64 (upstream ggml) or 128 (PrismML's
        early Ternary-Bonsai files, same type id 42). A g128 tensor of n weights takes
        n/128·34 bytes, n/64 fewer than g64's n/64·18: the room up to the next tensor (set by
        the writer, so a truncated download cannot fake it) tells which one the file holds.
        Only a file whose single Q2_0 tensor is also its last falls back to the file size."""
        starts = sorted(rel for *_, rel in entries)
        data_len = len(self._buf) - self.data_offset
        rooms = []  # (room, dims, followed by another tensor)
        for _name, dims, gtype, rel in entries:
            if gtype == GGMLType.Q2_0 and dims:
                later = [o for o in starts if o > rel]
                rooms.append((later[0] - rel if later else data_len - rel, dims, bool(later)))
        inside = [r for r in rooms if r[2]]
        fits_g64, fits_g128 = True, True
        for room, dims, _ in inside or rooms:  # the last tensor's room only when it is alone
            n = int(np.prod(dims, dtype=np.int64))
            fits_g64 &= room >= tensor_nbytes(GGMLType.Q2_0, n, Q2_0_BLOCK)
            fits_g128 &= dims[0] % Q2_0_BLOCK_G128 == 0
            fits_g128 &= room >= tensor_nbytes(GGMLType.Q2_0, n, Q2_0_BLOCK_G128)
        return Q2_0_BLOCK_G128 if fits_g128 and not fits_g64 else Q2_0_BLOCK

    def _read_tensor_info(self, cur: _Cursor, i: int) -> tuple[str, tuple[int, ...], int, int]:
        name = cur.string(f"tensor #{i} name")
        n_dims = cur.u32(f"tensor {name!r} n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(self.path, f"tensor {name!r} has {n_dims} dimensions (1..4 allowed)")
        dims = tuple(cur.u64(f"tensor {name!r} dim {d}") for d in range(n_dims))
        gtype = cur.u32(f"tensor {name!r} type")
        offset = cur.u64(f"tensor {name!r} offset")
        return name, dims, gtype, offset

    def _check_tensor(
        self, name: str, dims: tuple[int, ...], gtype: int, rel_offset: int
    ) -> TensorInfo:
        try:
            ggml_type = GGMLType(gtype)
        except ValueError:
            known = ", ".join(f"{t.name} ({t.value})" for t in GGMLType)
            raise GGUFError(
                self.path,
                f"tensor {name!r} has unsupported type {gtype}; supported: {known}",
                unsupported=True,
            ) from None
        if any(d <= 0 for d in dims):
            raise GGUFError(self.path, f"tensor {name!r} has an empty dimension {dims}")
        n = 1
        for d in dims:
            n *= d
        per_block = BLOCK_LAYOUT[ggml_type][0]
        row_block = {GGMLType.I2_S: I2S_BLOCK, GGMLType.Q2_0: self.q2_0_block}.get(
            ggml_type, per_block
        )  # rows never share a block (I2_S: its 128-weight groups)
        if dims[0] % row_block:
            raise GGUFError(
                self.path,
                f"{ggml_type.name} tensor {name!r} has row length {dims[0]}, "
                f"not a multiple of {row_block}",
            )
        if rel_offset % self.alignment:
            raise GGUFError(
                self.path, f"tensor {name!r} offset {rel_offset} is not aligned to {self.alignment}"
            )
        nbytes = tensor_nbytes(ggml_type, n, self.q2_0_block)
        offset = self.data_offset + rel_offset
        if offset + nbytes > len(self._buf):
            raise GGUFError(
                self.path,
                f"tensor {name!r} ({nbytes} bytes at offset {offset}) runs past the end of the "
                f"file ({len(self._buf)} bytes): truncated or corrupt",
            )
        return TensorInfo(name, dims, ggml_type, offset, nbytes)

    # ---- access ------------------------------------------------------------------------------

    def tensor_info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(self.path, f"missing tensor {name!r}") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only ``uint8`` view of the memory map (zero copy)."""
        info = self.tensor_info(name)
        return np.frombuffer(self._buf, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def array(self, name: str) -> np.ndarray:
        """An F32/F16 tensor as a zero-copy view in numpy shape; BF16 is widened to float32."""
        info = self.tensor_info(name)
        raw = self.raw(name)
        if info.ggml_type == GGMLType.F32:
            return raw.view("<f4").reshape(info.shape)
        if info.ggml_type == GGMLType.F16:
            return raw.view("<f2").reshape(info.shape)
        if info.ggml_type == GGMLType.BF16:
            widened = raw.view("<u2").astype(np.uint32) << 16
            return widened.view(np.float32).reshape(info.shape)
        raise GGUFError(self.path, f"tensor {name!r} is {info.ggml_type.name}, not a float type")

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def fileno(self) -> int:
        """The open file's descriptor (for ``pread``: see ``bitserve.model.resident``)."""
        return self._file.fileno()

    def release(self, arr: np.ndarray) -> None:
        """Unmap the whole pages under ``arr``, a view of this file's map whose bytes were
        copied (repacked at load): they stay in the page cache and fault back in if read
        again, but stop counting in this process's resident memory, where they doubled a
        repacked model's size (Falcon3-7B TQ2_0: 4.1 GB resident for 2.5 GB of weights)."""
        offset = self.file_offset(arr)
        if offset is None or self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start, end = -(-offset // page) * page, (offset + arr.nbytes) // page * page
        if end > start:
            with contextlib.suppress(OSError):  # only a hint: the pages stay mapped
                self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)

    def file_offset(self, arr: np.ndarray) -> int | None:
        """Where ``arr``'s bytes start in the file, when ``arr`` is a C-contiguous view of
        this file's map (as :meth:`raw` and :meth:`array` return them); else ``None``."""
        if self._buf is None or not arr.flags.c_contiguous:
            return None
        base = np.frombuffer(self._buf, dtype=np.uint8)
        offset = arr.ctypes.data - base.ctypes.data
        return offset if offset >= 0 and offset + arr.nbytes <= base.size else None

    def close(self) -> None:
        buf = getattr(self, "_buf", None)
        if buf is not None:
            # numpy views still alive: the buffer is released when they are collected
            with contextlib.suppress(BufferError):
                buf.release()
            self._buf = None  # type: ignore[assignment]
        mm = getattr(self, "_mmap", None)
        if mm is not None:
            # numpy views still alive: the map is closed when they are collected
            with contextlib.suppress(BufferError):
                mm.close()
            self._mmap = None  # type: ignore[assignment]
        f = getattr(self, "_file", None)
        if f is not None:
            f.close()
            self._file = None  # type: ignore[assignment]

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_gguf(path: str | Path) -> GGUFFile:
    """Open and validate a GGUF file. Raises :class:`GGUFError` on any problem."""
    return GGUFFile(path)
