"""ModelConfig.from_gguf: which FFN activation each architecture gets (spec §4), and the
derived sizes. The files hold metadata only, so a 128256-token vocabulary costs nothing."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from bitserve.gguf.reader import GGUFError, read_gguf
from bitserve.gguf.writer import GGUFWriter
from bitserve.model import ModelConfig
from bitserve.model.config import SUPPORTED_ARCHITECTURES


def config_for(tmp_path: Path, arch: str, vocab: int = 256, **extra: Any) -> ModelConfig:
    w = GGUFWriter()
    w.add("general.architecture", arch)
    for key, value in {
        "vocab_size": vocab,
        "embedding_length": 2560,
        "feed_forward_length": 6912,
        "block_count": 30,
        "attention.head_count": 20,
        "attention.head_count_kv": 5,
        **extra,
    }.items():
        w.add(f"{arch}.{key}", value)
    w.write(tmp_path / "m.gguf")
    with read_gguf(tmp_path / "m.gguf") as g:
        return ModelConfig.from_gguf(g)


@pytest.mark.parametrize("arch", ["bitnet-b1.58", "bitnet-25"])
@pytest.mark.parametrize("vocab", [256, 32000, 128256])
def test_bitnet_b158_is_always_squared_relu(tmp_path: Path, arch: str, vocab: int) -> None:
    assert config_for(tmp_path, arch, vocab).activation == "relu2"


@pytest.mark.parametrize("key", ["hidden_act", "hidden_activation"])
@pytest.mark.parametrize(("value", "expected"), [("silu", "silu"), ("relu2", "relu2")])
def test_bitnet_honours_hidden_act(tmp_path: Path, key: str, value: str, expected: str) -> None:
    # the key wins over the vocabulary rule in both directions
    vocab = 128256 if expected == "silu" else 32000
    assert config_for(tmp_path, "bitnet", vocab, **{key: value}).activation == expected


def test_bitnet_without_key_chooses_by_vocabulary(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="bitserve.model.config"):
        assert config_for(tmp_path, "bitnet", 128256).activation == "relu2"
        assert config_for(tmp_path, "bitnet", 32000).activation == "silu"
        assert config_for(tmp_path, "bitnet", 300).activation == "silu"
    assert "relu2" in caplog.text and "silu" in caplog.text


def test_unknown_arch_lists_the_supported_ones(tmp_path: Path) -> None:
    with pytest.raises(GGUFError) as e:
        config_for(tmp_path, "gpt2")
    assert "'gpt2'" in e.value.problem
    assert all(arch in e.value.problem for arch in SUPPORTED_ARCHITECTURES)


def test_unknown_hidden_act_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="gelu"):
        config_for(tmp_path, "bitnet", hidden_act="gelu")


def test_derived_sizes_of_2b4t(tmp_path: Path) -> None:
    c = config_for(tmp_path, "bitnet-b1.58", 128256, **{"rope.freq_base": 500000.0})
    assert (c.head_dim, c.kv_dim, c.gqa_group) == (128, 640, 4)
    assert (c.n_layers, c.dim, c.ffn_dim, c.vocab_size) == (30, 2560, 6912, 128256)
    assert (c.context_length, c.rope_theta, c.norm_eps) == (4096, 500000.0, pytest.approx(1e-5))
