"""Tiny Hugging Face checkpoints in each upstream layout, and the same weights written
directly as GGUF, for the ``bitserve convert`` tests.

Layouts (config.json + model.safetensors + tokenizer.json + tokenizer_config.json):
- ``packed``: microsoft/bitnet-b1.58-2B-4T: ``BitNetForCausalLM``, uint8 projections
  packed as transformers packs them, a bf16 ``weight_scale`` = 1 / scale (BitLinear);
- ``autobitlinear``: the same with ``linear_class: autobitlinear`` (offline), where
  ``weight_scale`` is the scale itself;
- ``bf16``: microsoft/bitnet-b1.58-2B-4T-bf16: bf16 master weights (online quantization);
- ``llama-packed``: tiiuae/Falcon3-*-1.58bit: ``LlamaForCausalLM`` with a ``bitnet``
  quantization config, packed projections, no sub-norms, an untied ``lm_head``.

Scales are powers of two and master weights are ``ternary * 2^k``, so every value the
converter derives (1 / weight_scale, mean |W|) is exact and the expected GGUF is known
independently of the converter's arithmetic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import TensorSpec, serialize_file
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from bitserve.gguf.constants import GGMLType
from bitserve.gguf.quants import pack_i2s, pack_tq2_0
from bitserve.gguf.writer import GGUFWriter
from bitserve.model.bitnet import BitNetModel
from bitserve.model.demo import train_demo_bpe
from bitserve.tokenizer.fixtures import llama3_special_tokens
from bitserve.tokenizer.pretokenizers import LLAMA3_SPLIT_PATTERN

PROJ_HF = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: "
    "{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 values rounded (to nearest even) to bfloat16 precision, kept as float32."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def bf16_bytes(x: np.ndarray) -> bytes:
    """The bfloat16 encoding of float32 values that are exactly bfloat16."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    assert np.all(bits & 0xFFFF == 0), "not exactly bfloat16"
    return (bits >> 16).astype("<u2").tobytes()


def pack_like_transformers(ternary: np.ndarray) -> np.ndarray:
    """transformers' ``pack_weights``: row ``i * out/4 + r`` goes to bits ``2i`` of row r."""
    rows = ternary.shape[0] // 4
    packed = np.zeros((rows, ternary.shape[1]), dtype=np.uint8)
    for i in range(4):
        packed |= (ternary[i * rows : (i + 1) * rows] + 1).astype(np.uint8) << (2 * i)
    return packed


@dataclass
class TinyModel:
    """Random weights of a tiny model: ternary projections with power-of-two scales."""

    n_layers: int = 2
    dim: int = 256
    ffn_dim: int = 512
    n_heads: int = 4
    n_kv_heads: int = 2
    vocab_size: int = 0  # the tokenizer's size, set by make_model
    seed: int = 0
    embedding: np.ndarray = field(default_factory=lambda: np.zeros(0))
    output: np.ndarray = field(default_factory=lambda: np.zeros(0))
    norms: dict[str, np.ndarray] = field(default_factory=dict)  # GGUF name → [width]
    ternary: dict[str, np.ndarray] = field(default_factory=dict)  # GGUF name → int8 [out, in]
    scales: dict[str, float] = field(default_factory=dict)  # GGUF name → scale (2^k)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def shapes(self) -> dict[str, tuple[int, int]]:
        kv = self.n_kv_heads * self.head_dim
        return {
            "attn_q": (self.dim, self.dim),
            "attn_k": (kv, self.dim),
            "attn_v": (kv, self.dim),
            "attn_output": (self.dim, self.dim),
            "ffn_gate": (self.ffn_dim, self.dim),
            "ffn_up": (self.ffn_dim, self.dim),
            "ffn_down": (self.dim, self.ffn_dim),
        }


def _bf16_values(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """bf16-exact values of magnitude 0.5 .. ~3 (exact in f16 too: no subnormals)."""
    magnitude = 0.5 + np.abs(rng.standard_normal(shape, dtype=np.float32))
    return bf16_round(np.where(rng.random(shape) < 0.5, -magnitude, magnitude))


def make_model(vocab_size: int, seed: int = 0, sub_norms: bool = True) -> TinyModel:
    m = TinyModel(vocab_size=vocab_size, seed=seed)
    rng = np.random.default_rng(seed)
    m.embedding = _bf16_values(rng, (vocab_size, m.dim)) * np.float32(0.125)
    m.output = _bf16_values(rng, (vocab_size, m.dim)) * np.float32(0.125)
    names = ["attn_norm", "ffn_norm"] + (["attn_sub_norm", "ffn_sub_norm"] if sub_norms else [])
    for i in range(m.n_layers):
        for norm in names:
            width = m.ffn_dim if norm == "ffn_sub_norm" else m.dim
            m.norms[f"blk.{i}.{norm}.weight"] = bf16_round(
                1.0 + 0.1 * rng.standard_normal(width, dtype=np.float32)
            )
        for proj, shape in m.shapes().items():
            name = f"blk.{i}.{proj}.weight"
            m.ternary[name] = rng.integers(-1, 2, size=shape, dtype=np.int8)
            m.scales[name] = float(2.0 ** -int(rng.integers(2, 7)))
    m.norms["output_norm.weight"] = bf16_round(
        1.0 + 0.1 * rng.standard_normal(m.dim, dtype=np.float32)
    )
    return m


# -- tokenizer files ------------------------------------------------------------------------


def hf_tokenizer() -> HFTokenizer:
    """A LLaMA-3-style byte-level BPE (the demo corpus's) with LLaMA-3's control tokens,
    built with HF ``tokenizers`` as LLaMA-3's tokenizer.json is configured."""
    tokens, merges = train_demo_bpe()
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in llama3_special_tokens()]
    )
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return tok


def write_tokenizer_files(folder: Path, tokenizer: HFTokenizer) -> None:
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), "utf-8")


# -- checkpoints ---------------------------------------------------------------------------


def _config(m: TinyModel, layout: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "hidden_size": m.dim,
        "intermediate_size": m.ffn_dim,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "vocab_size": m.vocab_size,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "torch_dtype": "bfloat16",
    }
    if layout == "llama-packed":
        return config | {  # as tiiuae/Falcon3-*-1.58bit's config.json
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "head_dim": m.head_dim,
            "is_bitnet_config": True,
            "tie_word_embeddings": False,
            "quantization_config": {
                "quant_method": "bitnet",
                "modules_to_not_convert": ["lm_head"],
            },
        }
    config |= {
        "architectures": ["BitNetForCausalLM"],
        "model_type": "bitnet",
        "hidden_act": "relu2",
        "tie_word_embeddings": True,
    }
    quant = {
        "packed": {
            "quant_method": "bitnet",
            "linear_class": "bitlinear",
            "quantization_mode": "offline",
        },
        "autobitlinear": {
            "quant_method": "bitnet",
            "linear_class": "autobitlinear",
            "quantization_mode": "offline",
        },
        "bf16": {
            "quant_method": "bitnet",
            "linear_class": "autobitlinear",
            "quantization_mode": "online",
        },
    }[layout]
    return config | {"quantization_config": quant}


def _hf_layer_name(gguf: str) -> str:
    # blk.N.attn_q.weight → model.layers.N.self_attn.q_proj.weight
    _, layer, kind, _ = gguf.split(".")
    hf = {
        **PROJ_HF,
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_sub_norm": "self_attn.attn_sub_norm",
        "ffn_sub_norm": "mlp.ffn_sub_norm",
    }[kind]
    return f"model.layers.{layer}.{hf}.weight"


def write_checkpoint(
    folder: Path,
    m: TinyModel,
    layout: str,
    tokenizer: HFTokenizer,
    row_scales: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write ``m`` as a Hugging Face checkpoint in ``layout`` (see the module docstring);
    ``row_scales`` gives some projections (by GGUF name) one scale per output row instead."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, tuple[str, list[int], bytes]] = {}

    def bf16(name: str, values: np.ndarray) -> None:
        arrays[name] = ("bfloat16", list(values.shape), bf16_bytes(values))

    bf16("model.embed_tokens.weight", m.embedding)
    bf16("model.norm.weight", m.norms["output_norm.weight"])
    if layout == "llama-packed":
        bf16("lm_head.weight", m.output)
    for name, values in m.norms.items():
        if name.startswith("blk."):
            bf16(_hf_layer_name(name), values)
    for name, ternary in m.ternary.items():
        hf = _hf_layer_name(name)
        scale = m.scales[name]
        if layout == "bf16":
            bf16(hf, ternary.astype(np.float32) * np.float32(scale))
            continue
        packed = pack_like_transformers(ternary)
        arrays[hf] = ("uint8", list(packed.shape), packed.tobytes())
        scales = (row_scales or {}).get(name, np.array([scale], np.float32))
        stored = scales if layout == "autobitlinear" else 1.0 / scales
        bf16(hf.removesuffix("weight") + "weight_scale", stored.astype(np.float32))
    specs = {}
    buffers = []  # keep every buffer alive while safetensors reads it
    for name, (dtype, shape, data) in arrays.items():
        buffer = np.frombuffer(data, dtype=np.uint8).copy()
        buffers.append(buffer)
        specs[name] = TensorSpec(
            dtype=dtype, shape=shape, data_ptr=buffer.ctypes.data, data_len=buffer.nbytes
        )
    serialize_file(specs, str(folder / "model.safetensors"), {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(_config(m, layout)), "utf-8")
    write_tokenizer_files(folder, tokenizer)
    return folder


# -- the same weights, written directly ------------------------------------------------


def expected_scale(m: TinyModel, name: str, layout: str) -> float:
    """The scale the GGUF must hold: the stored one, or (master weights) mean |W|."""
    if layout != "bf16":
        return m.scales[name]
    t = m.ternary[name]
    return float(np.float32(m.scales[name] * np.count_nonzero(t) / t.size))


def _writer(arch: str, m: TinyModel, metadata: dict[str, Any]) -> GGUFWriter:
    """A writer holding ``m``'s hyper-parameters as ``arch`` keys, then ``metadata``."""
    w = GGUFWriter()
    w.add("general.architecture", arch)
    for key, value in {
        "vocab_size": m.vocab_size,
        "context_length": 512,
        "embedding_length": m.dim,
        "feed_forward_length": m.ffn_dim,
        "block_count": m.n_layers,
        "attention.head_count": m.n_heads,
        "attention.head_count_kv": m.n_kv_heads,
        "rope.dimension_count": m.head_dim,
        "rope.freq_base": 500000.0,
        "attention.layer_norm_rms_epsilon": 1e-5,
    }.items():
        w.add(f"{arch}.{key}", value)
    for key, value in metadata.items():
        w.add(key, value)
    return w


def write_direct_gguf(
    path: Path,
    m: TinyModel,
    layout: str,
    metadata: dict[str, Any],
    row_scales: dict[str, np.ndarray] | None = None,
) -> Path:
    """``m`` as a bitnet-b1.58 GGUF written by hand (the official file's layout), with
    ``metadata`` (the tokenizer keys, which the logits do not depend on); projections in
    ``row_scales`` are TQ2_0 with those scales per row."""
    w = _writer("bitnet-b1.58", m, metadata)
    w.add_array("token_embd.weight", m.embedding.astype(np.float16))
    for name, values in m.norms.items():
        w.add_array(name, values)
    for name, ternary in m.ternary.items():
        n_out, n_in = ternary.shape
        if name in (row_scales or {}):
            blocks = np.repeat(row_scales[name][:, None], n_in // 256, axis=1)  # type: ignore[index]
            w.add_tensor(name, pack_tq2_0(ternary, blocks), GGMLType.TQ2_0, (n_in, n_out))
            continue
        data = pack_i2s(ternary, expected_scale(m, name, layout))
        w.add_tensor(name, data, GGMLType.I2_S, (n_in, n_out))
    w.write(path)
    return path


PROMPT = [5, 17, 300, 2, 1999, 42, 7, 7, 128]


def logits(path: Path) -> np.ndarray:
    """The logits of every position of :data:`PROMPT` under the model at ``path``."""
    model = BitNetModel.load(path)
    try:
        out: np.ndarray = model.forward(PROMPT, model.new_cache(64), all_logits=True)
        return out.copy()
    finally:
        model.close()


def shard_checkpoint(folder: Path, n_shards: int = 2) -> None:
    """Split ``model.safetensors`` into ``model-0000i-of-0000n.safetensors`` files named by a
    ``model.safetensors.index.json``, as large checkpoints (Falcon3-7B) are published."""
    from safetensors import deserialize

    single = folder / "model.safetensors"
    entries = deserialize(single.read_bytes())
    single.unlink()
    weight_map: dict[str, str] = {}
    for shard in range(n_shards):
        name = f"model-{shard + 1:05d}-of-{n_shards:05d}.safetensors"
        part = entries[shard::n_shards]
        buffers = [np.frombuffer(bytes(t["data"]), np.uint8).copy() for _, t in part]
        specs = {
            key: TensorSpec(
                dtype=_DTYPES[str(t["dtype"])],
                shape=list(t["shape"]),
                data_ptr=buf.ctypes.data,
                data_len=buf.nbytes,
            )
            for (key, t), buf in zip(part, buffers, strict=True)
        }
        serialize_file(specs, str(folder / name), {"format": "pt"})
        weight_map.update(dict.fromkeys((key for key, _ in part), name))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index), "utf-8")


_DTYPES = {"BF16": "bfloat16", "U8": "uint8", "F32": "float32", "F16": "float16"}


def llama_cpp_permute(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter (``LlamaModel.permute``): each head's rows reordered so that
    its adjacent-pair RoPE equals the rotate-half RoPE the checkpoint was trained with."""
    rows = weights.shape[0]
    return (
        weights.reshape(n_heads, 2, rows // n_heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_direct_llama_gguf(path: Path, m: TinyModel, metadata: dict[str, Any]) -> Path:
    """``m`` as a ``llama`` GGUF written by hand the way llama.cpp's converter lays out
    Falcon3: q/k permuted, no sub-norms, SiLU, an untied F16 ``output.weight``."""
    w = _writer("llama", m, metadata)
    w.add_array("token_embd.weight", m.embedding.astype(np.float16))
    w.add_array("output.weight", m.output.astype(np.float16))
    for name, values in m.norms.items():
        w.add_array(name, values)
    for name, ternary in m.ternary.items():
        if ".attn_q." in name or ".attn_k." in name:
            heads = m.n_heads if ".attn_q." in name else m.n_kv_heads
            ternary = llama_cpp_permute(ternary, heads)
        n_out, n_in = ternary.shape
        w.add_tensor(name, pack_i2s(ternary, m.scales[name]), GGMLType.I2_S, (n_in, n_out))
    w.write(path)
    return path
