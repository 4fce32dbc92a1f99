"""The weights of a BitNet b1.58 model as zero-copy views of the GGUF memory map (spec §3).

Every tensor is checked for presence, type and shape against the :class:`ModelConfig`
before any is used, so a bad file fails at load with the tensor's name, never later in a
matmul. Ternary projections stay in I2_S layout (``TernaryWeight``); TQ1_0/TQ2_0 tensors
are repacked to I2_S at load (a copy) by ``bitserve.gguf.quants.repack_to_i2s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bitserve.gguf.constants import GGMLType
from bitserve.gguf.quants import i2s_scale, repack_to_i2s
from bitserve.gguf.reader import GGUFError, GGUFFile
from bitserve.kernels.backend import TernaryWeight
from bitserve.model.config import ModelConfig

FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
TERNARY_TYPES = (GGMLType.I2_S, GGMLType.TQ1_0, GGMLType.TQ2_0)


@dataclass(frozen=True, slots=True)
class LayerWeights:
    """One transformer block. Norms are float32 ``[dim]`` (``ffn_sub_norm``: ``[ffn_dim]``);
    projections are ternary ``[n_out, n_in]``: q/o ``dim→dim``, k/v ``dim→kv_dim``,
    gate/up ``dim→ffn_dim``, down ``ffn_dim→dim``."""

    attn_norm: np.ndarray
    attn_sub_norm: np.ndarray
    ffn_norm: np.ndarray
    ffn_sub_norm: np.ndarray
    attn_q: TernaryWeight
    attn_k: TernaryWeight
    attn_v: TernaryWeight
    attn_output: TernaryWeight
    ffn_gate: TernaryWeight
    ffn_up: TernaryWeight
    ffn_down: TernaryWeight


@dataclass(frozen=True, slots=True)
class ModelWeights:
    """All weights. ``token_embd`` ``[vocab, dim]`` is F16/F32 (BF16 widened to float32);
    ``output`` is the untied LM head ``[vocab, dim]`` or ``None`` (tied to ``token_embd``)."""

    layers: tuple[LayerWeights, ...]
    token_embd: np.ndarray
    output_norm: np.ndarray
    output: np.ndarray | None

    @property
    def head(self) -> np.ndarray:
        """The matrix the LM head multiplies by: ``[vocab, dim]``."""
        return self.token_embd if self.output is None else self.output

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, config: ModelConfig) -> ModelWeights:
        """Views of every tensor of ``gguf``, checked against ``config`` (raises ``GGUFError``)."""
        layers = tuple(_layer(gguf, config, i) for i in range(config.n_layers))
        vocab_dim = (config.vocab_size, config.dim)
        output = None
        if "output.weight" in gguf.tensors:
            output = _float_tensor(gguf, "output.weight", vocab_dim, (GGMLType.F32, GGMLType.F16))
        return cls(
            layers=layers,
            token_embd=_float_tensor(gguf, "token_embd.weight", vocab_dim, FLOAT_TYPES),
            output_norm=_norm(gguf, "output_norm.weight", config.dim),
            output=output,
        )


def _layer(gguf: GGUFFile, config: ModelConfig, i: int) -> LayerWeights:
    dim, ffn, kv = config.dim, config.ffn_dim, config.kv_dim

    def proj(name: str, n_out: int, n_in: int) -> TernaryWeight:
        return _ternary(gguf, f"blk.{i}.{name}.weight", n_out, n_in)

    def norm(name: str, width: int) -> np.ndarray:
        return _norm(gguf, f"blk.{i}.{name}.weight", width)

    return LayerWeights(
        attn_norm=norm("attn_norm", dim),
        attn_sub_norm=norm("attn_sub_norm", dim),
        ffn_norm=norm("ffn_norm", dim),
        ffn_sub_norm=norm("ffn_sub_norm", ffn),
        attn_q=proj("attn_q", dim, dim),
        attn_k=proj("attn_k", kv, dim),
        attn_v=proj("attn_v", kv, dim),
        attn_output=proj("attn_output", dim, dim),
        ffn_gate=proj("ffn_gate", ffn, dim),
        ffn_up=proj("ffn_up", ffn, dim),
        ffn_down=proj("ffn_down", dim, ffn),
    )


def _check(
    gguf: GGUFFile, name: str, shape: tuple[int, ...], types: tuple[GGMLType, ...]
) -> GGMLType:
    """The tensor's type, after checking it exists with numpy ``shape`` and one of ``types``."""
    info = gguf.tensor_info(name)  # raises GGUFError "missing tensor 'name'"
    if info.shape != shape:
        raise GGUFError(
            gguf.path, f"tensor {name!r} has shape {info.shape}, expected {shape} from the config"
        )
    if info.ggml_type not in types:
        allowed = ", ".join(t.name for t in types)
        raise GGUFError(
            gguf.path, f"tensor {name!r} is {info.ggml_type.name}; expected one of {allowed}"
        )
    return info.ggml_type


def _norm(gguf: GGUFFile, name: str, width: int) -> np.ndarray:
    """A norm weight as float32 ``[width]`` (a small copy when the file stores F16/BF16)."""
    _check(gguf, name, (width,), FLOAT_TYPES)
    return np.ascontiguousarray(gguf.array(name), dtype=np.float32)


def _float_tensor(
    gguf: GGUFFile, name: str, shape: tuple[int, int], types: tuple[GGMLType, ...]
) -> np.ndarray:
    """An F32/F16 matrix as a zero-copy view (BF16: widened to a float32 copy)."""
    _check(gguf, name, shape, types)
    return gguf.array(name)


def _ternary(gguf: GGUFFile, name: str, n_out: int, n_in: int) -> TernaryWeight:
    """A projection ``[n_out, n_in]`` in I2_S layout: zero copy, or repacked from TQ1_0/TQ2_0."""
    ggml_type = _check(gguf, name, (n_out, n_in), TERNARY_TYPES)
    raw = gguf.raw(name)
    if ggml_type == GGMLType.I2_S:
        return TernaryWeight(raw, n_out, n_in, i2s_scale(raw, n_out, n_in))
    i2s_raw, scale = repack_to_i2s(raw, ggml_type, n_out, n_in, path=gguf.path, name=name)
    return TernaryWeight(i2s_raw, n_out, n_in, scale)
