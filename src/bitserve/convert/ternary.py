"""Ternary weights as Hugging Face stores them, and as GGUF stores them.

Hugging Face (transformers' ``integrations/bitnet.py``): a ternary matrix ``[out, in]``
is packed into uint8 ``[out / 4, in]``; bits ``2i..2i+1`` of byte ``[r, c]`` hold the code
(0, 1, 2 for -1, 0, +1) of row ``i * out / 4 + r``. A ``weight_scale`` goes with it: for
``BitLinear`` (the default) the real weight is ``ternary / weight_scale``; for
``AutoBitLinear`` in offline mode it is ``ternary * weight_scale``. Master weights (bf16)
are quantized the way training did, per tensor: ``scale = mean(|W|)``,
``ternary = clamp(round(W / scale), -1, 1)`` (BitNet b1.58's absmean).

GGUF: one scale per tensor is I2_S (``bitserve.gguf.quants.pack_i2s``); scales that vary
within a tensor (per output row) are TQ2_0 (``pack_tq2_0``), whose 256-weight blocks each
carry an f16 scale.
"""

from __future__ import annotations

import numpy as np

_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)


def unpack_hf_ternary(packed: np.ndarray) -> np.ndarray:
    """uint8 ``[out / 4, in]`` → int8 ternary ``[out, in]`` (transformers' packing)."""
    if packed.dtype != np.uint8 or packed.ndim != 2:
        raise ValueError(
            f"packed ternary weights must be 2-D uint8, got {packed.dtype} {packed.shape}"
        )
    codes = (packed[None, :, :] >> _SHIFTS[:, None, None]) & 3  # [4, out/4, in]
    if np.any(codes == 3):
        raise ValueError("packed ternary weights hold code 3, which is not -1, 0 or +1")
    return (codes.astype(np.int8) - 1).reshape(4 * packed.shape[0], packed.shape[1])


def absmean_ternary(weight: np.ndarray) -> tuple[np.ndarray, float]:
    """BitNet b1.58's quantization of a master weight: ``(ternary int8, scale)`` with
    ``scale = mean(|W|)`` (at least 1e-5) and ``ternary = clamp(round(W / scale))``."""
    w = np.asarray(weight, dtype=np.float64)
    scale = max(float(np.mean(np.abs(w))), 1e-5)
    ternary = np.clip(np.rint(w / scale), -1, 1).astype(np.int8)
    return ternary, float(np.float32(scale))


def ternary_from_floats(weight: np.ndarray) -> np.ndarray:
    """Weights stored unpacked but already ternary (-1.0/0.0/+1.0) as int8; raises
    ``ValueError`` if any value is something else."""
    ternary: np.ndarray = np.rint(np.asarray(weight, dtype=np.float32))
    if not np.array_equal(ternary, weight) or np.abs(ternary).max(initial=0) > 1:
        raise ValueError("offline-quantized weights are not all -1, 0 or +1")
    return ternary.astype(np.int8)
