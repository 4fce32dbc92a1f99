"""What differs between the ternary model families, written down once as data.

One forward pass (``bitserve.model.bitnet``) serves every family; an :class:`Architecture`
says which of its optional parts a GGUF ``general.architecture`` uses. Nothing else in
the forward, the engine, the kernels or the API asks which family a model is (the chat
formatter gives ``bitnet-*`` files the 2B-4T chat format, spec §6). Every fact below was
checked against llama.cpp (``llama-arch.cpp``, ``llama-model.cpp``,
``convert_hf_to_gguf.py``) and bitnet.cpp's converter
(``utils/convert-hf-to-gguf-bitnet.py``):

- ``bitnet-b1.58`` / ``bitnet-25``: Microsoft's BitNet-b1.58-2B-4T (spec §3-4): squared
  ReLU, sub-norms before ``o_proj`` and ``down_proj``, NEOX RoPE, tied head.
- ``bitnet``: upstream llama.cpp's name for the 1bitLLM reproductions (LLaMA-2 vocabulary,
  SiLU) and for its own conversions of 2B-4T (squared ReLU): the activation comes from a
  ``hidden_act`` key, else the vocabulary rule of spec §4. Sub-norms, NEOX RoPE; a head
  tied unless ``output.weight`` exists; optional per-projection ``.scale`` tensors.
- ``llama``: Falcon3-*-1.58bit, Falcon-E, Llama3-8B-1.58: SwiGLU, no sub-norms (neither
  converter writes them, and llama.cpp's llama graph would refuse the extra tensors),
  llama.cpp's NORM RoPE on q/k rows that the converters permuted for it.
- ``qwen3``: Ternary-Bonsai: SwiGLU, per-head RMSNorm of q and k before RoPE, NEOX RoPE,
  ``key_length`` heads whose total may differ from the width.
- ``minicpm``: BitCPM4: the llama layout plus MiniCPM's embedding, residual and logit
  scales (``minicpm.embedding_scale``, ``.residual_scale``, ``.logit_scale``).

RoPE: llama.cpp's "NORM" RoPE rotates adjacent pairs ``(2i, 2i+1)``; the HF→GGUF
converters permute the q and k rows of each head so that NORM RoPE on the file equals
the NEOX (rotate-half) RoPE the model was trained with. bitserve undoes that permutation
at load (:func:`unpermute_rows`) and runs NEOX RoPE for every family: one RoPE kernel, and
q/k in the layout the model was trained in. The permutation moves whole rows, which
never share a block in any ternary format, so it costs one copy of q and k at load.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Architecture:
    """The optional parts of the forward pass one GGUF architecture uses.

    ``activation``: ``"relu2"`` or ``"silu"``, or ``None`` to read it from the file
    (``bitnet``). ``sub_norms``: RMSNorm before ``o_proj`` and ``down_proj``
    (``attn_sub_norm``, ``ffn_sub_norm``). ``qk_norm``: per-head RMSNorm of q and k before
    RoPE (``attn_q_norm``, ``attn_k_norm``, ``[head_dim]``). ``permuted_qk``: the file's q/k
    rows are in llama.cpp's NORM-RoPE order and are put back at load. ``scaled``: the
    MiniCPM embedding/residual/logit scale keys are read (all three required).
    ``projection_scales``: optional ``blk.N.<proj>.scale`` tensors (one F32) multiply a
    projection's output.
    """

    name: str
    family: str
    activation: str | None
    sub_norms: bool = False
    qk_norm: bool = False
    permuted_qk: bool = False
    scaled: bool = False
    projection_scales: bool = False

    @property
    def norms(self) -> tuple[str, ...]:
        """The RMSNorm weights of one block (``blk.N.<name>.weight``), in the order of the
        official 2B-4T file."""
        if self.sub_norms:
            names = ["attn_norm", "attn_sub_norm", "ffn_norm", "ffn_sub_norm"]
        else:
            names = ["attn_norm", "ffn_norm"]
        if self.qk_norm:
            names += ["attn_q_norm", "attn_k_norm"]
        return tuple(names)


_BITNET_2B4T = "BitNet b1.58 2B-4T (Microsoft)"

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("bitnet-b1.58", _BITNET_2B4T, "relu2", sub_norms=True),
        Architecture("bitnet-25", _BITNET_2B4T, "relu2", sub_norms=True),
        Architecture(
            "bitnet",
            "BitNet b1.58 (1bitLLM, upstream llama.cpp conversions)",
            None,
            sub_norms=True,
            projection_scales=True,
        ),
        Architecture(
            "llama",
            "LLaMA-shaped 1.58-bit (Falcon3, Falcon-E, Llama3-8B-1.58)",
            "silu",
            permuted_qk=True,
        ),
        Architecture("qwen3", "Qwen3-shaped ternary (Ternary-Bonsai)", "silu", qk_norm=True),
        Architecture(
            "minicpm", "MiniCPM-shaped ternary (BitCPM4)", "silu", permuted_qk=True, scaled=True
        ),
    )
}

SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)

# the ternary projections of one block, and the LM-head side, in llama.cpp's tensor names
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def projection_shapes(
    dim: int, ffn_dim: int, q_dim: int, kv_dim: int
) -> dict[str, tuple[int, int]]:
    """``(n_out, n_in)`` of each ternary projection of a block, by :data:`PROJECTIONS`
    name: q ``dim→q_dim``, k/v ``dim→kv_dim``, o ``q_dim→dim``, gate/up ``dim→ffn_dim``,
    down ``ffn_dim→dim``."""
    shapes = ((q_dim, dim), (kv_dim, dim), (kv_dim, dim), (dim, q_dim),
              (ffn_dim, dim), (ffn_dim, dim), (dim, ffn_dim))  # fmt: skip
    return dict(zip(PROJECTIONS, shapes, strict=True))


def unpermute_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """The row order that undoes llama.cpp's converter permutation of a q or k weight.

    The converter stores row ``h·D + 2j + p`` of head ``h`` from the trained row
    ``h·D + p·D/2 + j`` (``p`` 0 or 1, ``j < D/2``), so that NORM RoPE's adjacent pairs
    are the trained rotate-half pairs. ``W_file[order]`` is the trained matrix: NEOX RoPE
    on it equals NORM RoPE on the file, pair for pair and angle for angle.
    """
    head_dim = n_rows // n_heads
    if n_heads * head_dim != n_rows or head_dim % 2:
        raise ValueError(f"{n_rows} rows do not split into {n_heads} heads of even size")
    order: np.ndarray = np.arange(n_rows).reshape(n_heads, head_dim // 2, 2).transpose(0, 2, 1)
    return order.reshape(-1)


def permute_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """The row order llama.cpp's converter stores a q or k weight in (``W_file =
    W_trained[order]``: within each head, rows ``[0, D/2, 1, D/2 + 1, ...]``), the inverse
    of :func:`unpermute_rows`; ``bitserve convert`` and the synthetic files write it."""
    order: np.ndarray = np.argsort(unpermute_rows(n_rows, n_heads))
    return order
