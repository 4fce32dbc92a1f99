"""GGUF value types, tensor types and their sizes (spec §1)."""

from __future__ import annotations

from enum import IntEnum

GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32
I2S_BLOCK = 128  # weights per I2_S block (32 bytes)
I2S_SCALE_PAD = 32  # bytes after the codes: f32 scale + 28 undefined padding bytes
TQ_BLOCK = 256  # weights per TQ1_0 / TQ2_0 block
Q2_0_BLOCK = 64  # weights per Q2_0 block (upstream ggml; PrismML's early files: 128, see below)
Q2_0_BLOCK_G128 = 128
Q8_0_BLOCK = 32
QK_K = 256  # weights per k-quant super-block (Q6_K)


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
    """Tensor types bitserve reads (ids as in ggml; 36 is bitnet.cpp's I2_S, 42 is Q2_0)."""

    F32 = 0
    F16 = 1
    Q8_0 = 8
    Q6_K = 14
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    I2_S = 36
    Q2_0 = 42


# The ternary types: 2-bit codes (TQ1_0: base-3 digits) with per-tensor (I2_S) or per-block
# scales. Q2_0 has a fourth code (+2) that ternary files never use; it is read, not refused.
TERNARY_TYPES = (GGMLType.I2_S, GGMLType.TQ1_0, GGMLType.TQ2_0, GGMLType.Q2_0)


# (weights per block, bytes per block) of each type; I2_S adds a 32-byte tail per tensor
BLOCK_LAYOUT: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.BF16: (1, 2),
    GGMLType.Q8_0: (Q8_0_BLOCK, 34),  # f16 scale + 32 int8
    GGMLType.Q6_K: (QK_K, 210),  # ql[128], qh[64], int8 scales[16], f16 d
    GGMLType.TQ1_0: (TQ_BLOCK, 54),
    GGMLType.TQ2_0: (TQ_BLOCK, 66),
    GGMLType.I2_S: (4, 1),
    GGMLType.Q2_0: (Q2_0_BLOCK, 18),  # f16 scale + 16 bytes of 2-bit codes
}

# Q2_0 under the same id 42 with blocks of 128 weights (f16 scale + 32 bytes): PrismML's
# first Ternary-Bonsai files ("Q2_0 g128"), read by their llama.cpp fork only. The reader
# tells the two apart by the room each tensor has in the file (GGUFFile.q2_0_block).
Q2_0_G128_LAYOUT = (Q2_0_BLOCK_G128, 34)


def tensor_nbytes(ggml_type: GGMLType, n_elements: int, q2_0_block: int = Q2_0_BLOCK) -> int:
    """Bytes a tensor of ``n_elements`` occupies in the data section (padding excluded);
    ``q2_0_block``: the Q2_0 variant's block size (64, or 128 for PrismML's early files)."""
    per_block, block_bytes = BLOCK_LAYOUT[ggml_type]
    if ggml_type == GGMLType.Q2_0 and q2_0_block == Q2_0_BLOCK_G128:
        per_block, block_bytes = Q2_0_G128_LAYOUT
    nbytes = (n_elements // per_block) * block_bytes
    if ggml_type == GGMLType.I2_S:
        nbytes += I2S_SCALE_PAD
    return nbytes
