"""Streaming detokenization: only whole UTF-8 characters, same text as decode()."""

from __future__ import annotations

import pytest

from bitserve.tokenizer.bpe import BYTE_TO_CHAR, Tokenizer
from bitserve.tokenizer.detokenizer import IncrementalDetokenizer


def byte_token(tok: Tokenizer, byte: int) -> int:
    """The id of the single-byte token for ``byte``."""
    piece = BYTE_TO_CHAR[byte]
    return next(i for i in range(tok.vocab_size) if tok.id_to_piece(i) == piece)


@pytest.mark.parametrize(
    "text", ["Emoji 😀🎉👍 and CJK 你好世界, café", "🚀🌍🐱☕ ①②③ 안녕하세요", "plain ascii text"]
)
def test_stream_matches_decode(demo_tokenizer: Tokenizer, text: str) -> None:
    ids = demo_tokenizer.encode(text)
    detok = IncrementalDetokenizer(demo_tokenizer)
    chunks = [detok.push(i) for i in ids]
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) + detok.flush() == text == demo_tokenizer.decode(ids)


def test_multibyte_characters_are_held_back(demo_tokenizer: Tokenizer) -> None:
    # the demo vocabulary has no token for 😀's bytes beyond the first two
    ids = demo_tokenizer.encode("😀")
    assert len(ids) > 1, "test needs an emoji split over several tokens"
    detok = IncrementalDetokenizer(demo_tokenizer)
    assert [detok.push(i) for i in ids] == [""] * (len(ids) - 1) + ["😀"]
    assert detok.pending_bytes == b""


def test_one_byte_at_a_time(demo_tokenizer: Tokenizer) -> None:
    text = "a😀你b"
    detok = IncrementalDetokenizer(demo_tokenizer)
    out = [detok.push(byte_token(demo_tokenizer, b)) for b in text.encode("utf-8")]
    assert out == ["a", "", "", "", "😀", "", "", "你", "b"]


def test_flush_replaces_an_incomplete_tail(demo_tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(demo_tokenizer)
    assert detok.push(byte_token(demo_tokenizer, ord("x"))) == "x"
    for b in "😀".encode()[:3]:
        assert detok.push(byte_token(demo_tokenizer, b)) == ""
    assert detok.pending_bytes == "😀".encode()[:3]
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""
    assert detok.push(byte_token(demo_tokenizer, ord("y"))) == "y"  # reusable after flush


def test_invalid_bytes_are_replaced_at_once(demo_tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(demo_tokenizer)
    assert detok.push(byte_token(demo_tokenizer, 0xFF)) == "\ufffd"
    # a lead byte followed by a non-continuation byte: both known bad / good at once
    assert detok.push(byte_token(demo_tokenizer, 0xE4)) == ""
    assert detok.push(byte_token(demo_tokenizer, ord("z"))) == "\ufffdz"


def test_special_tokens(demo_tokenizer: Tokenizer) -> None:
    eot = demo_tokenizer.eot_id
    assert eot is not None
    assert IncrementalDetokenizer(demo_tokenizer).push(eot) == ""
    shown = IncrementalDetokenizer(demo_tokenizer, skip_special=False)
    assert shown.push(eot) == "<|eot_id|>"
