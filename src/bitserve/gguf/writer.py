"""A small GGUF v3 writer, for test fixtures and the demo model.

It writes every type bitserve reads, I2_S included (which the PyPI ``gguf`` writer cannot).
Metadata types are inferred from Python values unless given explicitly:
bool → BOOL, int → UINT32 (INT32 if negative, 64-bit if large), float → FLOAT32,
str → STRING, list → ARRAY of the first element's inferred type.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bitserve.gguf.constants import (
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    Q2_0_BLOCK,
    SCALAR_FORMATS,
    GGMLType,
    GGUFValueType,
    tensor_nbytes,
)


@dataclass(slots=True)
class _PendingTensor:
    name: str
    dims: tuple[int, ...]  # GGUF order, ne0 first
    ggml_type: GGMLType
    data: bytes


def infer_value_type(value: Any) -> GGUFValueType:
    if isinstance(value, (bool, np.bool_)):
        return GGUFValueType.BOOL
    if isinstance(value, (int, np.integer)):
        v = int(value)
        if 0 <= v < 2**32:
            return GGUFValueType.UINT32
        if -(2**31) <= v < 0:
            return GGUFValueType.INT32
        return GGUFValueType.UINT64 if v >= 0 else GGUFValueType.INT64
    if isinstance(value, (float, np.floating)):
        return GGUFValueType.FLOAT32
    if isinstance(value, str):
        return GGUFValueType.STRING
    if isinstance(value, (list, tuple)):
        return GGUFValueType.ARRAY
    raise TypeError(f"cannot store {type(value).__name__} in GGUF metadata")


# keys llama.cpp reads with one type only, written with it unless the caller says
# otherwise (inference would make token types UINT32, which llama.cpp refuses)
KEY_TYPES: dict[str, tuple[GGUFValueType, GGUFValueType]] = {
    "tokenizer.ggml.token_type": (GGUFValueType.ARRAY, GGUFValueType.INT32),
    "tokenizer.ggml.scores": (GGUFValueType.ARRAY, GGUFValueType.FLOAT32),
}


def _encode_string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _encode_value(value: Any, vtype: GGUFValueType, elem_type: GGUFValueType | None) -> bytes:
    if vtype == GGUFValueType.STRING:
        return _encode_string(value)
    if vtype == GGUFValueType.ARRAY:
        items = list(value)
        if elem_type is None:
            elem_type = infer_value_type(items[0]) if items else GGUFValueType.INT32
            if elem_type == GGUFValueType.UINT32 and any(int(v) < 0 for v in items):
                elem_type = GGUFValueType.INT32
        head = struct.pack("<IQ", elem_type, len(items))
        if elem_type == GGUFValueType.STRING:
            return head + b"".join(_encode_string(s) for s in items)
        if elem_type == GGUFValueType.ARRAY:
            return head + b"".join(_encode_value(v, GGUFValueType.ARRAY, None) for v in items)
        fmt = SCALAR_FORMATS[elem_type]
        return head + struct.pack(f"<{len(items)}{fmt[1]}", *items)
    return struct.pack(SCALAR_FORMATS[vtype], value)


class GGUFWriter:
    """Collect metadata and tensors, then :meth:`write` one GGUF v3 file."""

    def __init__(self, alignment: int = GGUF_DEFAULT_ALIGNMENT) -> None:
        self.alignment = alignment
        self._kv: list[tuple[str, Any, GGUFValueType, GGUFValueType | None]] = []
        self._tensors: list[_PendingTensor] = []
        if alignment != GGUF_DEFAULT_ALIGNMENT:
            self.add("general.alignment", alignment)

    def add(
        self,
        key: str,
        value: Any,
        vtype: GGUFValueType | None = None,
        elem_type: GGUFValueType | None = None,
    ) -> None:
        """Add one metadata key; ``vtype``/``elem_type`` override the inferred types
        (and the types of :data:`KEY_TYPES`)."""
        if vtype is None and key in KEY_TYPES:
            vtype, elem_type = KEY_TYPES[key]
        vtype = infer_value_type(value) if vtype is None else vtype  # UINT8 is 0: falsy
        self._kv.append((key, value, vtype, elem_type))

    def add_tensor(
        self,
        name: str,
        data: bytes | np.ndarray,
        ggml_type: GGMLType,
        dims: tuple[int, ...],
        q2_0_block: int = Q2_0_BLOCK,
    ) -> None:
        """Add a tensor; ``dims`` in GGUF order (``ne0`` first), ``data`` its exact bytes
        (``q2_0_block`` 128: PrismML's early Q2_0 variant, for test files of it)."""
        raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
        n = 1
        for d in dims:
            n *= d
        expected = tensor_nbytes(ggml_type, n, q2_0_block)
        if len(raw) != expected:
            raise ValueError(f"tensor {name!r}: {len(raw)} bytes given, {expected} expected")
        self._tensors.append(_PendingTensor(name, tuple(dims), ggml_type, raw))

    def add_array(self, name: str, array: np.ndarray) -> None:
        """Add a float32/float16 numpy array (numpy shape; stored as F32/F16)."""
        types = {np.dtype(np.float32): GGMLType.F32, np.dtype(np.float16): GGMLType.F16}
        ggml_type = types[array.dtype]
        self.add_tensor(name, np.ascontiguousarray(array), ggml_type, tuple(reversed(array.shape)))

    def _pad(self, n: int) -> int:
        return -n % self.alignment

    def write(self, path: str | Path) -> None:
        parts = [GGUF_MAGIC, struct.pack("<IQQ", 3, len(self._tensors), len(self._kv))]
        for key, value, vtype, elem_type in self._kv:
            parts += [_encode_string(key), struct.pack("<I", vtype)]
            parts.append(_encode_value(value, vtype, elem_type))
        offset = 0
        for t in self._tensors:
            parts += [_encode_string(t.name), struct.pack("<I", len(t.dims))]
            parts += [
                struct.pack(f"<{len(t.dims)}Q", *t.dims),
                struct.pack("<IQ", t.ggml_type, offset),
            ]
            offset += len(t.data) + self._pad(len(t.data))
        header = b"".join(parts)
        tmp = Path(f"{path}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(header)
                f.write(b"\0" * self._pad(len(header)))
                for t in self._tensors:
                    f.write(t.data)
                    f.write(b"\0" * self._pad(len(t.data)))
            tmp.replace(path)  # atomic: a reader never sees a half-written file
        except BaseException:  # a full disk, Ctrl-C: no half-written file left behind
            tmp.unlink(missing_ok=True)
            raise
