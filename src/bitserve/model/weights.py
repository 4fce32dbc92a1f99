"""The weights of a ternary model as views of the GGUF memory map (spec §3).

Every tensor the model's :class:`~bitserve.model.arch.Architecture` needs is checked for
presence, type and shape against the :class:`ModelConfig` before any is used, so a bad file
fails at load with the tensor's name, never later in a matmul. Ternary projections of any
type become :class:`~bitserve.kernels.TernaryWeight` (I2_S a zero-copy view; TQ1_0/TQ2_0
with one scale repacked to I2_S; block-scaled ones keep their scales), embeddings and heads
of any type :class:`~bitserve.kernels.EmbeddingMatrix`; q/k weights whose rows the
llama.cpp converter permuted for NORM RoPE are put back in trained order (a copy,
:func:`~bitserve.model.arch.unpermute_rows`).

Broken downloads (BitNet issue #608: a truncated download left all-zero tensors behind a
complete tensor table) are refused: a tensor whose bytes are all one value holds no
trained weights. The check reads 4 KB of a healthy tensor (its first bytes already
differ), so it costs next to nothing on a good file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from bitserve.gguf.constants import BLOCK_LAYOUT, TERNARY_TYPES, GGMLType
from bitserve.gguf.reader import GGUFError, GGUFFile
from bitserve.kernels import EmbeddingMatrix, TernaryWeight
from bitserve.kernels.tensors import EMBEDDING_TYPES
from bitserve.model.arch import PROJECTIONS, projection_shapes, unpermute_rows
from bitserve.model.config import ModelConfig

FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
_SAMPLE_BYTES = 4096  # a healthy tensor's bytes differ within these


@dataclass(frozen=True, slots=True)
class LayerWeights:
    """One transformer block. Norms are float32: ``attn_norm``, ``ffn_norm`` ``[dim]``;
    ``attn_sub_norm`` ``[q_dim]`` and ``ffn_sub_norm`` ``[ffn_dim]`` (families with
    sub-norms, else ``None``); ``attn_q_norm``/``attn_k_norm`` ``[head_dim]`` (Qwen3, else
    ``None``). Projections are ternary ``[n_out, n_in]``: q ``dim→q_dim``, k/v
    ``dim→kv_dim``, o ``q_dim→dim``, gate/up ``dim→ffn_dim``, down ``ffn_dim→dim``."""

    attn_norm: np.ndarray
    attn_sub_norm: np.ndarray | None
    ffn_norm: np.ndarray
    ffn_sub_norm: np.ndarray | None
    attn_q: TernaryWeight
    attn_k: TernaryWeight
    attn_v: TernaryWeight
    attn_output: TernaryWeight
    ffn_gate: TernaryWeight
    ffn_up: TernaryWeight
    ffn_down: TernaryWeight
    attn_q_norm: np.ndarray | None = None
    attn_k_norm: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class ModelWeights:
    """All weights. ``token_embd`` ``[vocab, dim]`` and ``output``, the untied LM head (or
    ``None``: tied to ``token_embd``), are matrices of any type the kernels read (F32, F16,
    BF16, Q8_0, Q6_K, ternary)."""

    layers: tuple[LayerWeights, ...]
    token_embd: EmbeddingMatrix
    output_norm: np.ndarray
    output: EmbeddingMatrix | None

    @property
    def head(self) -> EmbeddingMatrix:
        """The matrix the LM head multiplies by: ``[vocab, dim]``."""
        return self.token_embd if self.output is None else self.output

    @property
    def head_name(self) -> str:
        return "token_embd.weight" if self.output is None else "output.weight"

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, config: ModelConfig) -> ModelWeights:
        """Views of every tensor of ``gguf``, checked against ``config`` (raises ``GGUFError``)."""
        _check_no_extra_tensors(gguf, config)
        layers = tuple(_layer(gguf, config, i) for i in range(config.n_layers))
        vocab_dim = (config.vocab_size, config.dim)
        output = None
        if "output.weight" in gguf.tensors:
            output = _matrix(gguf, "output.weight", vocab_dim)
        return cls(
            layers=layers,
            token_embd=_matrix(gguf, "token_embd.weight", vocab_dim),
            output_norm=_norm(gguf, "output_norm.weight", config.dim),
            output=output,
        )


def _check_no_extra_tensors(gguf: GGUFFile, config: ModelConfig) -> None:
    """Refuse a tensor this architecture's forward would not use (a norm it does not
    have, a layer past ``block_count``...): ignoring it would serve another model than
    the file holds. llama.cpp refuses such files too ("wrong number of tensors")."""
    arch = config.architecture
    per_layer = [*arch.norms, *PROJECTIONS]
    last = f"blk.{config.n_layers - 1}.{PROJECTIONS[0]}.weight"
    if last not in gguf.tensors:  # before any name set is built to block_count's size
        raise GGUFError(
            gguf.path,
            f"{arch.name}.block_count is {config.n_layers}, but the file has no tensor {last!r}",
        )
    known = {"token_embd.weight", "output_norm.weight", "output.weight"}
    known |= {f"blk.{i}.{t}.weight" for i in range(config.n_layers) for t in per_layer}
    if arch.projection_scales:
        known |= {f"blk.{i}.{p}.scale" for i in range(config.n_layers) for p in PROJECTIONS}
    extra = [name for name in gguf.tensors if name not in known]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise GGUFError(
            gguf.path,
            f"tensor {extra[0]!r}{more} is not part of the {arch.name!r} layout this server "
            "runs; refusing the file rather than ignoring part of the model",
        )


def _layer(gguf: GGUFFile, config: ModelConfig, i: int) -> LayerWeights:
    arch = config.architecture
    dim, ffn, q_dim = config.dim, config.ffn_dim, config.q_dim
    shapes = projection_shapes(dim, ffn, q_dim, config.kv_dim)
    heads = {"attn_q": config.n_heads, "attn_k": config.n_kv_heads}  # rows per head: RoPE'd

    def proj(name: str) -> TernaryWeight:
        (n_out, n_in), n_heads = shapes[name], heads.get(name, 0)
        permuted = n_heads if arch.permuted_qk else 0
        weight = _ternary(gguf, f"blk.{i}.{name}.weight", n_out, n_in, permuted)
        if arch.projection_scales and f"blk.{i}.{name}.scale" in gguf.tensors:
            extra = _norm(gguf, f"blk.{i}.{name}.scale", 1)[0]  # one F32: output times it
            weight = _scaled(weight, float(extra))
        return weight

    def norm(name: str, width: int, present: bool = True) -> np.ndarray | None:
        return _norm(gguf, f"blk.{i}.{name}.weight", width) if present else None

    return LayerWeights(
        attn_norm=_norm(gguf, f"blk.{i}.attn_norm.weight", dim),
        attn_sub_norm=norm("attn_sub_norm", q_dim, arch.sub_norms),
        ffn_norm=_norm(gguf, f"blk.{i}.ffn_norm.weight", dim),
        ffn_sub_norm=norm("ffn_sub_norm", ffn, arch.sub_norms),
        attn_q=proj("attn_q"),
        attn_k=proj("attn_k"),
        attn_v=proj("attn_v"),
        attn_output=proj("attn_output"),
        ffn_gate=proj("ffn_gate"),
        ffn_up=proj("ffn_up"),
        ffn_down=proj("ffn_down"),
        attn_q_norm=norm("attn_q_norm", config.head_dim, arch.qk_norm),
        attn_k_norm=norm("attn_k_norm", config.head_dim, arch.qk_norm),
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


def check_not_blank(gguf: GGUFFile, name: str, data: np.ndarray) -> None:
    """Refuse a tensor whose bytes ``data`` are all one value: what a truncated download
    leaves behind a complete header (zeros), and never a trained weight. Reads only the
    first 4 KB unless they are all one value."""
    first = data[:_SAMPLE_BYTES]
    if first.size == 0 or (first != first[0]).any() or (data != first[0]).any():
        return
    raise GGUFError(
        gguf.path,
        f"tensor {name!r} is one byte value (0x{int(first[0]):02x}) throughout, which no "
        "trained model holds: the file is probably truncated (an incomplete download); "
        "download it again",
    )


def check_finite(gguf: GGUFFile, name: str, values: Any, what: str = "values") -> None:
    """Refuse NaN or infinite scales and norms: the native kernels would not carry a NaN
    through (their integer sums and max-reductions drop it) and would serve finite
    garbage where the numpy oracle gives NaN."""
    if not np.isfinite(values).all():
        raise GGUFError(
            gguf.path,
            f"tensor {name!r}: its {what} hold NaN or infinite values: the file is corrupt; "
            "download it again",
        )


def _norm(gguf: GGUFFile, name: str, width: int) -> np.ndarray:
    """A norm weight as float32 ``[width]`` (a small copy when the file stores F16/BF16)."""
    _check(gguf, name, (width,), FLOAT_TYPES)
    check_not_blank(gguf, name, gguf.raw(name))
    norm = np.ascontiguousarray(gguf.array(name), dtype=np.float32)
    check_finite(gguf, name, norm)
    return norm


def _matrix(gguf: GGUFFile, name: str, shape: tuple[int, int]) -> EmbeddingMatrix:
    """An embedding or head ``[vocab, dim]`` of any type the kernels read (a ternary one
    with its scales checked; float values: :func:`check_head_finite`, for the head)."""
    _check(gguf, name, shape, EMBEDDING_TYPES)
    check_not_blank(gguf, name, gguf.raw(name))
    matrix = EmbeddingMatrix.from_gguf(gguf, name, *shape)
    if matrix.ternary is not None:
        _check_scales(gguf, name, matrix.ternary)
    return matrix


# the float bits of each type, and what its exponent bits read when they are all ones (an
# infinity or a NaN): a value is not finite when its bits without the sign reach that
_FLOAT_BITS: dict[str, tuple[np.dtype[Any], int, int]] = {
    "f16": (np.dtype("<u2"), 0x7FFF, 0x7C00),
    "bf16": (np.dtype("<u2"), 0x7FFF, 0x7F80),
    "f32": (np.dtype("<u4"), 0x7FFFFFFF, 0x7F800000),
}
# where a block of each int8-coded type keeps its f16 scale d in the file (gguf/dense_quants;
# Q6_K's sub-block scales are int8, always finite)
_BLOCK_SCALE_AT = {GGMLType.Q8_0: 0, GGMLType.Q6_K: 208}
_SCAN_PIECE = 1 << 22  # values per piece: the masked copy stays in cache
_ROWS_PER_LOOK = 4096


def check_head_finite(gguf: GGUFFile, name: str, head: EmbeddingMatrix) -> None:
    """Refuse a head holding a NaN or an infinity: every token reads the whole head, so
    every reply's logits would be NaN. Called on the head where it will be read (the
    private copy, or the file's map with ``--mmap``: pages every token reads anyway); only
    float bits are tested, piece by piece (2B-4T's 0.66 GB F16 head in its private copy:
    35 ms). An embedding that is not the head is read a row at a time and not scanned (a
    NaN row fails the requests that use its token)."""
    if head.ternary is not None:  # its scales were checked as it was read (_matrix)
        return
    if head.kind == "int8" and head.scales is not None:  # packed: f32 scales per block
        bits, (dtype, sign_off, exponent) = head.scales.view("<u4"), _FLOAT_BITS["f32"]
    elif head.kind == "int8":  # the file's blocks: their f16 d
        assert head.raw is not None
        at, block_bytes = _BLOCK_SCALE_AT[head.source], BLOCK_LAYOUT[head.source][1]
        bits = head.raw.reshape(-1, block_bytes)[:, at : at + 2].view("<u2")
        dtype, sign_off, exponent = _FLOAT_BITS["f16"]
    else:
        assert head.data is not None
        dtype, sign_off, exponent = _FLOAT_BITS[head.kind]
        bits = head.data.view(dtype)
    flat = bits.reshape(-1)
    for lo in range(0, flat.size, _SCAN_PIECE):
        if (flat[lo : lo + _SCAN_PIECE] & dtype.type(sign_off)).max() >= exponent:
            raise GGUFError(
                gguf.path,
                f"tensor {name!r}: row {_first_non_finite_row(head)} holds NaN or infinite "
                "values: the file is corrupt; download it again",
            )


def _first_non_finite_row(head: EmbeddingMatrix) -> int:
    """The first row whose float values are not all finite (any layout, any kind)."""
    for lo in range(0, head.n_rows, _ROWS_PER_LOOK):
        with np.errstate(invalid="ignore", over="ignore"):  # an infinite scale times 0
            rows = head.rows(np.arange(lo, min(lo + _ROWS_PER_LOOK, head.n_rows)))
        bad = ~np.isfinite(rows)
        if bad.any():
            return lo + int(np.flatnonzero(bad.any(axis=1))[0])
    raise AssertionError("a non-finite value was seen, then not found")


def _ternary(
    gguf: GGUFFile, name: str, n_out: int, n_in: int, permuted_heads: int = 0
) -> TernaryWeight:
    """A projection ``[n_out, n_in]`` of any ternary type; ``permuted_heads``: its rows are
    that many heads in llama.cpp's converter order, taken back to the trained order (a
    copy). The shape is checked first: nothing is made to a size only metadata gave."""
    ggml_type = _check(gguf, name, (n_out, n_in), TERNARY_TYPES)
    raw = gguf.raw(name)
    check_not_blank(gguf, name, raw[: n_out * n_in // 4] if ggml_type == GGMLType.I2_S else raw)
    row_order = unpermute_rows(n_out, permuted_heads) if permuted_heads else None
    weight = TernaryWeight.from_gguf(gguf, name, n_out, n_in, row_order)
    _check_scales(gguf, name, weight)
    return weight


def _check_scales(gguf: GGUFFile, name: str, weight: TernaryWeight) -> None:
    """:func:`check_finite` on a ternary weight's block scales, or its one tensor scale."""
    scales = weight.scales if weight.blocked else np.float32(weight.scale)
    check_finite(gguf, name, scales, "scales")


def _scaled(weight: TernaryWeight, factor: float) -> TernaryWeight:
    """``weight`` times ``factor`` (upstream bitnet's ``.scale`` tensors): the tensor scale
    of an I2_S weight, or each f16 block scale of a blocked one (rounded to f16 again)."""
    if not weight.blocked:
        return dataclasses.replace(weight, scale=weight.scale * factor)
    assert weight.scales is not None
    scales = (weight.scales.astype(np.float32) * np.float32(factor)).astype(np.float16)
    return dataclasses.replace(weight, scales=scales)
