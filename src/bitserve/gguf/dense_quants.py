"""Q8_0 and Q6_K in numpy: the int8-coded types some files use for embeddings and LM heads.

Both unpack to ``(int8 values [rows, cols], f32 scales [rows, cols / block])`` with
``weight = scale · value``, each scale exact in float32 (Q8_0: its f16 ``d``; Q6_K: ``d · sc``,
an f16 times an int8), so ``scale · value`` rounds exactly as ggml's dequantization does. The
packers quantize float matrices the way ggml's reference quantizers do, for test files.
"""

from __future__ import annotations

import numpy as np

from bitserve.gguf.constants import BLOCK_LAYOUT, Q8_0_BLOCK, QK_K, GGMLType

Q6_K_SUB = 16  # weights per Q6_K sub-block (one int8 scale each)


def _blocks(raw: np.ndarray, ggml_type: GGMLType, rows: int, cols: int) -> np.ndarray:
    per_block, block_bytes = BLOCK_LAYOUT[ggml_type]
    if cols % per_block:
        raise ValueError(f"{ggml_type.name} row length {cols} is not a multiple of {per_block}")
    n_blocks = rows * cols // per_block
    if len(raw) < n_blocks * block_bytes:
        needed = n_blocks * block_bytes
        raise ValueError(f"{ggml_type.name} [{rows}, {cols}] needs {needed} bytes, got {len(raw)}")
    return np.asarray(raw[: n_blocks * block_bytes], dtype=np.uint8).reshape(n_blocks, block_bytes)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def _roundf(x: np.ndarray) -> np.ndarray:
    """C's ``roundf``: halves away from zero (ggml's reference quantizers)."""
    out: np.ndarray = np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))
    return out


# ---- Q8_0: blocks of 32, {f16 d, int8 qs[32]}, weight = d · q -------------------------------


def unpack_q8_0(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """``(int8 [rows, cols], scales f32 [rows, cols / 32])`` of a Q8_0 tensor."""
    blocks = _blocks(raw, GGMLType.Q8_0, rows, cols)
    values = np.ascontiguousarray(blocks[:, 2:]).view(np.int8).reshape(rows, cols)
    return values, _f16(blocks[:, :2]).reshape(rows, cols // Q8_0_BLOCK)


def pack_q8_0(x: np.ndarray) -> np.ndarray:
    """Q8_0 bytes of float ``x [rows, cols]``: ``d = absmax / 127`` per block, ``q = roundf(x / d)``
    (byte for byte the PyPI ``gguf`` package's quantizer)."""
    blocks = np.asarray(x, dtype=np.float32).reshape(-1, Q8_0_BLOCK)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = _roundf(blocks * inv).astype(np.int8).view(np.uint8)
    return np.concatenate([d.astype("<f2").view(np.uint8), q], axis=1).reshape(-1)


# ---- Q6_K: super-blocks of 256, {ql[128], qh[64], int8 sc[16], f16 d} -----------------------
#
# Each half (128 weights) of a super-block keeps 64 bytes of low nibbles and 32 of high bit
# pairs: weight l + 32i (l < 32, i < 4) has its low nibble in ql[l + 32·(i % 2)] (bits 0-3 for
# i < 2, 4-7 for i >= 2) and its top two bits at bits 2i of qh[l]; q = 6-bit - 32, and the
# 16 weights of sub-block s share sc[s]: weight = d · sc[s] · q.


def unpack_q6_k(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """``(int8 [rows, cols] in -32..31, scales f32 [rows, cols / 16] = d · sc)`` of Q6_K."""
    blocks = _blocks(raw, GGMLType.Q6_K, rows, cols)
    ql = blocks[:, :128].reshape(-1, 2, 2, 32)  # [block, half, lo/hi 32 bytes, l]
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32)  # [block, half, 1, l]
    low = np.stack([ql[:, :, :, :] & 0xF, ql >> 4], axis=2).reshape(-1, 2, 4, 32)  # i = 0..3
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]) & 3
    values = ((low | (high << 4)).astype(np.int8) - 32).reshape(rows, cols)
    sc = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32)
    scales = _f16(blocks[:, 208:210]) * sc  # exact: an f16 times an int8 fits float32
    return values, scales.reshape(rows, cols // Q6_K_SUB)


def pack_q6_k(x: np.ndarray) -> np.ndarray:
    """Q6_K bytes of float ``x [rows, cols]``; a plain quantizer for test files: sub-block
    scale ``absmax / 31``, ``d = max|scale| / 127``, ``sc = round(scale / d)``,
    ``q = round(x / (d·sc))``."""
    sub = np.asarray(x, dtype=np.float32).reshape(-1, QK_K // Q6_K_SUB, Q6_K_SUB)
    scale = np.abs(sub).max(axis=2) / np.float32(31)  # [block, 16]
    d = (np.abs(scale).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float16)
    d32 = d.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 == 0, 0, _roundf(scale / d32)).clip(-128, 127).astype(np.int8)
        step = (d32 * sc)[:, :, None]
        q = np.where(step == 0, 0, _roundf(sub / step)).clip(-32, 31).astype(np.int16)
    u = (q + 32).astype(np.uint8).reshape(-1, 2, 4, 32)  # [block, half, i, l]
    ql = (u[:, :, 0:2] & 0xF) | ((u[:, :, 2:4] & 0xF) << 4)  # [block, half, 2, 32]
    qh = np.bitwise_or.reduce((u >> 4) << np.array([0, 2, 4, 6], np.uint8)[:, None], axis=2)
    parts = [
        ql.reshape(-1, 128),
        qh.reshape(-1, 64),
        sc.view(np.uint8),
        d.astype("<f2").view(np.uint8).reshape(-1, 2),
    ]
    return np.concatenate(parts, axis=1).reshape(-1)


def unpack_int8_blocks(
    raw: np.ndarray, ggml_type: GGMLType, rows: int, cols: int
) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 or Q6_K as ``(int8 values [rows, cols], f32 scales [rows, cols / block])``."""
    if ggml_type == GGMLType.Q8_0:
        return unpack_q8_0(raw, rows, cols)
    if ggml_type == GGMLType.Q6_K:
        return unpack_q6_k(raw, rows, cols)
    raise ValueError(f"{ggml_type.name} is not an int8-block type (Q8_0, Q6_K)")
