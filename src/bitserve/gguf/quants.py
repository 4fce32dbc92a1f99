"""Ternary codecs in numpy: I2_S pack/unpack (spec §2), TQ2_0/TQ1_0/Q2_0 pack and unpack
(ggml layouts, per-block f16 scales), and the TQ → I2_S repacking for one-scale tensors.

These are the reference definitions; the C kernels are tested against them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bitserve.gguf.constants import (
    BLOCK_LAYOUT,
    I2S_BLOCK,
    I2S_SCALE_PAD,
    Q2_0_BLOCK,
    Q2_0_BLOCK_G128,
    TQ_BLOCK,
    GGMLType,
)
from bitserve.gguf.reader import GGUFError

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
    if len(raw) < start + 4:
        raise ValueError(f"I2_S [{rows}, {cols}]: {len(raw)} bytes hold no scale at byte {start}")
    return float(np.frombuffer(raw[start : start + 4].tobytes(), dtype="<f4")[0])


def unpack_i2s_codes(raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The ternary values ``[rows, cols]`` as int8 (-1/0/+1) from I2_S bytes."""
    if cols % I2S_BLOCK:
        raise ValueError(f"I2_S row length {cols} is not a multiple of {I2S_BLOCK}")
    if len(raw) < rows * cols // 4:
        raise ValueError(f"I2_S [{rows}, {cols}] needs {rows * cols // 4} bytes, got {len(raw)}")
    packed = np.asarray(raw[: rows * cols // 4], dtype=np.uint8).reshape(-1, 1, 32)
    codes = (packed >> _I2S_SHIFTS[None, :, None]) & 3  # [block, group, j]
    return (codes.astype(np.int8) - 1).reshape(rows, cols)


def unpack_i2s(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, float]:
    """``(ternary int8 [rows, cols], scale)`` from an I2_S tensor's bytes."""
    return unpack_i2s_codes(raw, rows, cols), i2s_scale(raw, rows, cols)


# ---- TQ2_0 / TQ1_0 (upstream ggml, blocks of 256 weights) ---------------------------------
#
# TQ2_0 block (66 bytes): qs[64], d (f16). Byte j of 32-byte half g holds weights
#   128g + j, 128g + 32 + j, 128g + 64 + j, 128g + 96 + j in bits 1-0, 3-2, 5-4, 7-6;
#   weight = d * (code - 1). Same grouping as I2_S, with the bit order of the four reversed.
# TQ1_0 block (54 bytes): qs[48], qh[4], d (f16). Five trits per byte (base 3, first weight
#   most significant), stored as ceil(v * 256 / 243) so that trit n is the top trit of
#   byte * 3^n (mod 256): (byte * 3^n mod 256) * 3 >> 8. qs[0:32] holds weights 32n + j
#   (0..159), qs[32:48] holds 160 + 16n + j (160..239), qh[0:4] holds 240 + 4n + j (4 trits).

_TQ2_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)
_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)


def _tq_blocks(raw: np.ndarray, ggml_type: GGMLType, rows: int, cols: int) -> np.ndarray:
    """The tensor's bytes as ``[rows * cols / 256, block_bytes]`` uint8 blocks."""
    if cols % TQ_BLOCK:
        raise ValueError(f"{ggml_type.name} row length {cols} is not a multiple of {TQ_BLOCK}")
    block_bytes = BLOCK_LAYOUT[ggml_type][1]
    n_blocks = rows * cols // TQ_BLOCK
    if len(raw) < n_blocks * block_bytes:
        needed = n_blocks * block_bytes
        raise ValueError(f"{ggml_type.name} [{rows}, {cols}] needs {needed} bytes, got {len(raw)}")
    return np.asarray(raw[: n_blocks * block_bytes], dtype=np.uint8).reshape(n_blocks, block_bytes)


def _block_scales(d_bytes: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """f16 block scales ``[n_blocks, 2]`` bytes → float32 ``[rows, cols / 256]``."""
    d = np.ascontiguousarray(d_bytes).view("<f2").astype(np.float32)
    return d.reshape(rows, cols // TQ_BLOCK)


def unpack_tq2_0(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """``(codes - 1 as int8 [rows, cols], block scales f32 [rows, cols / 256])`` of TQ2_0.

    Values are -1/0/+1 in valid files; the unused code 3 comes out as 2 (not hidden).
    """
    blocks = _tq_blocks(raw, GGMLType.TQ2_0, rows, cols)
    qs = blocks[:, :64].reshape(-1, 2, 1, 32)  # [block, half, 1, j]
    codes = (qs >> _TQ2_SHIFTS[None, None, :, None]) & 3  # [block, half, group, j]
    ternary = (codes.astype(np.int8) - 1).reshape(rows, cols)
    return ternary, _block_scales(blocks[:, 64:66], rows, cols)


def _trits(packed: np.ndarray, n_digits: int) -> np.ndarray:
    """Base-3 digits of TQ1_0 bytes ``[block, width]`` → ``[block, n_digits * width]`` (0..2),
    digit n of byte j at index ``n * width + j``."""
    shifted = packed[:, None, :] * _POW3[None, :n_digits, None]  # uint8: wraps mod 256
    digits = (shifted.astype(np.uint16) * 3) >> 8
    return digits.reshape(len(packed), -1).astype(np.int8)


def unpack_tq1_0(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ternary int8 [rows, cols], block scales f32 [rows, cols / 256])`` of TQ1_0."""
    blocks = _tq_blocks(raw, GGMLType.TQ1_0, rows, cols)
    trits = np.concatenate(
        [_trits(blocks[:, :32], 5), _trits(blocks[:, 32:48], 5), _trits(blocks[:, 48:52], 4)],
        axis=1,
    )  # [block, 256]
    return (trits - 1).reshape(rows, cols), _block_scales(blocks[:, 52:54], rows, cols)


def _f16_bytes(scales: np.ndarray, n_blocks: int) -> np.ndarray:
    """Block scales (any float dtype) as ``[n_blocks, 2]`` little-endian f16 bytes."""
    d = np.ascontiguousarray(np.asarray(scales, dtype=np.float32).reshape(n_blocks))
    return d.astype("<f2").view(np.uint8).reshape(n_blocks, 2)


def _codes(values: np.ndarray, block: int, top: int) -> tuple[np.ndarray, int, int]:
    """Weights ``[rows, cols]`` (-1..top-1) as codes 0..top in ``[n_blocks, block]`` uint8."""
    v = np.asarray(values)
    v = v[None, :] if v.ndim == 1 else v
    rows, cols = v.shape
    if cols % block:
        raise ValueError(f"row length {cols} is not a multiple of the block size {block}")
    if v.size and (v.min() < -1 or v.max() > top - 1):
        raise ValueError(f"weights must lie in -1..{top - 1}")
    return (v.astype(np.int8) + 1).astype(np.uint8).reshape(-1, block), rows, cols


def pack_tq2_0(ternary: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """TQ2_0 bytes of weights ``[rows, cols]`` (-1/0/+1) with block scales ``[rows, cols/256]``
    (stored as f16); the inverse of :func:`unpack_tq2_0`."""
    codes, _, _ = _codes(ternary, TQ_BLOCK, 2)
    shifted = codes.reshape(-1, 2, 4, 32) << _TQ2_SHIFTS[None, None, :, None]  # [b, half, g, j]
    qs = np.bitwise_or.reduce(shifted, axis=2).reshape(-1, 64)
    return np.concatenate([qs, _f16_bytes(scales, len(qs))], axis=1).reshape(-1)


def pack_tq1_0(ternary: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """TQ1_0 bytes of weights ``[rows, cols]`` (-1/0/+1) with block scales ``[rows, cols/256]``;
    the inverse of :func:`unpack_tq1_0` (and byte for byte ggml's packing)."""
    codes, _, _ = _codes(ternary, TQ_BLOCK, 2)
    w5 = np.array([81, 27, 9, 3, 1], dtype=np.uint16)[None, :, None]
    parts = [
        (codes[:, :160].reshape(-1, 5, 32) * w5).sum(axis=1),  # digit n of byte j: 32n + j
        (codes[:, 160:240].reshape(-1, 5, 16) * w5).sum(axis=1),
        (codes[:, 240:].reshape(-1, 4, 4) * w5[:, :4]).sum(axis=1),
    ]
    values = np.concatenate(parts, axis=1).astype(np.uint16)  # [block, 52], each < 243
    qs = ((values * 256 + 242) // 243).astype(np.uint8)  # ceil(v · 256 / 243)
    return np.concatenate([qs, _f16_bytes(scales, len(qs))], axis=1).reshape(-1)


# ---- Q2_0 (type 42): f16 scale first, then 2-bit codes, weight j in bits 2(j%4) of byte j/4 --
#
# Codes 0..3 are -1, 0, +1, +2 (ternary files use the first three). Blocks of 64 weights
# (18 bytes) in upstream ggml; PrismML's early files use blocks of 128 (34 bytes) under the
# same id, which the reader detects (GGUFFile.q2_0_block).

_Q2_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)


def _q2_0_blocks(raw: np.ndarray, rows: int, cols: int, block: int) -> np.ndarray:
    if block not in (Q2_0_BLOCK, Q2_0_BLOCK_G128):
        raise ValueError(f"Q2_0 blocks hold {Q2_0_BLOCK} or {Q2_0_BLOCK_G128} weights, not {block}")
    if cols % block:
        raise ValueError(f"Q2_0 row length {cols} is not a multiple of {block}")
    block_bytes, n_blocks = 2 + block // 4, rows * cols // block
    if len(raw) < n_blocks * block_bytes:
        needed = n_blocks * block_bytes
        raise ValueError(f"Q2_0 [{rows}, {cols}] needs {needed} bytes, got {len(raw)}")
    return np.asarray(raw[: n_blocks * block_bytes], dtype=np.uint8).reshape(n_blocks, block_bytes)


def unpack_q2_0(
    raw: np.ndarray, rows: int, cols: int, block: int = Q2_0_BLOCK
) -> tuple[np.ndarray, np.ndarray]:
    """``(code - 1 as int8 [rows, cols] in -1..2, block scales f32 [rows, cols / block])``."""
    blocks = _q2_0_blocks(raw, rows, cols, block)
    codes = (blocks[:, 2:, None] >> _Q2_SHIFTS[None, None, :]) & 3  # [block, byte, j % 4]
    values = (codes.astype(np.int8) - 1).reshape(rows, cols)
    d = np.ascontiguousarray(blocks[:, :2]).view("<f2").astype(np.float32)
    return values, d.reshape(rows, cols // block)


def pack_q2_0(values: np.ndarray, scales: np.ndarray, block: int = Q2_0_BLOCK) -> np.ndarray:
    """Q2_0 bytes of weights ``[rows, cols]`` (-1..2) with scales ``[rows, cols / block]``."""
    codes, _, _ = _codes(values, block, 3)
    qs = np.bitwise_or.reduce(codes.reshape(len(codes), -1, 4) << _Q2_SHIFTS, axis=2)
    return np.concatenate([_f16_bytes(scales, len(qs)), qs], axis=1).reshape(-1)


def unpack_ternary(
    raw: np.ndarray, ggml_type: GGMLType, rows: int, cols: int, q2_0_block: int = Q2_0_BLOCK
) -> tuple[np.ndarray, np.ndarray]:
    """Any ternary type as ``(int8 [rows, cols], scales f32 [rows, n_groups])``: the weight is
    ``values[r, k] * scales[r, k // (cols / n_groups)]`` (I2_S: one group, its tensor scale)."""
    if ggml_type == GGMLType.I2_S:
        values, scale = unpack_i2s(raw, rows, cols)
        return values, np.full((rows, 1), scale, dtype=np.float32)
    if ggml_type == GGMLType.TQ2_0:
        return unpack_tq2_0(raw, rows, cols)
    if ggml_type == GGMLType.TQ1_0:
        return unpack_tq1_0(raw, rows, cols)
    if ggml_type == GGMLType.Q2_0:
        return unpack_q2_0(raw, rows, cols, q2_0_block)
    raise ValueError(f"{ggml_type.name} is not a ternary type")


def _tensor_scale(ternary: np.ndarray, scales: np.ndarray, path: str | Path, what: str) -> float:
    """The one scale shared by every block that holds a nonzero weight.

    ``ternary`` is ``[n_blocks, 256]``, ``scales`` ``[n_blocks]``. Blocks whose weights are all
    zero (or whose scale is 0) carry no information. Scales further apart than one f16 step
    mean the tensor is not one-scale BitNet ternary: that is an error, never an average.
    """
    active = scales[(scales != 0) & np.any(ternary != 0, axis=1)]
    if active.size == 0:
        return 0.0
    values, counts = np.unique(active, return_counts=True)
    ref = float(values[np.argmax(counts)])
    tolerance = float(np.spacing(np.float16(abs(ref))))
    lo, hi = float(active.min()), float(active.max())
    if hi - ref > tolerance or ref - lo > tolerance:
        raise GGUFError(
            path,
            f"{what}: block scales range over {lo:g} .. {hi:g}, more than f16 rounding; "
            "I2_S holds one scale per tensor (BitNet b1.58), refusing to average them",
        )
    return ref


def repack_to_i2s(
    raw: np.ndarray,
    ggml_type: GGMLType,
    rows: int,
    cols: int,
    *,
    path: str | Path = "<memory>",
    name: str = "tensor",
) -> tuple[np.ndarray, float]:
    """A ternary tensor ``[rows, cols]`` of TQ1_0/TQ2_0 (or I2_S) as ``(I2_S bytes, scale)``.

    The result holds exactly the weights of the input: ``scale * ternary`` equals ggml's
    dequantization. I2_S input is returned as is (a view). Raises :class:`GGUFError`
    (naming ``path`` and ``name``) when the block scales differ or a TQ2_0 code is 3.
    """
    problem = f"{ggml_type.name} tensor {name!r}"
    if ggml_type == GGMLType.I2_S:
        return raw[: rows * cols // 4 + I2S_SCALE_PAD], i2s_scale(raw, rows, cols)
    if ggml_type == GGMLType.TQ2_0:
        ternary, scales = unpack_tq2_0(raw, rows, cols)
    elif ggml_type == GGMLType.TQ1_0:
        ternary, scales = unpack_tq1_0(raw, rows, cols)
    else:
        raise GGUFError(path, f"{problem} is not ternary (TQ1_0, TQ2_0 or I2_S)")
    blocks, block_scales = ternary.reshape(-1, TQ_BLOCK), scales.reshape(-1)
    if np.any(blocks[block_scales != 0] > 1):
        raise GGUFError(path, f"{problem} holds code 3, which is not a ternary weight")
    scale = _tensor_scale(blocks, block_scales, path, problem)
    blocks[block_scales == 0] = 0  # a zero scale makes every weight of its block zero
    return pack_i2s(ternary, scale), scale
