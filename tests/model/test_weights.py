"""ModelWeights.from_gguf: zero-copy views, shape/type checks naming the tensor, untied heads,
BF16 embeddings and TQ2_0 projections (repacked to I2_S)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from bitserve.gguf.constants import GGMLType
from bitserve.gguf.quants import pack_i2s, unpack_i2s
from bitserve.gguf.reader import GGUFError, TensorInfo, read_gguf
from bitserve.gguf.writer import GGUFWriter
from bitserve.model import BitNetModel, ModelConfig, ModelWeights

TensorEntry = tuple[bytes, GGMLType, tuple[int, ...]]  # data, type, GGUF dims


def rewrite(
    src: Path,
    dst: Path,
    edit: Callable[[str, TensorEntry], TensorEntry | None] = lambda name, entry: entry,
    extra: dict[str, TensorEntry] | None = None,
) -> Path:
    """Copy ``src`` to ``dst`` with every tensor passed through ``edit`` (``None`` drops it)."""
    w = GGUFWriter()
    with read_gguf(src) as g:
        for key, value in g.metadata.items():
            w.add(key, value, g.metadata_types[key])
        for name, info in g.tensors.items():
            entry = edit(name, (g.raw(name).tobytes(), info.ggml_type, info.dims))
            if entry is not None:
                w.add_tensor(name, *entry)
    for name, entry in (extra or {}).items():
        w.add_tensor(name, *entry)
    w.write(dst)
    return dst


def config_of(path: Path) -> ModelConfig:
    with read_gguf(path) as g:
        return ModelConfig.from_gguf(g)


def load_error(path: Path) -> str:
    with pytest.raises(GGUFError) as e:
        BitNetModel.load(path)
    return str(e.value)


def test_weights_are_zero_copy_views_with_the_packed_scales(model_gqa2: Path) -> None:
    with read_gguf(model_gqa2) as g:
        config = ModelConfig.from_gguf(g)
        weights = ModelWeights.from_gguf(g, config)
        assert len(weights.layers) == config.n_layers == 3
        k = weights.layers[1].attn_k
        assert (k.n_out, k.n_in) == (config.kv_dim, config.dim)
        assert np.shares_memory(k.raw, g.raw("blk.1.attn_k.weight"))
        codes, scale = unpack_i2s(g.raw("blk.1.attn_k.weight"), k.n_out, k.n_in)
        assert k.scale == scale and 0.5 <= scale <= 2.0
        np.testing.assert_array_equal(k.ternary_f32(), codes)
        assert weights.layers[2].ffn_sub_norm.shape == (config.ffn_dim,)
        assert weights.layers[2].ffn_sub_norm.dtype == np.float32
        assert weights.token_embd.shape == (config.vocab_size, config.dim)
        assert weights.token_embd.kind == "f16" and weights.token_embd.data is not None
        assert np.shares_memory(weights.token_embd.data, g.raw("token_embd.weight"))
        assert weights.output is None and weights.head is weights.token_embd


def test_missing_tensor_is_named(model_gqa2: Path, tmp_path: Path) -> None:
    path = rewrite(
        model_gqa2,
        tmp_path / "m.gguf",
        lambda name, e: None if name == "blk.2.ffn_sub_norm.weight" else e,
    )
    assert "missing tensor 'blk.2.ffn_sub_norm.weight'" in load_error(path)


def test_wrong_projection_shape_is_named(model_gqa2: Path, tmp_path: Path) -> None:
    # attn_v with the shape of attn_q: a valid I2_S tensor, but not what the config says
    config = config_of(model_gqa2)
    n_out, n_in = config.dim, config.dim
    bad = (pack_i2s(np.ones((n_out, n_in), np.int8), 1.0).tobytes(), GGMLType.I2_S, (n_in, n_out))

    def edit(name: str, entry: TensorEntry) -> TensorEntry:
        return bad if name == "blk.0.attn_v.weight" else entry

    message = load_error(rewrite(model_gqa2, tmp_path / "m.gguf", edit))
    assert "'blk.0.attn_v.weight'" in message and f"({n_out}, {n_in})" in message


def test_wrong_tensor_type_is_named(model_gqa2: Path, tmp_path: Path) -> None:
    def edit(name: str, entry: TensorEntry) -> TensorEntry:
        if name != "blk.1.ffn_up.weight":
            return entry
        dims = entry[2]
        return np.zeros(dims[0] * dims[1], np.float16).tobytes(), GGMLType.F16, dims

    message = load_error(rewrite(model_gqa2, tmp_path / "m.gguf", edit))
    assert "'blk.1.ffn_up.weight' is F16" in message


def test_untied_output_head_is_used(model_gqa2: Path, tmp_path: Path) -> None:
    # output.weight = 2 · token_embd (F32): the head is linear, so the logits double
    with read_gguf(model_gqa2) as g:
        head = 2 * g.array("token_embd.weight").astype(np.float32)
    extra = {"output.weight": (head.tobytes(), GGMLType.F32, (head.shape[1], head.shape[0]))}
    untied = rewrite(model_gqa2, tmp_path / "untied.gguf", extra=extra)
    tokens = [3, 1, 4, 1, 5]
    with BitNetModel.load(untied) as model, BitNetModel.load(model_gqa2) as tied:
        assert model.weights.output is not None and model.weights.head is model.weights.output
        assert model.weights.output.kind == "f32"
        logits = model.forward(tokens, model.new_cache(), all_logits=True)
        expected = 2 * tied.forward(tokens, tied.new_cache(), all_logits=True)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-4)


def test_untied_output_head_shape_is_checked(model_gqa2: Path, tmp_path: Path) -> None:
    config = config_of(model_gqa2)
    head = np.zeros((config.vocab_size + 1, config.dim), np.float16)
    extra = {"output.weight": (head.tobytes(), GGMLType.F16, (config.dim, config.vocab_size + 1))}
    message = load_error(rewrite(model_gqa2, tmp_path / "m.gguf", extra=extra))
    assert "'output.weight' has shape" in message


def test_bf16_embedding_is_widened(model_gqa2: Path, tmp_path: Path) -> None:
    # the same truncated values stored as BF16 and as F32: the same embedding rows, and the
    # same logits up to the summation order of each type's head kernel
    def truncated(entry: TensorEntry) -> np.ndarray:
        f32 = np.frombuffer(entry[0], np.float16).astype(np.float32)
        return (f32.view(np.uint32) >> 16).astype(np.uint16)  # the top half: BF16

    def to_bf16(name: str, entry: TensorEntry) -> TensorEntry:
        if name != "token_embd.weight":
            return entry
        return truncated(entry).tobytes(), GGMLType.BF16, entry[2]

    def to_f32(name: str, entry: TensorEntry) -> TensorEntry:
        if name != "token_embd.weight":
            return entry
        return (truncated(entry).astype(np.uint32) << 16).tobytes(), GGMLType.F32, entry[2]

    bf16 = rewrite(model_gqa2, tmp_path / "bf16.gguf", to_bf16)
    f32 = rewrite(model_gqa2, tmp_path / "f32.gguf", to_f32)
    tokens = [7, 8, 9]
    with BitNetModel.load(bf16) as a, BitNetModel.load(f32) as b:
        assert a.weights.token_embd.kind == "bf16"
        every = np.arange(a.config.vocab_size)
        np.testing.assert_array_equal(a.weights.token_embd.rows(every),
                                      b.weights.token_embd.rows(every))  # fmt: skip
        np.testing.assert_allclose(
            a.forward(tokens, a.new_cache(), all_logits=True),
            b.forward(tokens, b.new_cache(), all_logits=True),
            rtol=1e-5, atol=1e-4,
        )  # fmt: skip
        with BitNetModel.load(model_gqa2) as f16:  # the truncation did change the values
            assert not np.array_equal(f16.weights.token_embd.rows(every),
                                      b.weights.token_embd.rows(every))  # fmt: skip


def pack_tq2_0(ternary: np.ndarray, scale: float) -> bytes:
    """ggml's TQ2_0 layout, written independently: per 256 weights, 64 bytes where byte
    ``32c + m`` holds weight ``128c + m + 32n`` (code + 1) in bits ``2n``, then an f16 scale."""
    blocks = (ternary.astype(np.int16) + 1).astype(np.uint8).reshape(-1, 2, 4, 32)
    qs = np.zeros((blocks.shape[0], 2, 32), np.uint8)
    for n in range(4):
        qs |= blocks[:, :, n, :] << (2 * n)
    d = np.full((blocks.shape[0], 1), scale, np.float16).view(np.uint8)
    return np.concatenate([qs.reshape(-1, 64), d], axis=1).tobytes()


def test_tq2_0_projections_give_the_same_logits(model_gqa2: Path, tmp_path: Path) -> None:
    def to_tq2(name: str, entry: TensorEntry) -> TensorEntry:
        data, ggml_type, dims = entry
        if ggml_type != GGMLType.I2_S or dims[0] % 256:  # TQ rows are whole 256-blocks
            return entry
        raw = np.frombuffer(data, np.uint8)
        ternary, scale = unpack_i2s(raw, dims[1], dims[0])
        scale = float(np.float16(scale))  # TQ2_0 stores f16 scales
        return pack_tq2_0(ternary, scale), GGMLType.TQ2_0, dims

    def round_scale(name: str, entry: TensorEntry) -> TensorEntry:
        data, ggml_type, dims = entry
        if ggml_type != GGMLType.I2_S or dims[0] % 256:
            return entry
        ternary, scale = unpack_i2s(np.frombuffer(data, np.uint8), dims[1], dims[0])
        return pack_i2s(ternary, float(np.float16(scale))).tobytes(), ggml_type, dims

    tq2 = rewrite(model_gqa2, tmp_path / "tq2.gguf", to_tq2)
    i2s = rewrite(model_gqa2, tmp_path / "i2s.gguf", round_scale)
    with read_gguf(tq2) as g:
        info: TensorInfo = g.tensor_info("blk.0.attn_q.weight")
        assert info.ggml_type == GGMLType.TQ2_0
    tokens = [10, 20, 30, 40]
    with BitNetModel.load(tq2) as a, BitNetModel.load(i2s) as b:
        np.testing.assert_array_equal(
            a.forward(tokens, a.new_cache(), all_logits=True),
            b.forward(tokens, b.new_cache(), all_logits=True),
        )
