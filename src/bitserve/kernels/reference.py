"""The numpy oracle for every kernel (spec §4). Simple and obviously right, not fast.

The C kernels in ``bitserve.kernels`` must equal these bit for bit on integer results.
"""

from __future__ import annotations

import numpy as np

from bitserve.gguf.quants import unpack_i2s_codes

ACT_QMAX = 127.0
ACT_EPS = 1e-5


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token absmax int8 quantization: ``(q int8 [T, K], s f32 [T])``.

    ``s = 127 / max(max|x|, 1e-5)``; ``q = clamp(round_half_even(x * s), -128, 127)``,
    with ``x * s`` computed in float32.
    """
    x = np.asarray(x, dtype=np.float32)
    absmax = np.maximum(np.abs(x).max(axis=-1), np.float32(ACT_EPS))
    s = (np.float32(ACT_QMAX) / absmax).astype(np.float32)
    q = np.clip(np.rint(x * s[..., None]), -128, 127).astype(np.int8)
    return q, s


def ternary_matmul_int(q: np.ndarray, ternary: np.ndarray) -> np.ndarray:
    """Exact int32 ``q [T, K] @ ternary [N, K]ᵀ`` → ``[T, N]``."""
    acc: np.ndarray = q.astype(np.int32) @ ternary.astype(np.int32).T
    return acc


def bitlinear(x: np.ndarray, ternary: np.ndarray, w_scale: float) -> np.ndarray:
    """``y = (quant(x) @ Wᵀ) / s * w_scale`` in float32, ``x [T, K]``, ``ternary [N, K]``."""
    q, s = quantize_activations(x)
    acc = q.astype(np.float32) @ ternary.astype(np.float32).T  # exact: |sums| < 2**24
    y: np.ndarray = (acc / s[:, None] * np.float32(w_scale)).astype(np.float32)
    return y


def bitlinear_i2s(
    x: np.ndarray, raw: np.ndarray, n_out: int, n_in: int, w_scale: float
) -> np.ndarray:
    """:func:`bitlinear` with the weight given as raw I2_S bytes (on-disk layout)."""
    return bitlinear(x, unpack_i2s_codes(raw, n_out, n_in), w_scale)


def quantize_head_rows(embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The int8 head: each row of ``embedding [vocab, dim]`` quantized like an activation,
    ``(q int8 [vocab, dim], s f32 [vocab])`` with ``row ≈ q / s``."""
    return quantize_activations(np.asarray(embedding, dtype=np.float32))


def head_int8(x: np.ndarray, q: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``x [T, dim] @ (q / s)ᵀ`` → ``[T, vocab]`` float32: dot products first, then ``/ s``."""
    logits: np.ndarray = (x.astype(np.float32) @ q.astype(np.float32).T) / s[None, :]
    return logits.astype(np.float32)


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """``x / sqrt(mean(x²) + eps) * weight`` per row of ``x [..., n]`` (``weight [n]``) →
    float32; the mean of squares in float64, the division in float64 then rounded to float32
    (the numpy backend's and the oracle for the C kernel)."""
    mean_sq = np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True)
    out: np.ndarray = (x / np.sqrt(mean_sq + eps)).astype(np.float32) * weight
    return out


def relu2_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """BitNet's FFN gate: ``max(gate, 0)² * up`` in float32, elementwise."""
    out: np.ndarray = np.square(np.maximum(gate, np.float32(0))) * up
    return out


def rope_neox(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """NEOX ("rotate-half") RoPE: rotate pairs ``(i, i + D/2)`` of ``x [T, H, D]`` by the
    angles of its positions, ``cos``/``sin [T, D/2]``. Returns a new ``[T, H, D]`` array."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # [T, H, D/2] each
    c, s = cos[:, None, :], sin[:, None, :]  # [T, 1, D/2]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
