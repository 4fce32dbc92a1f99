"""Pre-token splits of spec §5, checked through the real pre-tokenizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from bitserve.tokenizer.bpe import Tokenizer

LLAMA3_SPLITS = [
    ("I'm", ["I", "'m"]),
    ("x = (a+b)", ["x", " =", " (", "a", "+b", ")"]),
    ("costs $12345", ["costs", " $", "123", "45"]),
    ("Hello\n\nworld  !", ["Hello", "\n\n", "world", " ", " !"]),
    ("WE'LL SEE", ["WE", "'LL", " SEE"]),  # the contractions are case-insensitive
]


@pytest.mark.parametrize(("text", "pieces"), LLAMA3_SPLITS)
@pytest.mark.parametrize("pre", [None, "llama-bpe"])
def test_llama3_splits(
    make_byte_metadata: Callable[..., dict[str, Any]],
    text: str,
    pieces: list[str],
    pre: str | None,
) -> None:
    keys = {} if pre is None else {"pre": pre}
    tok = Tokenizer.from_metadata(make_byte_metadata(**keys))
    assert tok.pre_tokenize(text) == pieces


def test_gpt2_pre_tokenizer_differs_on_numbers(
    make_byte_metadata: Callable[..., dict[str, Any]],
) -> None:
    tok = Tokenizer.from_metadata(make_byte_metadata(pre="gpt-2"))
    assert tok.pre_tokenize("costs $12345") == ["costs", " $", "12345"]


def test_demo_tokenizer_uses_llama3_splits(demo_tokenizer: Tokenizer) -> None:
    for text, pieces in LLAMA3_SPLITS:
        assert demo_tokenizer.pre_tokenize(text) == pieces
