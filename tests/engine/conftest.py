"""Engine fixtures: a small real tokenizer, a scripted stand-in model, tiny GGUF models.

The scripted model keeps generation tests about generation logic (stops, text, cancel,
context limits): with temperature 0 it makes the generator emit an exact token sequence.
The end-to-end tests use the real ``BitNetModel`` on tiny synthetic GGUF files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from bitserve.tokenizer import Tokenizer
from bitserve.tokenizer.bpe import TOKEN_CONTROL, TOKEN_NORMAL, bytes_to_piece

# ids 0..255 are the single bytes; then these words; then control tokens
WORDS = ("Hello", " world", " STO", "P", "ST", "OP", "<", "|", "end", "|>", "é")
CONTROL = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")


def word_id(word: str) -> int:
    return 256 + WORDS.index(word)


def control_id(name: str) -> int:
    return 256 + len(WORDS) + CONTROL.index(name)


def _build_tokenizer() -> Tokenizer:
    tokens = [bytes_to_piece(bytes([b])) for b in range(256)]
    tokens += [bytes_to_piece(w.encode()) for w in WORDS]
    tokens += list(CONTROL)
    types = [TOKEN_NORMAL] * (256 + len(WORDS)) + [TOKEN_CONTROL] * len(CONTROL)
    return Tokenizer(
        tokens,
        types,
        [],
        bos_id=control_id("<|begin_of_text|>"),
        eos_id=control_id("<|end_of_text|>"),
    )


@dataclass
class FakeConfig:
    vocab_size: int
    context_length: int


@dataclass
class FakeCache:
    max_seq: int
    length: int = 0


@dataclass
class ScriptedModel:
    """Stand-in for ``BitNetModel``: after the prompt and after each fed token it returns
    logits that make ``script[step]`` the greedy choice (``+10`` over a flat rest), or flat
    logits once the script runs out. Records every ``forward`` call."""

    script: Sequence[int]
    vocab_size: int
    context_length: int = 64
    calls: list[list[int]] = field(default_factory=list)

    @property
    def config(self) -> FakeConfig:
        return FakeConfig(self.vocab_size, self.context_length)

    def new_cache(self, max_seq: int | None = None) -> FakeCache:
        return FakeCache(self.context_length if max_seq is None else max_seq)

    def forward(
        self, tokens: Sequence[int], cache: FakeCache, all_logits: bool = False
    ) -> np.ndarray:
        assert not all_logits
        assert cache.length + len(tokens) <= cache.max_seq <= self.context_length
        cache.length += len(tokens)
        step = len(self.calls)
        self.calls.append(list(tokens))
        logits = np.zeros(self.vocab_size, dtype=np.float32)
        if step < len(self.script):
            logits[self.script[step]] = 10.0
        return logits


@dataclass(frozen=True)
class TokenIds:
    """Ids of the test vocabulary, for building scripts and prompts."""

    eot: int = control_id("<|eot_id|>")

    @staticmethod
    def word(word: str) -> int:
        return word_id(word)


@pytest.fixture(scope="session")
def ids() -> TokenIds:
    return TokenIds()


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return _build_tokenizer()


@pytest.fixture
def scripted(tokenizer: Tokenizer) -> Callable[..., ScriptedModel]:
    """``scripted(tokens, context_length=64)`` → a model that generates ``tokens``."""

    def make(script: Sequence[int], context_length: int = 64) -> ScriptedModel:
        return ScriptedModel(list(script), tokenizer.vocab_size, context_length)

    return make


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer random model with the demo model's trained tokenizer (fast on numpy)."""
    from bitserve.model.demo import demo_tokenizer_metadata
    from bitserve.model.synthetic import ModelShape, write_synthetic_model

    metadata = demo_tokenizer_metadata()
    shape = ModelShape(
        n_layers=1,
        dim=128,
        ffn_dim=256,
        n_heads=2,
        n_kv_heads=1,
        vocab_size=len(metadata["tokenizer.ggml.tokens"]),
        context_length=96,
    )
    path = tmp_path_factory.mktemp("engine-models") / "tiny-chat.gguf"
    return write_synthetic_model(path, shape, seed=5, tokenizer_metadata=metadata)


@pytest.fixture(scope="session")
def gqa_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two layers, GQA 2:1, 256 positions, the demo tokenizer: every part of the forward
    pass on the native kernels, in milliseconds (batching and prefix-cache tests)."""
    from bitserve.model.demo import demo_tokenizer_metadata
    from bitserve.model.synthetic import ModelShape, write_synthetic_model

    metadata = demo_tokenizer_metadata()
    vocab = len(metadata["tokenizer.ggml.tokens"])
    shape = ModelShape(
        n_layers=2, dim=128, ffn_dim=256, n_heads=4, n_kv_heads=2, vocab_size=vocab,
        context_length=256,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("engine-models") / "tiny.gguf"  # served as "tiny"
    return write_synthetic_model(path, shape, seed=11, tokenizer_metadata=metadata)
