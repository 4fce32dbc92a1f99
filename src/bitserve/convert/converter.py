"""Hugging Face ternary checkpoints → one GGUF file bitserve serves.

Two layouts, chosen by ``config.json``'s ``architectures``:

- ``BitNetForCausalLM`` (microsoft/bitnet-b1.58-2B-4T and its ``-bf16`` master weights):
  written as the official GGUF is (spec §3): arch ``bitnet-b1.58``, sub-norms, tied head,
  q/k rows in Hugging Face order (its RoPE rotates halves, as bitserve's does).
- ``LlamaForCausalLM`` with a ``bitnet`` quantization config (Falcon3-*-1.58bit,
  Llama3-8B-1.58): arch ``llama`` as llama.cpp's converter writes it, q/k rows permuted
  for its adjacent-pair RoPE, untied ``output.weight`` unless the config ties it.

Projections become I2_S (one scale per tensor) or TQ2_0 (per-row scales); the
embedding and head are F16 (F32 if a value overflows F16), norms F32.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bitserve.convert.checkpoint import Checkpoint, CheckpointError
from bitserve.convert.ternary import absmean_ternary, ternary_from_floats, unpack_hf_ternary
from bitserve.convert.tokenizer_json import tokenizer_metadata
from bitserve.gguf.constants import TQ_BLOCK, GGMLType
from bitserve.gguf.quants import pack_i2s, pack_tq2_0
from bitserve.gguf.writer import GGUFWriter
from bitserve.model.arch import permute_rows, projection_shapes
from bitserve.model.config import ACTIVATIONS

PROJECTIONS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
LAYER_NORMS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.attn_sub_norm": "attn_sub_norm",
    "mlp.ffn_sub_norm": "ffn_sub_norm",
}
FILE_TYPE_I2_S = 40  # general.file_type of bitnet.cpp's I2_S files
FILE_TYPE_TQ2_0 = 37  # llama.cpp's LLAMA_FTYPE_MOSTLY_TQ2_0
_F16_MAX = 65504.0


_ACTIVATION = {"relu2": "relu2", "silu": "silu", "swish": "silu"}  # HF name -> the forward's


@dataclass(frozen=True, slots=True)
class Layout:
    """How one Hugging Face architecture maps onto GGUF."""

    hf_arch: str
    gguf_arch: str
    sub_norms: bool
    permute_qk: bool  # llama.cpp's row order for adjacent-pair ("normal") RoPE
    default_act: str
    tied_by_default: bool
    # without a quantization_config the projections are master weights, quantized here
    # (BitNet's -bf16 checkpoint); an architecture without this is not ternary then
    master_weights: bool


LAYOUTS = {
    "BitNetForCausalLM": Layout(
        "BitNetForCausalLM", "bitnet-b1.58", True, False, "relu2", True, master_weights=True
    ),
    "LlamaForCausalLM": Layout(
        "LlamaForCausalLM", "llama", False, True, "silu", False, master_weights=False
    ),
}


@dataclass(frozen=True, slots=True)
class HParams:
    n_layers: int
    dim: int
    ffn_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    rope_theta: float
    norm_eps: float
    activation: str
    tied: bool

    @classmethod
    def from_config(cls, config: dict[str, Any], layout: Layout, has_lm_head: bool) -> HParams:
        scaling = config.get("rope_scaling")
        if scaling is not None and not isinstance(scaling, dict):
            raise CheckpointError(f"config.json: rope_scaling must be an object, not {scaling!r}")
        if scaling and _number(scaling, "factor", 1.0, "rope_scaling.factor") != 1.0:
            raise CheckpointError(f"config.json: rope_scaling {scaling} is not supported")
        n_heads = _positive_int(config, "num_attention_heads")
        dim = _positive_int(config, "hidden_size")
        n_kv_heads = _positive_int(config, "num_key_value_heads", n_heads)
        if n_heads % n_kv_heads:
            raise CheckpointError(
                f"config.json: num_attention_heads {n_heads} is not a multiple of "
                f"num_key_value_heads {n_kv_heads}"
            )
        act = config.get("hidden_act", layout.default_act)
        activation = _ACTIVATION.get(act) if isinstance(act, str) else None
        if activation not in ACTIVATIONS:  # the loader would refuse the file
            raise CheckpointError(f"config.json: hidden_act {act!r} is not relu2 or silu")
        tied = bool(config.get("tie_word_embeddings", layout.tied_by_default)) or not has_lm_head
        return cls(
            n_layers=_positive_int(config, "num_hidden_layers"),
            dim=dim,
            ffn_dim=_positive_int(config, "intermediate_size"),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=_positive_int(config, "head_dim", dim // n_heads),
            vocab_size=_positive_int(config, "vocab_size"),
            context_length=_positive_int(config, "max_position_embeddings", 4096),
            rope_theta=_number(config, "rope_theta", 10000.0),
            norm_eps=_number(config, "rms_norm_eps", 1e-5),
            activation=activation,
            tied=tied,
        )


def _positive_int(config: dict[str, Any], key: str, default: int | None = None) -> int:
    """``config[key]``, a positive integer; ``default`` where it is absent or null."""
    value = config.get(key)
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"config.json: {key} must be a positive integer, not {value!r}")
    return value


def _number(config: dict[str, Any], key: str, default: float, name: str = "") -> float:
    """``config[key]``, a positive finite number; ``default`` where it is absent or null."""
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise CheckpointError(
            f"config.json: {name or key} must be a positive number, not {value!r}"
        )
    return float(value)


@dataclass(frozen=True, slots=True)
class QuantScheme:
    """How the checkpoint's projections hold their ternary weights."""

    online: bool  # bf16 master weights, quantized here as training did
    scale_multiplies: bool  # AutoBitLinear offline: W = t * weight_scale (else t / weight_scale)

    @classmethod
    def from_config(cls, config: dict[str, Any], layout: Layout) -> QuantScheme:
        quant = config.get("quantization_config")
        if quant is None:
            if not layout.master_weights:
                raise CheckpointError(
                    f"config.json has no bitnet quantization_config: this {layout.hf_arch} "
                    "checkpoint is not ternary, and bitserve serves ternary models only"
                )
            return cls(online=True, scale_multiplies=False)  # BitNet master weights
        if quant.get("quant_method") != "bitnet":
            raise CheckpointError(
                f"quantization_config.quant_method is {quant.get('quant_method')!r}, not 'bitnet'"
            )
        if quant.get("use_rms_norm"):
            raise CheckpointError("BitLinear layers with their own RMSNorm are not supported")
        linear = quant.get("linear_class", "bitlinear")
        mode = quant.get("quantization_mode", "offline")
        return cls(online=mode == "online", scale_multiplies=linear == "autobitlinear")


@dataclass(frozen=True, slots=True)
class ConvertReport:
    path: Path
    arch: str
    n_i2s: int
    n_tq2_0: int
    n_tensors: int


def convert_checkpoint(
    checkpoint: Checkpoint,
    out: Path,
    *,
    name: str | None = None,
    notify: Callable[[str], None] = lambda _msg: None,
) -> ConvertReport:
    """Write ``checkpoint`` as a GGUF file at ``out`` (atomically)."""
    config = checkpoint.config
    arch_name = (config.get("architectures") or [None])[0]
    layout = LAYOUTS.get(str(arch_name))
    if layout is None:
        raise CheckpointError(
            f"config.json's architecture {arch_name!r} cannot be converted; "
            f"supported: {', '.join(LAYOUTS)}"
        )
    hp = HParams.from_config(config, layout, "lm_head.weight" in checkpoint)
    scheme = QuantScheme.from_config(config, layout)
    writer = GGUFWriter()
    _write_metadata(writer, checkpoint, layout, hp, name or _model_name(checkpoint))
    tensors = _TensorWriter(checkpoint, writer, layout, hp, scheme, notify)
    used = tensors.write_all()
    writer.add("general.file_type", FILE_TYPE_TQ2_0 if tensors.n_tq2_0 else FILE_TYPE_I2_S)
    unknown = [
        n for n in checkpoint.names() if n not in used and not n.endswith("rotary_emb.inv_freq")
    ]
    if unknown:
        raise CheckpointError(
            f"the checkpoint has tensors bitserve does not know how to convert: "
            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
        )
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer.write(out)
    except BaseException:  # a full disk, Ctrl-C: leave no folders this call made behind
        for folder in made:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return ConvertReport(out, layout.gguf_arch, tensors.n_i2s, tensors.n_tq2_0, tensors.n_tensors)


def _model_name(checkpoint: Checkpoint) -> str:
    return str(checkpoint.config.get("_name_or_path") or checkpoint.folder.name)


def _write_metadata(
    w: GGUFWriter, checkpoint: Checkpoint, layout: Layout, hp: HParams, name: str
) -> None:
    arch = layout.gguf_arch
    w.add("general.architecture", arch)
    w.add("general.name", name)
    for key, value in {
        "vocab_size": hp.vocab_size,
        "context_length": hp.context_length,
        "embedding_length": hp.dim,
        "feed_forward_length": hp.ffn_dim,
        "block_count": hp.n_layers,
        "attention.head_count": hp.n_heads,
        "attention.head_count_kv": hp.n_kv_heads,
        "rope.dimension_count": hp.head_dim,
        "rope.freq_base": hp.rope_theta,
        "attention.layer_norm_rms_epsilon": hp.norm_eps,
        "hidden_act": hp.activation,
    }.items():
        w.add(f"{arch}.{key}", value)
    if hp.head_dim * hp.n_heads != hp.dim:
        w.add(f"{arch}.attention.key_length", hp.head_dim)
        w.add(f"{arch}.attention.value_length", hp.head_dim)
    template_file = checkpoint.folder / "chat_template.jinja"
    template = template_file.read_text("utf-8") if template_file.is_file() else None
    tokenizer = checkpoint.optional_json("tokenizer.json")
    if not tokenizer:
        raise CheckpointError(f"{checkpoint.folder} has no tokenizer.json")
    config = checkpoint.optional_json("tokenizer_config.json")
    for key, value in tokenizer_metadata(tokenizer, config, hp.vocab_size, template).items():
        w.add(key, value)


class _TensorWriter:
    """Adds every tensor of the checkpoint to the writer, in GGUF's usual order."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        writer: GGUFWriter,
        layout: Layout,
        hp: HParams,
        scheme: QuantScheme,
        notify: Callable[[str], None],
    ) -> None:
        self.ckpt, self.w, self.layout, self.hp, self.scheme = (
            checkpoint,
            writer,
            layout,
            hp,
            scheme,
        )
        self.notify = notify
        self.used: set[str] = set()
        self.n_i2s = self.n_tq2_0 = self.n_tensors = 0

    def take(self, name: str) -> np.ndarray:
        self.used.add(name)
        return self.ckpt.tensor(name)

    def write_all(self) -> set[str]:
        hp = self.hp
        embedding = self.take("model.embed_tokens.weight")
        if embedding.shape != (hp.vocab_size, hp.dim):
            raise CheckpointError(
                f"embed_tokens is {embedding.shape}, config says {(hp.vocab_size, hp.dim)}"
            )
        self.float_matrix("token_embd.weight", embedding)
        del embedding
        for i in range(hp.n_layers):
            self.notify(f"layer {i + 1}/{hp.n_layers}")
            self.layer(i)
        self.norm("output_norm.weight", "model.norm.weight", hp.dim)
        if not hp.tied:
            head = self.take("lm_head.weight")
            if head.shape != (hp.vocab_size, hp.dim):
                raise CheckpointError(
                    f"lm_head is {head.shape}, config says {(hp.vocab_size, hp.dim)}"
                )
            self.float_matrix("output.weight", head)
        elif "lm_head.weight" in self.ckpt:
            self.used.add("lm_head.weight")  # a stored copy of the tied embedding
        return self.used

    def layer(self, i: int) -> None:
        hp = self.hp
        prefix = f"model.layers.{i}"
        for hf, gguf in LAYER_NORMS.items():
            is_sub = hf.endswith("sub_norm")
            if is_sub and not self.layout.sub_norms:
                continue
            width = hp.ffn_dim if hf == "mlp.ffn_sub_norm" else hp.dim
            self.norm(f"blk.{i}.{gguf}.weight", f"{prefix}.{hf}.weight", width)
        q_dim, kv_dim = hp.n_heads * hp.head_dim, hp.n_kv_heads * hp.head_dim
        shapes = projection_shapes(hp.dim, hp.ffn_dim, q_dim, kv_dim)
        for hf, gguf in PROJECTIONS.items():
            name = f"{prefix}.{hf}.weight"
            ternary, scales = self.ternary(name, shapes[gguf])
            if self.layout.permute_qk and gguf in ("attn_q", "attn_k"):
                heads = hp.n_heads if gguf == "attn_q" else hp.n_kv_heads
                order = permute_rows(ternary.shape[0], heads)
                ternary = ternary[order]
                scales = scales if scales.size == 1 else scales[order]
            self.projection(f"blk.{i}.{gguf}.weight", ternary, scales)

    def ternary(self, name: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """``(ternary int8 [out, in], scales)``: one scale, or one per output row."""
        ref = self.ckpt.ref(name)
        raw = self.take(name)
        scale_name = name.removesuffix("weight") + "weight_scale"
        if self.scheme.online and ref.dtype != "U8":
            ternary, scale = absmean_ternary(raw)
            if scale_name in self.ckpt:
                raise CheckpointError(f"{name}: master weights should not carry a weight_scale")
            return self._shaped(name, ternary, shape), np.array([scale], np.float32)
        try:
            ternary = unpack_hf_ternary(raw) if ref.dtype == "U8" else ternary_from_floats(raw)
        except ValueError as exc:  # not ternary: one sentence naming the tensor
            raise CheckpointError(f"{name}: {exc}") from None
        if scale_name not in self.ckpt:
            raise CheckpointError(f"{name} is quantized but the checkpoint has no {scale_name}")
        stored = self.take(scale_name).astype(np.float64).reshape(-1)
        if stored.size not in (1, shape[0]) or not np.all(np.isfinite(stored) & (stored > 0)):
            raise CheckpointError(f"{scale_name} must be one positive finite value or one per row")
        scales = stored if self.scheme.scale_multiplies else 1.0 / stored
        return self._shaped(name, ternary, shape), scales.astype(np.float32)

    @staticmethod
    def _shaped(name: str, ternary: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        if ternary.shape != shape:
            raise CheckpointError(f"{name} is {ternary.shape}, the config implies {shape}")
        return ternary

    def projection(self, gguf_name: str, ternary: np.ndarray, scales: np.ndarray) -> None:
        n_out, n_in = ternary.shape
        self.n_tensors += 1
        if scales.size == 1 or np.all(scales == scales[0]):
            data = pack_i2s(ternary, float(scales.reshape(-1)[0]))
            self.w.add_tensor(gguf_name, data, GGMLType.I2_S, (n_in, n_out))
            self.n_i2s += 1
        else:
            if n_in % TQ_BLOCK:
                raise CheckpointError(
                    f"{gguf_name} has per-row scales but rows of {n_in} weights, not a "
                    f"multiple of {TQ_BLOCK} (TQ2_0 blocks)"
                )
            block_scales = np.repeat(scales.reshape(n_out, 1), n_in // TQ_BLOCK, axis=1)
            data = pack_tq2_0(ternary, block_scales)
            self.w.add_tensor(gguf_name, data, GGMLType.TQ2_0, (n_in, n_out))
            self.n_tq2_0 += 1

    def norm(self, gguf_name: str, hf_name: str, width: int) -> None:
        self.n_tensors += 1
        weight = self.take(hf_name)
        if weight.shape != (width,):
            raise CheckpointError(f"{hf_name} is {weight.shape}, expected ({width},)")
        self.w.add_array(gguf_name, weight.astype(np.float32))

    def float_matrix(self, gguf_name: str, matrix: np.ndarray) -> None:
        self.n_tensors += 1
        if np.abs(matrix).max(initial=0.0) > _F16_MAX:
            self.w.add_array(gguf_name, matrix.astype(np.float32))
        else:
            self.w.add_array(gguf_name, matrix.astype(np.float16))
