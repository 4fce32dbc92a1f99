"""A deliberately naive float64 reading of a ternary GGUF of any family, for parity tests.

Independent of bitserve's model code (``bitserve.model`` is never imported): it reads the
file with bitserve's GGUF reader, dequantizes TQ1_0/TQ2_0/Q8_0/Q6_K/BF16 with the PyPI
``gguf`` package, I2_S with bitserve's unpack (``gguf`` cannot read type 36) and Q2_0 with
its own loop over ggml's ``dequantize_row_q2_0`` (``gguf`` has no Q2_0), and follows
llama.cpp's graphs with its own table of what each architecture does. Activations going
into a ternary matrix are quantized as its model was trained: per token (absmax int8,
BitNet) or, for Q2_0 (Ternary-Bonsai), per block of 32 as llama.cpp's Q8_0 path does.
Above all, it applies RoPE to q/k *as the file stores them*: llama.cpp's NORM RoPE
(adjacent pairs) for ``llama``/``minicpm``, NEOX (rotate-half) for the others, so the
model's un-permutation at load is checked, not assumed. Loops and float64 everywhere; its
own int8 quantization (``np.round``: half to even) and attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from bitserve.gguf.quants import unpack_i2s
from bitserve.gguf.reader import read_gguf

# arch -> (activation or None: by vocabulary, sub-norms, q/k norms, NEOX RoPE, MiniCPM scales)
NAIVE_ARCHS: dict[str, tuple[str | None, bool, bool, bool, bool]] = {
    "bitnet-b1.58": ("relu2", True, False, True, False),
    "bitnet-25": ("relu2", True, False, True, False),
    "bitnet": (None, True, False, True, False),
    "llama": ("silu", False, False, False, False),
    "qwen3": ("silu", False, True, True, False),
    "minicpm": ("silu", False, False, False, True),
}


TERNARY = ("I2_S", "TQ1_0", "TQ2_0", "Q2_0")


@dataclass
class NaiveModel:
    arch: str
    hp: dict[str, Any]  # hyper-parameters straight from the metadata (no prefix)
    tensors: dict[str, np.ndarray]  # float64; ternary matrices dequantized ([out, in])
    types: dict[str, str]  # tensor name -> GGML type name


def dequantize_q2_0(raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """ggml's dequantize_row_q2_0, one block at a time: an f16 scale ``d``, then the codes;
    weight ``j`` is bits ``2(j % 4)`` of byte ``j / 4``, value ``(code - 1) · d``. Blocks of
    64 (18 bytes), or 128 (34 bytes) in PrismML's early files: told apart by the size."""
    size = 64 if len(raw) == rows * cols // 64 * 18 else 128
    blocks = np.asarray(raw, dtype=np.uint8).reshape(-1, 2 + size // 4)
    out = np.empty((len(blocks), size))
    for b, block in enumerate(blocks):
        d = float(block[:2].view("<f2")[0])
        for j in range(size):
            out[b, j] = (((int(block[2 + j // 4]) >> (2 * (j % 4))) & 3) - 1) * d
    return out.reshape(rows, cols)


def _dequantized(g: Any, name: str) -> np.ndarray:
    info = g.tensors[name]
    rows, cols = info.shape if len(info.shape) == 2 else (1, info.shape[0])
    kind = info.ggml_type.name
    if kind == "I2_S":
        codes, scale = unpack_i2s(g.raw(name), rows, cols)
        return codes.astype(np.float64) * scale
    if kind == "Q2_0":
        return dequantize_q2_0(g.raw(name), rows, cols)
    if kind in ("TQ1_0", "TQ2_0", "Q8_0", "Q6_K", "BF16"):
        raw = np.asarray(g.raw(name)).reshape(rows, -1)
        out = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind])
        return out.astype(np.float64).reshape(rows, cols)
    return np.array(g.array(name), dtype=np.float64).reshape(info.shape)


def naive_load(path: Path) -> NaiveModel:
    with read_gguf(path) as g:
        arch = g.metadata["general.architecture"]
        prefix = f"{arch}."
        hp = {k[len(prefix) :]: v for k, v in g.metadata.items() if k.startswith(prefix)}
        tensors = {name: _dequantized(g, name) for name in g.tensors}
        types = {name: info.ggml_type.name for name, info in g.tensors.items()}
    return NaiveModel(arch, hp, tensors, types)


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    out = np.empty_like(x)
    for t in range(x.shape[0]):
        out[t] = x[t] / np.sqrt(np.mean(x[t] ** 2) + eps) * w
    return out


def quantized(x: np.ndarray, block: int | None) -> np.ndarray:
    """``x [in]`` as int8 activations see it: absmax per token (``block`` None) or per
    ``block`` values (an all-zero block stays zero), rounded half to even."""
    out = np.empty_like(x)
    size = block or len(x)
    for lo in range(0, len(x), size):
        part = x[lo : lo + size]
        peak = np.max(np.abs(part))
        if block is None:
            peak = max(peak, 1e-5)
        elif peak == 0:
            out[lo : lo + size] = 0
            continue
        s = 127.0 / peak
        out[lo : lo + size] = np.clip(np.round(part * s), -128, 127) / s
    return out


def bitlinear(x: np.ndarray, w: np.ndarray, block: int | None = None) -> np.ndarray:
    """Quantized activations (:func:`quantized`) times the dequantized weight ``[out, in]``."""
    return np.stack([w @ quantized(x[t], block) for t in range(x.shape[0])])


def rope(x: np.ndarray, start: int, theta: float, neox: bool) -> np.ndarray:
    """``x [T, H, D]`` at positions start..; NEOX pairs (i, i+D/2), NORM pairs (2i, 2i+1)."""
    n_tokens, n_heads, d = x.shape
    out = x.copy()
    for t in range(n_tokens):
        for h in range(n_heads):
            for i in range(d // 2):
                angle = (start + t) * theta ** (-2.0 * i / d)
                a, b = (i, i + d // 2) if neox else (2 * i, 2 * i + 1)
                c, s = np.cos(angle), np.sin(angle)
                out[t, h, a] = x[t, h, a] * c - x[t, h, b] * s
                out[t, h, b] = x[t, h, b] * c + x[t, h, a] * s
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Causal attention, query head h reads KV head h // (H / KVH)."""
    n_tokens, n_heads, d = q.shape
    group = n_heads // k.shape[1]
    out = np.zeros((n_tokens, n_heads, v.shape[2]))
    for t in range(n_tokens):
        for h in range(n_heads):
            scores = np.array([q[t, h] @ k[j, h // group] for j in range(t + 1)]) / np.sqrt(d)
            p = np.exp(scores - scores.max())
            p /= p.sum()
            out[t, h] = sum(p[j] * v[j, h // group] for j in range(t + 1))
    return out


def act_block(m: NaiveModel, name: str) -> int | None:
    """How activations going into ternary tensor ``name`` are quantized: Q2_0 (Ternary-
    Bonsai, float-activation training) per 32 as llama.cpp's Q8_0 path; BitNet per token."""
    return 32 if m.types[name] == "Q2_0" else None


def activation_of(m: NaiveModel) -> str:
    fixed = NAIVE_ARCHS[m.arch][0]
    if fixed is not None:
        return fixed
    return "relu2" if m.tensors["token_embd.weight"].shape[0] == 128256 else "silu"


def naive_forward(m: NaiveModel, tokens: list[int], activation: str | None = None) -> np.ndarray:
    """Logits ``[T, vocab]`` (float64) of ``tokens`` from an empty context."""
    _, sub_norms, qk_norm, neox, scaled = NAIVE_ARCHS[m.arch]
    act = activation or activation_of(m)
    hp, n = m.hp, len(tokens)
    n_heads, n_kv = int(hp["attention.head_count"]), int(hp["attention.head_count_kv"])
    d = int(hp.get("attention.key_length", int(hp["embedding_length"]) // n_heads))
    eps, theta = float(hp["attention.layer_norm_rms_epsilon"]), float(hp["rope.freq_base"])
    res_scale = float(hp["residual_scale"]) if scaled else 1.0
    x = m.tensors["token_embd.weight"][tokens]
    if scaled:
        x = x * float(hp["embedding_scale"])
    for layer in range(int(hp["block_count"])):

        def w(name: str, layer: int = layer) -> np.ndarray:
            return m.tensors[f"blk.{layer}.{name}.weight"]

        def lin(x: np.ndarray, name: str, layer: int = layer) -> np.ndarray:
            y = bitlinear(x, w(name), act_block(m, f"blk.{layer}.{name}.weight"))
            scale = m.tensors.get(f"blk.{layer}.{name}.scale")  # upstream bitnet
            return y * scale[0] if scale is not None else y

        h = rmsnorm(x, w("attn_norm"), eps)
        q = lin(h, "attn_q").reshape(n, n_heads, d)
        k = lin(h, "attn_k").reshape(n, n_kv, d)
        v = lin(h, "attn_v").reshape(n, n_kv, d)
        if qk_norm:
            q = rmsnorm(q.reshape(n * n_heads, d), w("attn_q_norm"), eps).reshape(q.shape)
            k = rmsnorm(k.reshape(n * n_kv, d), w("attn_k_norm"), eps).reshape(k.shape)
        q, k = rope(q, 0, theta, neox), rope(k, 0, theta, neox)
        a = attention(q, k, v).reshape(n, n_heads * d)
        if sub_norms:
            a = rmsnorm(a, w("attn_sub_norm"), eps)
        x = x + lin(a, "attn_output") * res_scale
        h = rmsnorm(x, w("ffn_norm"), eps)
        gate, up = lin(h, "ffn_gate"), lin(h, "ffn_up")
        f = (np.maximum(gate, 0) ** 2 if act == "relu2" else gate / (1 + np.exp(-gate))) * up
        if sub_norms:
            f = rmsnorm(f, w("ffn_sub_norm"), eps)
        x = x + lin(f, "ffn_down") * res_scale
    head = "output.weight" if "output.weight" in m.tensors else "token_embd.weight"
    h = rmsnorm(x, m.tensors["output_norm.weight"], eps)
    if m.types[head] in TERNARY:  # a ternary head is a ternary matmul (Ternary-Bonsai)
        logits = bitlinear(h, m.tensors[head], act_block(m, head))
    else:  # float and int8 heads take the activations as they are
        logits = h @ m.tensors[head].T
    return logits / float(hp["logit_scale"]) if scaled else logits


def compare(logits: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(fraction of positions with the same argmax, relative L2 of the difference)."""
    agreement = float(np.mean(logits.argmax(axis=-1) == reference.argmax(axis=-1)))
    rel_l2 = float(np.linalg.norm(logits - reference) / np.linalg.norm(reference))
    return agreement, rel_l2
