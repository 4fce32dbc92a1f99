"""GGUF value types, tensor types and their sizes (spec §1)."""

from __future__ import annotations

from enum import IntEnum

GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32
I2S_BLOCK = 128  # weights per I2_S block (32 bytes)
I2S_SCALE_PAD = 32  # bytes after the codes: f32 scale + 28 undefined padding bytes
TQ_BLOCK = 256  # weights per TQ1_0 / TQ2_0 block


class GGUFValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# struct format of every fixed-size scalar value type
SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


class GGMLType(IntEnum):
    """Tensor types bitserve reads (ids as in ggml; 36 is bitnet.cpp's I2_S)."""

    F32 = 0
    F16 = 1
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    I2_S = 36


# (weights per block, bytes per block) of each type; I2_S adds a 32-byte tail per tensor
BLOCK_LAYOUT: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.BF16: (1, 2),
    GGMLType.TQ1_0: (TQ_BLOCK, 54),
    GGMLType.TQ2_0: (TQ_BLOCK, 66),
    GGMLType.I2_S: (4, 1),
}


def tensor_nbytes(ggml_type: GGMLType, n_elements: int) -> int:
    """Bytes a tensor of ``n_elements`` occupies in the data section (padding excluded)."""
    per_block, block_bytes = BLOCK_LAYOUT[ggml_type]
    nbytes = (n_elements // per_block) * block_bytes
    if ggml_type == GGMLType.I2_S:
        nbytes += I2S_SCALE_PAD
    return nbytes
