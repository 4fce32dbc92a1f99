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


def quantize_blocks32(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BLOCK32 activation quantization (llama.cpp's Q8_0 rule, f32 scales): per block of 32,
    ``d = absmax / 127``, ``q = clamp(round_half_even(x · (127 / absmax)), -128, 127)`` (``x ·
    127/absmax`` in float32; an all-zero block: ``d = 0``, ``q = 0``). ``(q int8 [T, K],
    d f32 [T, K/32])``; ``K`` a multiple of 32."""
    x = np.asarray(x, dtype=np.float32)
    blocks = x.reshape(x.shape[0], -1, 32)
    absmax = np.abs(blocks).max(axis=-1)  # [T, K/32]
    d = (absmax / np.float32(ACT_QMAX)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(absmax > 0, np.float32(ACT_QMAX) / absmax, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(blocks * inv[..., None]), -128, 127).astype(np.int8)
    return q.reshape(x.shape), d


def tree16(v: np.ndarray) -> np.ndarray:
    """Sum of the 16 lanes on the last axis in the kernels' fixed order: lanes ``i + 8``, then
    ``i + 4``, ``i + 2``, ``i + 1`` folded onto lane ``i`` (float32 at every step)."""
    for half in (8, 4, 2, 1):
        v = v[..., :half] + v[..., half : 2 * half]
    out: np.ndarray = v[..., 0]
    return out


def bitlinear_blocked(
    x: np.ndarray,
    codes: np.ndarray,
    scales: np.ndarray,
    group: int,
    act_quant: str,
    out_scale: float = 1.0,
    rows_per_step: int = 64,
) -> np.ndarray:
    """The blocked bitlinear (``bitserve.kernels.tensors``), every float operation as the
    kernels do it. ``x [T, K]``; ``codes uint8 [N, K]`` (weight + 1, natural order); ``scales
    [N, K/group]`` (f16 values). Per super-block ``u`` of 256 weights and lane ``L`` of 16:

        P[t,n,u,L] = Σ_{i<16} c[n, 256u+16L+i] · q[t, 256u+16L+i] - (L even) · Σ_{32-block} q
        per_token: term = d[L] · float(P),              y = tree16(Σ_u term) / s[t]
        block32:   term = d[L] · (float(P) · a[t, L/2]),  y = tree16(Σ_u term)
        then y · out_scale

    with ``Σ_u`` a float32 running sum from 0 in order of ``u`` (no FMA) and ``d[L]`` the scale
    of lane L's group. ``P`` is exact, so only the float steps need matching.
    """
    n_tok, k = x.shape
    n_super = -(-k // 256)
    kp = n_super * 256
    xp = np.zeros((n_tok, kp), dtype=np.float32)
    xp[:, :k] = x
    if act_quant == "per_token":
        q, s = quantize_activations(x)
        qp = np.zeros((n_tok, kp), dtype=np.int8)
        qp[:, :k] = q
    else:
        qp, a = quantize_blocks32(xp)
        a_lane = np.repeat(a.reshape(n_tok, n_super, 8), 2, axis=2)  # [T, S, 16]
    qq = qp.reshape(n_tok, n_super, 16, 16).astype(np.int64)
    corr = np.zeros((n_tok, n_super, 16), dtype=np.int64)
    corr[:, :, 0::2] = qp.reshape(n_tok, n_super, 8, 32).astype(np.int64).sum(axis=-1)
    n_out = codes.shape[0]
    cp = np.zeros((n_out, kp), dtype=np.int64)
    cp[:, :k] = codes
    lane_group = (np.arange(kp).reshape(n_super, 16, 16)[:, :, 0] // group).reshape(-1)
    sp = np.zeros((n_out, kp // group), dtype=np.float32)
    sp[:, : scales.shape[1]] = scales
    d_lane = sp[:, lane_group].reshape(n_out, n_super, 16)  # [N, S, 16]
    y = np.empty((n_tok, n_out), dtype=np.float32)
    for lo in range(0, n_out, rows_per_step):
        hi = min(lo + rows_per_step, n_out)
        cc = cp[lo:hi].reshape(hi - lo, n_super, 16, 16)
        p = (np.einsum("tuli,nuli->tnul", qq, cc) - corr[:, None]).astype(np.float32)
        if act_quant == "per_token":
            term = d_lane[None, lo:hi] * p
        else:
            term = d_lane[None, lo:hi] * (p * a_lane[:, None])
        acc = np.zeros((n_tok, hi - lo, 16), dtype=np.float32)
        for u in range(n_super):
            acc = acc + term[:, :, u]
        y[:, lo:hi] = tree16(acc)
    if act_quant == "per_token":
        y = (y / s[:, None]).astype(np.float32)
    out: np.ndarray = (y * np.float32(out_scale)).astype(np.float32)
    return out


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


def silu(x: np.ndarray) -> np.ndarray:
    """``x / (1 + exp(-x))`` in float32 (``exp`` overflowing to inf gives -0: the true value
    underflows too). Not the tanh form ``x·(1 + tanh(x/2))/2``, whose ``1 + tanh`` cancels for
    negative x (0.2% off at x = -20)."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore"):
        out: np.ndarray = x / (np.float32(1) + np.exp(-x))
    return out


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """The SwiGLU gate of llama/qwen3 families: ``silu(gate) * up`` in float32, elementwise."""
    out: np.ndarray = silu(np.asarray(gate, dtype=np.float32)) * up
    return out


def rope_neox(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """NEOX ("rotate-half") RoPE: rotate pairs ``(i, i + D/2)`` of ``x [T, H, D]`` by the
    angles of its positions, ``cos``/``sin [T, D/2]``. Returns a new ``[T, H, D]`` array."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # [T, H, D/2] each
    c, s = cos[:, None, :], sin[:, None, :]  # [T, 1, D/2]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
