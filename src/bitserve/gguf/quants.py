"""Ternary codecs in numpy: I2_S pack/unpack (spec §2), TQ2_0/TQ1_0 unpack (ggml layout).

These are the reference definitions; the C kernels are tested against them.
"""

from __future__ import annotations

import numpy as np

from bitserve.gguf.constants import I2S_BLOCK, I2S_SCALE_PAD

# bit shifts of the four weights held by one I2_S byte: k, k+32, k+64, k+96 → bits 7-6 .. 1-0
_I2S_SHIFTS = np.array([6, 4, 2, 0], dtype=np.uint8)


def pack_i2s(ternary: np.ndarray, scale: float) -> np.ndarray:
    """Pack a ternary matrix ``[out, in]`` (values -1/0/+1) and its scale into I2_S bytes.

    Returns ``out*in/4 + 32`` bytes: codes, the f32 scale, then 28 zero padding bytes.
    """
    t = np.asarray(ternary)
    if t.ndim == 1:
        t = t[None, :]
    _rows, cols = t.shape
    if cols % I2S_BLOCK:
        raise ValueError(f"I2_S row length {cols} is not a multiple of {I2S_BLOCK}")
    if t.size and (t.min() < -1 or t.max() > 1):
        raise ValueError("I2_S weights must be -1, 0 or +1")
    codes = (t.astype(np.int8) + 1).astype(np.uint8).reshape(-1, 4, 32)  # [block, group, j]
    packed = np.bitwise_or.reduce(codes << _I2S_SHIFTS[None, :, None], axis=1)  # [block, 32]
    tail = np.zeros(I2S_SCALE_PAD, dtype=np.uint8)
    tail[:4] = np.frombuffer(np.float32(scale).astype("<f4").tobytes(), dtype=np.uint8)
    return np.concatenate([packed.reshape(-1).astype(np.uint8), tail])


def i2s_scale(raw: np.ndarray, rows: int, cols: int) -> float:
    """The per-tensor f32 scale stored right after the codes (the 28 bytes after it are ignored)."""
    start = rows * cols // 4
    return float(np.frombuffer(raw[start : start + 4].tobytes(), dtype="<f4")[0])


def unpack_i2s_codes(raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The ternary values ``[rows, cols]`` as int8 (-1/0/+1) from I2_S bytes."""
    if cols % I2S_BLOCK:
        raise ValueError(f"I2_S row length {cols} is not a multiple of {I2S_BLOCK}")
    packed = np.asarray(raw[: rows * cols // 4], dtype=np.uint8).reshape(-1, 1, 32)
    codes = (packed >> _I2S_SHIFTS[None, :, None]) & 3  # [block, group, j]
    return (codes.astype(np.int8) - 1).reshape(rows, cols)


def unpack_i2s(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, float]:
    """``(ternary int8 [rows, cols], scale)`` from an I2_S tensor's bytes."""
    return unpack_i2s_codes(raw, rows, cols), i2s_scale(raw, rows, cols)
