"""End to end: the model's logits on every native path against the numpy backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bitserve.kernels.native import NativeBackend, available_kernels
from bitserve.model.bitnet import BitNetModel
from bitserve.model.synthetic import ModelShape, write_synthetic_model

SHAPE = ModelShape(
    n_layers=3, dim=384, ffn_dim=640, n_heads=6, n_kv_heads=2, vocab_size=2000, context_length=128
)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_model(tmp_path_factory.mktemp("parity") / "m.gguf", SHAPE, seed=3)


def _logits(path: Path, backend: str | NativeBackend, tokens: np.ndarray) -> np.ndarray:
    """Prompt of 24 tokens (all logits), then 8 generated one at a time: ``[32, vocab]``."""
    with BitNetModel.load(path, backend=backend) as model:
        cache = model.new_cache()
        prompt = model.forward(tokens[:24], cache, all_logits=True)
        steps = [model.forward(tokens[i : i + 1], cache) for i in range(24, 32)]
    return np.concatenate([prompt, np.stack(steps)])


@pytest.mark.parametrize(
    ("kernel", "threads"), [(k, t) for k in ("scalar", "avx2", "avx512") for t in (1, 2)]
)
def test_native_logits_match_numpy(model_path: Path, kernel: str, threads: int) -> None:
    if kernel not in available_kernels():
        pytest.skip(f"{kernel} not available")
    tokens = np.random.default_rng(0).integers(0, SHAPE.vocab_size, size=32)
    want = _logits(model_path, "numpy", tokens)
    got = _logits(model_path, NativeBackend(kernel, threads=threads), tokens)
    assert (got.argmax(axis=1) == want.argmax(axis=1)).mean() >= 0.99
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 0.01


def test_int8_head_logits_stay_close(model_path: Path) -> None:
    if not available_kernels():
        pytest.skip("native kernels not built")
    tokens = np.random.default_rng(1).integers(0, SHAPE.vocab_size, size=32)
    kernel = available_kernels()[0]
    exact = _logits(model_path, NativeBackend(kernel, threads=2), tokens)
    int8 = _logits(model_path, NativeBackend(kernel, threads=2, head="int8"), tokens)
    assert (int8.argmax(axis=1) == exact.argmax(axis=1)).mean() >= 0.9
    assert np.linalg.norm(int8 - exact) / np.linalg.norm(exact) <= 0.02
