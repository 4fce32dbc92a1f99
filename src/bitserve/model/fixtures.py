"""Random models in each family's published layout: tiny fixtures for tests (never
downloaded) and, with :func:`write_preset`, the real shapes of published models for
benchmarks (``scripts/make_synthetic_model.py --preset``, ``bitserve bench -m``).

Each :data:`FAMILIES` entry is a family's real file layout (``general.architecture``,
tensor names, which norms exist, tied or untied head, ternary type, the metadata keys its
converter writes) at a shape small enough to run a forward in milliseconds: 2 layers,
width 256 (512 for Falcon3's heads of 256), projections whose rows are whole 256-weight
blocks (so every ternary type fits), a head size that differs between families. Weights
are random; the tokenizer is the family's own kind (``bitserve.tokenizer.fixtures``:
LLaMA-3 BPE, Falcon3 BPE, Qwen2 BPE or LLaMA-2 SentencePiece, trained on the demo corpus
and laid out like the real file) padded to the fixture's vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bitserve.gguf.constants import GGMLType
from bitserve.model.synthetic import (
    PRESETS,
    PUBLISHED_TYPES,
    Layout,
    ModelShape,
    TernaryPacker,
    write_synthetic_model,
)

FIXTURE_VOCAB = 2256  # every family's fixture tokenizer padded to this many tokens


@dataclass(frozen=True, slots=True)
class Family:
    """A family's tiny fixture: ``shape``, ``layout`` (published types and keys), the
    ternary types its published files use (the first is the default), its source, its
    tokenizer kind (a ``bitserve.tokenizer.fixtures`` family), and the types of an untied
    head it uses (``()``: tied)."""

    shape: ModelShape
    layout: Layout
    ternary_types: tuple[GGMLType, ...]
    source: str
    tokenizer: str
    output_types: tuple[GGMLType, ...] = ()


def _shape(
    n_heads: int, n_kv_heads: int, head_dim: int = 0, dim: int = 256, **kw: Any
) -> ModelShape:
    return ModelShape(2, dim, 768, n_heads, n_kv_heads, FIXTURE_VOCAB, 512, head_dim=head_dim,
                      **kw)  # fmt: skip


FAMILIES: dict[str, Family] = {
    "bitnet-b1.58": Family(
        _shape(4, 1),
        Layout("bitnet-b1.58"),
        (GGMLType.I2_S,),
        "microsoft/bitnet-b1.58-2B-4T-gguf",
        "llama-bpe",
    ),
    "bitnet": Family(  # 1bitLLM bitnet_b1_58-large/-3B converted by upstream llama.cpp,
        _shape(4, 4, rope_theta=10000.0),  # whose bitnet graph has no output.weight: tied
        Layout("bitnet", GGMLType.TQ2_0),
        (GGMLType.TQ2_0, GGMLType.TQ1_0, GGMLType.I2_S),
        "1bitLLM/bitnet_b1_58-3B (upstream conversions)",
        "llama-spm",
    ),
    "llama": Family(  # Falcon3-*-1.58bit: heads of 256 (written as key_length), untied head
        _shape(2, 1, 256, dim=512, rope_theta=1000042.0, norm_eps=1e-6),  # (F16: bitnet.cpp)
        Layout("llama", output=GGMLType.F16),
        (GGMLType.I2_S, GGMLType.TQ2_0, GGMLType.TQ1_0),
        "tiiuae/Falcon3-*-Instruct-1.58bit",
        "falcon3",
        (GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q6_K),
    ),
    "qwen3": Family(  # Ternary-Bonsai: Q2_0 with a scale per 64 weights, the embedding too;
        _shape(4, 2, 128, rope_theta=1000000.0, norm_eps=1e-6),  # 4 heads of 128 on 256
        Layout("qwen3", GGMLType.Q2_0, GGMLType.Q2_0, block_scales=True),  # tied
        (GGMLType.Q2_0, GGMLType.TQ2_0),
        "prism-ml/Ternary-Bonsai-*",
        "qwen2",
    ),
    "minicpm": Family(  # BitCPM4
        _shape(4, 2, rope_theta=10000.0),
        Layout("minicpm", GGMLType.TQ2_0),
        (GGMLType.TQ2_0,),
        "openbmb/BitCPM4-*",
        "llama-spm",  # MiniCPM's SentencePiece vocabulary
    ),
}


def gguf_package_packer(ggml_type: GGMLType) -> TernaryPacker | None:
    """The PyPI ``gguf`` package's TQ1_0/TQ2_0 quantizer, an independent packer to write
    fixtures with (a test dependency, imported only here); None for I2_S and Q2_0, which
    it cannot write (bitserve's own packers then)."""
    if ggml_type not in (GGMLType.TQ1_0, GGMLType.TQ2_0):
        return None
    import gguf

    qtype = gguf.GGMLQuantizationType[ggml_type.name]

    def pack(ternary: np.ndarray, scales: np.ndarray) -> bytes:
        group = ternary.shape[1] // scales.shape[1]
        block = np.repeat(scales.astype(np.float16).astype(np.float32), group, axis=1)
        return bytes(gguf.quants.quantize(ternary.astype(np.float32) * block, qtype).tobytes())

    return pack


def write_family_fixture(
    path: str | Path,
    family: str,
    ternary: GGMLType | None = None,
    seed: int = 0,
    pack: TernaryPacker | None = None,
    tokenizer_metadata: dict[str, Any] | None = None,
    name: str | None = None,
    output: GGMLType | None = None,
    q2_0_block: int | None = None,
) -> Path:
    """Write ``family``'s tiny fixture to ``path`` with ``ternary`` projections (default:
    the family's first published type) and an ``output`` head of that type (untied
    families; default: the first of ``output_types``); ``pack`` packs the ternary type
    (default: bitserve's packers); ``name`` is its ``general.name``; ``q2_0_block`` 128
    writes PrismML's early Q2_0 variant."""
    from bitserve.tokenizer.fixtures import tokenizer_metadata as family_tokenizer

    spec = FAMILIES[family]
    layout = replace(
        spec.layout,
        ternary=ternary or spec.ternary_types[0],
        output=output or spec.layout.output,
        metadata_types=PUBLISHED_TYPES,
        q2_0_block=q2_0_block or spec.layout.q2_0_block,
    )
    return write_synthetic_model(
        path,
        spec.shape,
        seed=seed,
        tokenizer_metadata=tokenizer_metadata or family_tokenizer(spec.tokenizer, FIXTURE_VOCAB),
        name=f"tiny {family} fixture (random weights)" if name is None else name,
        layout=layout,
        pack=pack,
    )


def write_preset(
    path: str | Path,
    preset: str,
    ternary: GGMLType | None = None,
    seed: int = 0,
    pack: TernaryPacker | None = None,
) -> Path:
    """Write a random model of a published model's shape and layout (:data:`PRESETS`) with
    a working tokenizer of its family's kind padded to its vocabulary, so that ``bitserve
    generate``, ``serve`` and ``bench`` run on it. ``ternary`` overrides the projection
    type."""
    from bitserve.tokenizer.fixtures import tokenizer_metadata

    spec = PRESETS[preset]
    layout = replace(spec.layout, ternary=ternary or spec.layout.ternary)
    return write_synthetic_model(
        path,
        spec.shape,
        seed=seed,
        tokenizer_metadata=tokenizer_metadata(spec.tokenizer, spec.shape.vocab_size),
        name=f"synthetic {preset} (random weights)",
        layout=layout,
        pack=pack,
    )
