"""The demo model: deterministic, cached atomically, loadable, with a working tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitserve.gguf import read_gguf
from bitserve.model.config import ModelConfig
from bitserve.model.demo import (
    DEMO_NOTICE,
    DEMO_VERSION,
    cache_dir,
    demo_model_path,
    demo_tokenizer_metadata,
    llama3_tokenizer_metadata,
    write_demo_model,
)
from bitserve.tokenizer import ChatFormatter, Tokenizer

SAMPLES = [
    "The baker wakes at four, lights the oven, and measures flour by feel.",
    "A sentence the corpus never saw: zebras juggle quartz at 03:17, 😀 你好!",
]


def test_two_builds_are_identical(tmp_path: Path) -> None:
    first = write_demo_model(tmp_path / "a.gguf")
    second = write_demo_model(tmp_path / "b.gguf")
    assert first.read_bytes() == second.read_bytes()


def test_built_once_then_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITSERVE_CACHE", str(tmp_path / "cache"))
    path = demo_model_path()
    assert path.parent == tmp_path / "cache"
    assert f"v{DEMO_VERSION}" in path.name
    stat = path.stat()
    assert demo_model_path() == path
    again = path.stat()
    assert (again.st_ino, again.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files left


def test_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BITSERVE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "bitserve"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "bitserve"
    monkeypatch.setenv("BITSERVE_CACHE", str(tmp_path / "explicit"))
    assert cache_dir() == tmp_path / "explicit"


def test_loads_as_a_chat_model() -> None:
    with read_gguf(demo_model_path()) as gguf:
        config = ModelConfig.from_gguf(gguf)
        tok = Tokenizer.from_gguf(gguf)
        chat = ChatFormatter.from_gguf(gguf, tok)
        assert "random weights" in gguf.get("general.name")
    assert config.vocab_size == tok.vocab_size
    assert (config.n_layers, config.dim, config.head_dim, config.gqa_group) == (4, 256, 64, 4)
    assert config.context_length == 2048 and config.ffn_dim % 128 == 0
    assert config.activation == "relu2"
    assert chat.is_bitnet_format
    ids = chat.encode([{"role": "user", "content": "Hello!"}])
    assert ids[0] == tok.bos_id and tok.decode(ids[1:]) == "User: Hello!Assistant: "
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text
    assert "random weights" in DEMO_NOTICE


def test_vocabulary() -> None:
    metadata = demo_tokenizer_metadata()
    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata["tokenizer.ggml.token_type"]
    assert len(tokens) == len(set(tokens)) == len(types)
    assert types.count(3) == 256 and 1900 <= types.count(1) <= 2100
    tok = Tokenizer.from_metadata(metadata)
    # trained on the shipped corpus: common words are single tokens
    assert [tok.id_to_piece(i) for i in tok.encode(" the morning")] == ["Ġthe", "Ġmorning"]


def test_llama3_shaped_table() -> None:
    metadata = llama3_tokenizer_metadata()
    small = Tokenizer.from_metadata(demo_tokenizer_metadata())
    big = Tokenizer.from_metadata(metadata)
    assert big.vocab_size == 128256
    assert (big.bos_id, big.eos_id, big.eot_id) == (128000, 128001, 128009)
    assert big.stop_ids == {128001, 128009}
    assert big.id_to_piece(128006) == "<|start_header_id|>"
    assert big.is_special(127999) and not big.is_special(0)
    assert len(set(metadata["tokenizer.ggml.tokens"])) == 128256
    for text in SAMPLES:  # the trained tokens keep their ids
        assert big.encode(text) == small.encode(text)
    chat = ChatFormatter.from_metadata(metadata, big)
    assert chat.encode([{"role": "user", "content": "hi"}])[0] == 128000


def test_llama3_shaped_table_sizes() -> None:
    assert llama3_tokenizer_metadata(4096)["tokenizer.ggml.bos_token_id"] == 4096 - 256
    with pytest.raises(ValueError, match="below the minimum"):
        llama3_tokenizer_metadata(2100)
