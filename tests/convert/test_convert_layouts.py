"""Layouts beyond the 2B-4T path: Falcon3-*-1.58bit (``LlamaForCausalLM`` + bitnet
quantization, written as llama.cpp writes ``llama`` GGUFs) and per-row scales (TQ2_0)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hf_fixtures import (
    logits,
    make_model,
    write_checkpoint,
    write_direct_gguf,
    write_direct_llama_gguf,
)
from tokenizers import Tokenizer as HFTokenizer

from bitserve.convert import Checkpoint, CheckpointError, convert_checkpoint
from bitserve.gguf import GGMLType, read_gguf
from bitserve.gguf.quants import unpack_i2s, unpack_tq2_0
from bitserve.model.arch import permute_rows


def test_falcon3_packed_becomes_a_llama_gguf(tokenizer: HFTokenizer, tmp_path: Path) -> None:
    m = make_model(tokenizer.get_vocab_size(), seed=5, sub_norms=False)
    folder = write_checkpoint(tmp_path / "hf", m, "llama-packed", tokenizer)
    report = convert_checkpoint(Checkpoint(folder), tmp_path / "falcon.gguf")
    assert report.arch == "llama"
    gguf = read_gguf(report.path)
    try:
        assert gguf.get("llama.block_count") == m.n_layers
        assert gguf.get("llama.hidden_act") == "silu"
        assert gguf.get("llama.attention.head_count_kv") == m.n_kv_heads
        assert "blk.0.attn_sub_norm.weight" not in gguf.tensors
        # the untied head, in F16
        assert gguf.tensors["output.weight"].ggml_type == GGMLType.F16
        assert np.array_equal(gguf.array("output.weight"), m.output.astype(np.float16))
        for name, ternary in m.ternary.items():
            info = gguf.tensors[name]
            got, scale = unpack_i2s(gguf.raw(name), *info.shape)
            assert scale == m.scales[name]
            if ".attn_q." in name or ".attn_k." in name:
                heads = m.n_heads if ".attn_q." in name else m.n_kv_heads
                # llama.cpp's converter order: [0, d/2, 1, d/2 + 1, ...] within each head
                order = permute_rows(ternary.shape[0], heads)
                assert order[:4].tolist() == [0, m.head_dim // 2, 1, m.head_dim // 2 + 1]
                assert np.array_equal(got, ternary[order])
            else:
                assert np.array_equal(got, ternary)
    finally:
        gguf.close()


def test_a_llama_checkpoint_without_bitnet_quantization_is_refused(
    tokenizer: HFTokenizer, tmp_path: Path
) -> None:
    m = make_model(tokenizer.get_vocab_size(), seed=5, sub_norms=False)
    folder = write_checkpoint(tmp_path / "hf", m, "llama-packed", tokenizer)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]  # a plain float Llama, not a ternary one
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="LlamaForCausalLM checkpoint is not ternary"):
        convert_checkpoint(Checkpoint(folder), tmp_path / "float.gguf")


def test_per_row_weight_scales_become_tq2_0(tokenizer: HFTokenizer, tmp_path: Path) -> None:
    m = make_model(tokenizer.get_vocab_size(), seed=6)
    # one projection with a scale per output row, as a per-channel checkpoint has
    row_scales = (2.0 ** -(np.arange(m.ffn_dim) % 5 + 2)).astype(np.float32)
    rows = {"blk.0.ffn_up.weight": row_scales}
    folder = write_checkpoint(tmp_path / "hf", m, "autobitlinear", tokenizer, rows)
    report = convert_checkpoint(Checkpoint(folder), tmp_path / "rows.gguf")
    assert (report.n_tq2_0, report.n_i2s) == (1, 7 * m.n_layers - 1)
    gguf = read_gguf(report.path)
    try:
        info = gguf.tensors["blk.0.ffn_up.weight"]
        assert info.ggml_type == GGMLType.TQ2_0
        ternary, block_scales = unpack_tq2_0(gguf.raw("blk.0.ffn_up.weight"), *info.shape)
        assert np.array_equal(ternary, m.ternary["blk.0.ffn_up.weight"])
        assert np.array_equal(block_scales[:, 0], row_scales)  # one 256-weight block per row
        assert gguf.get("general.file_type") == 37
        metadata = {k: v for k, v in gguf.metadata.items() if k.startswith("tokenizer.")}
    finally:
        gguf.close()
    # served: block-scaled TQ2_0 runs natively, bit for bit like the same rows and scales
    # written directly
    direct = write_direct_gguf(tmp_path / "direct.gguf", m, "autobitlinear", metadata, rows)
    assert np.array_equal(logits(report.path), logits(direct))


def test_falcon3_converted_logits_equal_the_same_weights_written_directly(
    tokenizer: HFTokenizer, tmp_path: Path
) -> None:
    m = make_model(tokenizer.get_vocab_size(), seed=7, sub_norms=False)
    folder = write_checkpoint(tmp_path / "hf", m, "llama-packed", tokenizer)
    report = convert_checkpoint(Checkpoint(folder), tmp_path / "falcon.gguf")
    with read_gguf(report.path) as gguf:
        metadata = {k: v for k, v in gguf.metadata.items() if k.startswith("tokenizer.")}
    direct = write_direct_llama_gguf(tmp_path / "direct.gguf", m, metadata)
    expected = logits(direct)
    assert np.array_equal(logits(report.path), expected)
    assert np.isfinite(expected).all() and expected.std() > 0
