"""scripts/make_synthetic_model.py and the presets: real shapes of each published family."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from bitserve.engine.loader import load_model
from bitserve.model import synthetic
from bitserve.model.fixtures import write_preset
from bitserve.model.synthetic import PRESETS, ModelShape

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_synthetic_model.py"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip


def test_presets_have_the_published_shapes() -> None:
    falcon, bonsai = PRESETS["falcon3-7b"], PRESETS["bonsai-4b"]
    assert (falcon.layout.arch, falcon.shape.head_size, falcon.shape.vocab_size) == (
        "llama",
        256,
        131072,
    )
    assert falcon.layout.output is not None  # untied
    assert (bonsai.layout.arch, bonsai.layout.output) == ("qwen3", None)  # tied
    assert bonsai.shape.n_heads * bonsai.shape.head_size != bonsai.shape.dim  # 4096 on 2560
    for preset in PRESETS.values():
        rows = (
            preset.shape.dim,
            preset.shape.ffn_dim,
            preset.shape.n_heads * preset.shape.head_size,
        )
        assert all(r % 256 == 0 for r in rows)  # every ternary type's blocks fit


def test_list_names_every_preset() -> None:
    proc = run("--list")
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines()] == list(PRESETS)


def test_custom_shape_writes_a_model_that_generates(tmp_path: Path) -> None:
    path = tmp_path / "small.gguf"
    proc = run(str(path), "--layers", "1", "--dim", "256", "--ffn", "512", "--heads", "2",
               "--kv-heads", "1", "--vocab", "2256")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    loaded = load_model(path, kernel="numpy")
    try:
        assert loaded.model.config.n_layers == 1 and loaded.tokenizer.vocab_size == 2256
    finally:
        loaded.close()


def test_shape_flags_with_a_preset_are_refused(tmp_path: Path) -> None:
    """A preset has its own shape: --layers (or any shape flag) beside it would be ignored,
    writing gigabytes of the published shape where a small model was asked for."""
    path = tmp_path / "b.gguf"
    proc = run(str(path), "--preset", "bonsai-1.7b", "--layers", "1", "--dim", "256")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].endswith(
        "error: --layers, --dim: a preset has its own shape; drop them or --preset"
    )
    assert not path.exists()


def test_a_preset_is_written_in_its_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """write_preset at a shrunken shape (the real ones are gigabytes): the layout and the
    tokenizer (Qwen's kind, padded to the vocabulary) are what the preset says."""
    small = ModelShape(2, 256, 512, 2, 1, 3000, 512, 1e6, 1e-6, 128)
    tiny = dataclasses.replace(PRESETS["bonsai-8b"], shape=small)
    monkeypatch.setitem(synthetic.PRESETS, "tiny-bonsai", tiny)
    path = write_preset(tmp_path / "b.gguf", "tiny-bonsai")
    loaded = load_model(path, kernel="numpy")
    try:
        config = loaded.model.config
        assert (config.arch, config.q_dim, config.dim) == ("qwen3", 256, 256)
        assert loaded.model.weights.output is not None  # Bonsai-8B: untied
        assert loaded.tokenizer.vocab_size == 3000 and not loaded.tokenizer.add_bos
        assert loaded.model.gguf.get("tokenizer.ggml.pre") == "qwen2"
        assert loaded.tokenizer.id_to_piece(loaded.tokenizer.eos_id) == "<|im_end|>"
        assert loaded.name == "synthetic tiny-bonsai (random weights)"
    finally:
        loaded.close()
