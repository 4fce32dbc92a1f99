"""Random ternary GGUF files of any shape and family: test fixtures, the demo model, the
bench models.

A file is laid out as its family's published files are (tensor names, types, metadata
keys): by default exactly like Microsoft's ``ggml-model-i2_s.gguf`` (spec §3: I2_S
projections with one scale per tensor, F32 norms, an F16 tied embedding, no biases).
:class:`Layout` changes the family: ``arch`` decides which norms exist (sub-norms for
BitNet, per-head q/k norms for Qwen3) and whether q/k rows are stored in llama.cpp's
NORM-RoPE order (``llama``, ``minicpm``: the converter's permutation is applied to the
random trained-order rows, as the real converters do); ``ternary`` the projection type,
``output`` an untied head. :data:`PRESETS` holds the real shapes of each family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bitserve.gguf.constants import Q2_0_BLOCK, TQ_BLOCK, GGMLType, GGUFValueType
from bitserve.gguf.dense_quants import pack_q6_k, pack_q8_0
from bitserve.gguf.quants import pack_i2s, pack_q2_0, pack_tq1_0, pack_tq2_0
from bitserve.gguf.writer import GGUFWriter
from bitserve.model.arch import ARCHITECTURES, permute_rows, projection_shapes


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
    head_dim: int = 0  # attention.key_length; 0: dim // n_heads (and no key written)

    @property
    def head_size(self) -> int:
        return self.head_dim or self.dim // self.n_heads


# the shapes of BitNet-b1.58-2B-4T (spec §3)
SHAPE_2B4T = ModelShape(
    n_layers=30, dim=2560, ffn_dim=6912, n_heads=20, n_kv_heads=5, vocab_size=128256
)

LAYER_NORMS = ("attn_norm", "attn_sub_norm", "ffn_norm", "ffn_sub_norm")

# (ternary int8 [out, in], block scales f32 [out, in / group]) -> the tensor's bytes
TernaryPacker = Callable[[np.ndarray, np.ndarray], "bytes | np.ndarray"]
TERNARY_PACKERS: dict[GGMLType, TernaryPacker] = {
    GGMLType.I2_S: lambda t, scales: pack_i2s(t, float(scales.flat[0])),  # one scale
    GGMLType.TQ1_0: pack_tq1_0,
    GGMLType.TQ2_0: pack_tq2_0,
    GGMLType.Q2_0: pack_q2_0,
}
# weights per scale of each ternary type (I2_S: 0, the whole tensor)
TERNARY_GROUPS = {GGMLType.I2_S: 0, GGMLType.TQ1_0: TQ_BLOCK, GGMLType.TQ2_0: TQ_BLOCK,
                  GGMLType.Q2_0: Q2_0_BLOCK}  # fmt: skip


# the value (or array element) types llama.cpp's converters write, where the writer's
# inference differs: llama.cpp refuses a UINT32 token_type array
PUBLISHED_TYPES: dict[str, GGUFValueType] = {
    "tokenizer.ggml.token_type": GGUFValueType.INT32,
    "tokenizer.ggml.scores": GGUFValueType.FLOAT32,
}


@dataclass(frozen=True, slots=True)
class Layout:
    """How a family's published file stores a model: ``arch`` (``general.architecture``),
    the ``ternary`` projection type, the ``embedding`` type, the untied ``output`` head's
    type (``None``: tied), metadata keys the family's converter adds, the value types
    of metadata arrays (``metadata_types``: key → element type; the demo model keeps the
    writer's inferred types so that its file stays the same), and ``block_scales``: a
    random scale per block (Ternary-Bonsai) instead of one per tensor (BitNet models,
    whatever their type); ``q2_0_block``: weights per Q2_0 scale (64, or 128 in PrismML's
    early files)."""

    arch: str = "bitnet-b1.58"
    ternary: GGMLType = GGMLType.I2_S
    embedding: GGMLType = GGMLType.F16
    output: GGMLType | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    metadata_types: dict[str, GGUFValueType] = field(default_factory=dict)
    block_scales: bool = False
    q2_0_block: int = Q2_0_BLOCK  # 128: PrismML's early Q2_0 files


PUBLISHED = Layout(metadata_types=PUBLISHED_TYPES)  # 2B-4T as Microsoft's file has it


@dataclass(frozen=True, slots=True)
class Preset:
    """A published model's shape and layout (weights random), for ``--preset``."""

    shape: ModelShape
    layout: Layout
    source: str  # where the real model is published
    tokenizer: str = "llama-bpe"  # its tokenizer's kind (bitserve.tokenizer.fixtures)


def _falcon3(layers: int, dim: int, ffn: int) -> Preset:
    shape = ModelShape(layers, dim, ffn, 12 if dim == 3072 else 8, 4, 131072, 32768, 1000042.0,
                       1e-6, 256)  # fmt: skip
    layout = Layout("llama", output=GGMLType.F16, metadata_types=PUBLISHED_TYPES)
    return Preset(shape, layout, "tiiuae/Falcon3-*-1.58bit", "falcon3")


def _bonsai(layers: int, dim: int, ffn: int, tied: bool) -> Preset:
    shape = ModelShape(layers, dim, ffn, 32 if dim > 2048 else 16, 8, 151936, 32768, 1e6, 1e-6,
                       128)  # fmt: skip
    layout = Layout("qwen3", GGMLType.Q2_0, GGMLType.Q2_0, None if tied else GGMLType.Q2_0,
                    metadata_types=PUBLISHED_TYPES, block_scales=True)  # fmt: skip
    return Preset(shape, layout, "prism-ml/Ternary-Bonsai-*", "qwen2")


PRESETS: dict[str, Preset] = {
    "bitnet-2b4t": Preset(SHAPE_2B4T, PUBLISHED, "microsoft/bitnet-b1.58-2B-4T-gguf"),
    "falcon3-1b": _falcon3(18, 2048, 8192),
    "falcon3-3b": _falcon3(22, 3072, 9216),
    "falcon3-7b": _falcon3(28, 3072, 23040),
    "falcon3-10b": _falcon3(40, 3072, 23040),
    "llama3-8b-1.58": Preset(
        ModelShape(32, 4096, 14336, 32, 8, 128256, 8192, 500000.0, 1e-5),
        Layout("llama", output=GGMLType.F16, metadata_types=PUBLISHED_TYPES),
        "HF1BitLLM/Llama3-8B-1.58-100B-tokens",
    ),
    "bonsai-1.7b": _bonsai(28, 2048, 6144, tied=True),
    "bonsai-4b": _bonsai(36, 2560, 9728, tied=True),
    "bonsai-8b": _bonsai(36, 4096, 12288, tied=False),
}


def layer_projections(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """Name → (n_out, n_in) of each ternary projection of one layer."""
    head = shape.head_size
    return projection_shapes(
        shape.dim, shape.ffn_dim, shape.n_heads * head, shape.n_kv_heads * head
    )


def layer_norms(shape: ModelShape, arch: str) -> dict[str, int]:
    """Name → width of each norm of one layer in ``arch``'s layout."""
    head = shape.head_size
    widths = {"attn_norm": shape.dim, "attn_sub_norm": shape.n_heads * head,
              "ffn_norm": shape.dim, "ffn_sub_norm": shape.ffn_dim,
              "attn_q_norm": head, "attn_k_norm": head}  # fmt: skip
    return {name: widths[name] for name in ARCHITECTURES[arch].norms}


def _hyper_parameters(shape: ModelShape, arch: str) -> dict[str, Any]:
    keys: dict[str, Any] = {
        "vocab_size": shape.vocab_size,
        "context_length": shape.context_length,
        "embedding_length": shape.dim,
        "feed_forward_length": shape.ffn_dim,
        "block_count": shape.n_layers,
        "attention.head_count": shape.n_heads,
        "attention.head_count_kv": shape.n_kv_heads,
        "rope.dimension_count": shape.head_size,
        "rope.freq_base": float(shape.rope_theta),
        "attention.layer_norm_rms_epsilon": float(shape.norm_eps),
    }
    if shape.head_dim:
        keys |= {"attention.key_length": shape.head_dim, "attention.value_length": shape.head_dim}
    if ARCHITECTURES[arch].scaled:  # MiniCPM-2B's values
        keys |= {"embedding_scale": 12.0, "residual_scale": 1.4 / shape.n_layers**0.5,
                 "logit_scale": shape.dim / 256}  # fmt: skip
    return keys


def _random_ternary(
    rng: np.random.Generator,
    n_out: int,
    n_in: int,
    ggml_type: GGMLType,
    block_scales: bool,
    q2_0_block: int = Q2_0_BLOCK,
) -> tuple[np.ndarray, np.ndarray]:
    """Random ternary ``[n_out, n_in]`` and its scales ``[n_out, n_in / group]``: one random
    scale for the tensor, or one per block (the draws of a one-scale tensor are those of
    the 2B-4T writer, so its files stay the same)."""
    ternary = rng.integers(-1, 2, size=(n_out, n_in), dtype=np.int8)
    group = q2_0_block if ggml_type == GGMLType.Q2_0 else TERNARY_GROUPS[ggml_type] or n_in
    shape = (n_out, n_in // group)
    if block_scales:
        return ternary, rng.uniform(0.5, 2.0, shape).astype(np.float16).astype(np.float32)
    return ternary, np.full(shape, float(rng.uniform(0.5, 2.0)), np.float32)


def _float_matrix(values: np.ndarray, ggml_type: GGMLType) -> bytes:
    if ggml_type == GGMLType.F16:
        return values.astype(np.float16).tobytes()
    if ggml_type == GGMLType.F32:
        return values.astype(np.float32).tobytes()
    if ggml_type == GGMLType.BF16:
        return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
    if ggml_type == GGMLType.Q8_0:
        return bytes(pack_q8_0(values))
    if ggml_type == GGMLType.Q6_K:
        return bytes(pack_q6_k(values))
    raise ValueError(f"no random {ggml_type.name} matrices")


def _random_matrix(
    rng: np.random.Generator,
    shape: ModelShape,
    ggml_type: GGMLType,
    pack: TernaryPacker | None,
    q2_0_block: int = Q2_0_BLOCK,
) -> bytes:
    """A random ``[vocab, dim]`` embedding or head in ``ggml_type``: standard normal (float
    and int8 types), or ternary with a scale per block (``pack``). Drawn in slices of rows
    (the same values as one draw) so that no full float32 copy of a large vocabulary exists."""
    step = max(1, 2**24 // shape.dim)
    parts = []
    for lo in range(0, shape.vocab_size, step):
        rows = min(step, shape.vocab_size - lo)
        if pack is not None:
            ternary = _random_ternary(rng, rows, shape.dim, ggml_type, True, q2_0_block)
            parts.append(bytes(pack(*ternary)))
        else:
            values = rng.standard_normal((rows, shape.dim), dtype=np.float32)
            parts.append(_float_matrix(values, ggml_type))
    return b"".join(parts)


def write_synthetic_model(
    path: str | Path,
    shape: ModelShape,
    seed: int = 0,
    arch: str | None = None,
    tokenizer_metadata: dict[str, Any] | None = None,
    extra_metadata: dict[str, Any] | None = None,
    name: str = "synthetic BitNet b1.58 (random weights)",
    layout: Layout | None = None,
    pack: TernaryPacker | None = None,
) -> Path:
    """Write a random model with ``shape`` to ``path`` (deterministic for a given seed) in
    ``layout`` (default: 2B-4T's); ``arch`` overrides the layout's architecture; ``pack``
    packs the layout's ternary type (default: :data:`TERNARY_PACKERS`)."""
    layout = layout or Layout()
    arch = arch or layout.arch
    rng = np.random.default_rng(seed)
    w = GGUFWriter()
    metadata = {**layout.metadata, **(tokenizer_metadata or {}), **(extra_metadata or {})}
    _write_metadata(w, shape, arch, name, metadata, layout.metadata_types)
    vocab_dims = (shape.dim, shape.vocab_size)
    q2_block = layout.q2_0_block

    def packer(ggml_type: GGMLType) -> TernaryPacker:
        return _packer(ggml_type, pack if ggml_type == layout.ternary else None, q2_block)

    def matrix(ggml_type: GGMLType) -> bytes:
        ternary = ggml_type in TERNARY_GROUPS
        pack_matrix = packer(ggml_type) if ternary else None
        return _random_matrix(rng, shape, ggml_type, pack_matrix, q2_block)

    def add(name: str, data: bytes, ggml_type: GGMLType, dims: tuple[int, ...]) -> None:
        w.add_tensor(name, data, ggml_type, dims, q2_0_block=q2_block)

    add("token_embd.weight", matrix(layout.embedding), layout.embedding, vocab_dims)
    pack_layer = packer(layout.ternary)
    permuted = ARCHITECTURES[arch].permuted_qk
    heads = {"attn_q": shape.n_heads, "attn_k": shape.n_kv_heads}
    for layer in range(shape.n_layers):
        for norm, width in layer_norms(shape, arch).items():
            weight = (1.0 + 0.1 * rng.standard_normal(width)).astype(np.float32)
            w.add_array(f"blk.{layer}.{norm}.weight", weight)
        for proj, (n_out, n_in) in layer_projections(shape).items():
            ternary, scales = _random_ternary(
                rng, n_out, n_in, layout.ternary, layout.block_scales, q2_block
            )
            if permuted and proj in heads:  # stored as the converter stores it
                stored = permute_rows(n_out, heads[proj])
                ternary, scales = ternary[stored], scales[stored]
            data = pack_layer(ternary, scales)
            add(f"blk.{layer}.{proj}.weight", bytes(data), layout.ternary, (n_in, n_out))
    w.add_array(
        "output_norm.weight", (1.0 + 0.1 * rng.standard_normal(shape.dim)).astype(np.float32)
    )
    if layout.output is not None:
        add("output.weight", matrix(layout.output), layout.output, vocab_dims)
    w.write(path)
    return Path(path)


def _write_metadata(
    w: GGUFWriter,
    shape: ModelShape,
    arch: str,
    name: str,
    metadata: dict[str, Any],
    metadata_types: dict[str, GGUFValueType],
) -> None:
    """The general keys, ``shape``'s hyper-parameters as ``arch`` keys, then ``metadata``
    (arrays written with the element type ``metadata_types`` gives them, if any)."""
    w.add("general.architecture", arch)
    w.add("general.name", name)
    w.add("general.file_type", 40)
    for key, value in _hyper_parameters(shape, arch).items():
        w.add(f"{arch}.{key}", value)
    for key, value in metadata.items():
        elem = metadata_types.get(key)
        if elem is not None and isinstance(value, (list, tuple)):
            w.add(key, value, GGUFValueType.ARRAY, elem)
        else:
            w.add(key, value, elem)


def _packer(ggml_type: GGMLType, given: TernaryPacker | None, q2_0_block: int) -> TernaryPacker:
    """``given`` if any, else how :data:`TERNARY_PACKERS` packs ``ggml_type`` (Q2_0 with
    ``q2_0_block`` weights a scale)."""
    if given is not None:
        return given
    if ggml_type == GGMLType.Q2_0:
        return lambda values, scales: pack_q2_0(values, scales, q2_0_block)
    if ggml_type not in TERNARY_PACKERS:
        raise ValueError(f"no packer for {ggml_type.name}")
    return TERNARY_PACKERS[ggml_type]
