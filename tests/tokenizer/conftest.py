"""Tokenizers for the tokenizer tests: the demo model's trained BPE, and hand-built ones."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

from bitserve.model.demo import demo_tokenizer_metadata
from bitserve.tokenizer.bpe import BYTE_TO_CHAR, Tokenizer

# strings tokenizers get wrong: whitespace runs, digits, contractions, scripts without
# spaces, emoji sequences, characters outside every fixture vocabulary (byte fallback),
# special-token text, non-NFC text, code, long repeats
ADVERSARIAL_TEXTS = (
    "",
    " ",
    "   ",
    "a   b",
    "\n\n\n",
    " \n \n",
    "\t\t x",
    "trailing   ",
    "\r\n\r\nCRLF\r\n",
    "\u00a0nbsp\u3000ideographic\u2028line separator",
    "12345678 3.14159 1,000,000 x2y22z222 ٣٤٥ ①②",
    "I'm you're WE'LL it's don't O'Neil's ''s 'S",
    "你好世界\uff0cこんにちは。안녕하세요",
    "😀🎉👍🏽 👨‍👩‍👧‍👦 🦙🇫🇷",
    "ǅ ᴥ \U0001d518\U0001d52b\U0001d526\U0001d520\U0001d52c\U0001d521\U0001d522 \x00\x01\x7f ☃",
    "<|im_end|> <|eot_id|>hi <s>x</s> <unk>",
    "<think>reason</think> >>TITLE<< <|endoftext|><|endoftext|>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
    "e\u0301 cafe\u0301 A\u030a",
    "def f(x):\n    return x**2  # comment\n\n\n    pass",
    "a" * 300,
    "ab" * 200,
    " " * 50 + "x",
    "The morning was quiet, and the lake held the color of the sky.",
)


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
    return ADVERSARIAL_TEXTS
