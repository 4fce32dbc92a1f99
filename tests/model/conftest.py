"""Tiny random BitNet GGUF files shared by the model tests (written once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitserve.model.synthetic import ModelShape, write_synthetic_model

# head_dim 128 with GQA 4:1 like 2B-4T; FFN width 11·128 (not a power of two; I2_S rows
# must be whole 128-weight blocks, so 1376 is impossible for ffn_down)
SHAPE_GQA4 = ModelShape(
    n_layers=2, dim=512, ffn_dim=1408, n_heads=4, n_kv_heads=1, vocab_size=300, context_length=64
)
# head_dim 32, GQA 2:1, three layers, a different RoPE base
SHAPE_GQA2 = ModelShape(
    n_layers=3,
    dim=256,
    ffn_dim=640,
    n_heads=8,
    n_kv_heads=4,
    vocab_size=384,
    context_length=48,
    rope_theta=10000.0,
)


@pytest.fixture(scope="session")
def model_gqa4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_model(tmp_path_factory.mktemp("models") / "gqa4.gguf", SHAPE_GQA4, 11)


@pytest.fixture(scope="session")
def model_gqa2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_model(tmp_path_factory.mktemp("models") / "gqa2.gguf", SHAPE_GQA2, 22)
