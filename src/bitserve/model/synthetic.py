"""Random BitNet b1.58 GGUF files of any shape: test fixtures, the demo model, the bench model.

The files are laid out exactly like Microsoft's ``ggml-model-i2_s.gguf`` (spec §3): I2_S
projections with one scale per tensor, F32 norms, an F16 tied embedding, no biases.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bitserve.gguf.constants import GGMLType
from bitserve.gguf.quants import pack_i2s
from bitserve.gguf.writer import GGUFWriter


@dataclass(frozen=True, slots=True)
class ModelShape:
    n_layers: int
    dim: int
    ffn_dim: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    context_length: int = 4096
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5


# the shapes of BitNet-b1.58-2B-4T (spec §3)
SHAPE_2B4T = ModelShape(
    n_layers=30, dim=2560, ffn_dim=6912, n_heads=20, n_kv_heads=5, vocab_size=128256
)

LAYER_NORMS = ("attn_norm", "attn_sub_norm", "ffn_norm", "ffn_sub_norm")


def layer_projections(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """Name → (n_out, n_in) of each ternary projection of one layer."""
    kv_dim = shape.n_kv_heads * (shape.dim // shape.n_heads)
    return {
        "attn_q": (shape.dim, shape.dim),
        "attn_k": (kv_dim, shape.dim),
        "attn_v": (kv_dim, shape.dim),
        "attn_output": (shape.dim, shape.dim),
        "ffn_gate": (shape.ffn_dim, shape.dim),
        "ffn_up": (shape.ffn_dim, shape.dim),
        "ffn_down": (shape.dim, shape.ffn_dim),
    }


def write_synthetic_model(
    path: str | Path,
    shape: ModelShape,
    seed: int = 0,
    arch: str = "bitnet-b1.58",
    tokenizer_metadata: dict[str, Any] | None = None,
    extra_metadata: dict[str, Any] | None = None,
    name: str = "synthetic BitNet b1.58 (random weights)",
) -> Path:
    """Write a random model with ``shape`` to ``path`` (deterministic for a given seed)."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter()
    w.add("general.architecture", arch)
    w.add("general.name", name)
    w.add("general.file_type", 40)
    head_dim = shape.dim // shape.n_heads
    for key, value in {
        "vocab_size": shape.vocab_size,
        "context_length": shape.context_length,
        "embedding_length": shape.dim,
        "feed_forward_length": shape.ffn_dim,
        "block_count": shape.n_layers,
        "attention.head_count": shape.n_heads,
        "attention.head_count_kv": shape.n_kv_heads,
        "rope.dimension_count": head_dim,
        "rope.freq_base": float(shape.rope_theta),
        "attention.layer_norm_rms_epsilon": float(shape.norm_eps),
    }.items():
        w.add(f"{arch}.{key}", value)
    for key, value in (tokenizer_metadata or {}).items():
        w.add(key, value)
    for key, value in (extra_metadata or {}).items():
        w.add(key, value)

    embedding = rng.standard_normal((shape.vocab_size, shape.dim), dtype=np.float32)
    w.add_array("token_embd.weight", embedding.astype(np.float16))
    del embedding
    for layer in range(shape.n_layers):
        for norm in LAYER_NORMS:
            width = shape.ffn_dim if norm == "ffn_sub_norm" else shape.dim
            weight = (1.0 + 0.1 * rng.standard_normal(width)).astype(np.float32)
            w.add_array(f"blk.{layer}.{norm}.weight", weight)
        for proj, (n_out, n_in) in layer_projections(shape).items():
            ternary = rng.integers(-1, 2, size=(n_out, n_in), dtype=np.int8)
            scale = float(rng.uniform(0.5, 2.0))
            w.add_tensor(
                f"blk.{layer}.{proj}.weight", pack_i2s(ternary, scale), GGMLType.I2_S, (n_in, n_out)
            )
    w.add_array(
        "output_norm.weight", (1.0 + 0.1 * rng.standard_normal(shape.dim)).astype(np.float32)
    )
    w.write(path)
    return Path(path)
