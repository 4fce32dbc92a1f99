"""Tokenizers for the tokenizer tests: the demo model's trained BPE, and hand-built ones."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

from bitserve.model.demo import demo_tokenizer_metadata
from bitserve.tokenizer.bpe import BYTE_TO_CHAR, Tokenizer
from bitserve.tokenizer.fixtures import ADVERSARIAL_TEXTS, random_texts


@pytest.fixture(scope="session")
def demo_metadata() -> dict[str, Any]:
    return demo_tokenizer_metadata()


@pytest.fixture(scope="session")
def demo_tokenizer(demo_metadata: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_metadata(demo_metadata)


def byte_metadata(
    extra: Sequence[tuple[str, int]] = (), merges: Sequence[str] = (), **keys: Any
) -> dict[str, Any]:
    """Metadata of a vocabulary of the 256 byte tokens, then ``extra`` (piece, type)."""
    tokens = [BYTE_TO_CHAR[b] for b in range(256)] + [piece for piece, _ in extra]
    types = [1] * 256 + [kind for _, kind in extra]
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": list(merges),
    }
    metadata.update({f"tokenizer.ggml.{k}": v for k, v in keys.items()})
    return metadata


@pytest.fixture
def make_byte_metadata() -> Callable[..., dict[str, Any]]:
    return byte_metadata


@pytest.fixture(scope="session")
def adversarial_texts() -> tuple[str, ...]:
    """The hand-picked hard strings and 500 random ones (fixed seed)."""
    return (*ADVERSARIAL_TEXTS, *random_texts(500))
