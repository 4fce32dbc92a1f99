"""Byte-level BPE built from GGUF metadata: encoding, decoding, special tokens, errors."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bitserve.gguf import GGUFError, GGUFWriter, read_gguf
from bitserve.tokenizer.bpe import Tokenizer, bytes_to_piece, piece_to_bytes

TEXTS = [
    "The morning was quiet, and the lake held the color of the sky.",
    "def mean(values):\n    return sum(values) / len(values)\n",
    "Temperature: 21°C, naïve café, déjà vu — “quoted” … done",
    "Emoji 😀🎉👍 and CJK 你好世界 and Hangul 안녕하세요 and Arabic ١٢٣",
    "  leading and trailing spaces  \n\n\ttabs\r\nand CRLF  ",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(demo_tokenizer: Tokenizer, text: str) -> None:
    ids = demo_tokenizer.encode(text)
    assert demo_tokenizer.decode(ids) == text
    assert b"".join(demo_tokenizer.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert all(0 <= i < demo_tokenizer.vocab_size for i in ids)


def test_trained_merges_compress_common_text(demo_tokenizer: Tokenizer) -> None:
    text = "The morning was quiet, and the lake held the color of the sky."
    assert len(demo_tokenizer.encode(text)) < len(text.encode("utf-8")) // 2


def test_pieces_are_byte_level(demo_tokenizer: Tokenizer) -> None:
    ids = demo_tokenizer.encode(" the")
    assert [demo_tokenizer.id_to_piece(i) for i in ids] == ["Ġthe"]
    assert piece_to_bytes("Ġthe") == b" the"
    for raw in (bytes(range(256)), "😀".encode()):
        assert piece_to_bytes(bytes_to_piece(raw)) == raw


@pytest.mark.parametrize(
    ("merges", "pieces"),
    [
        (["Ġ t", "h e", "Ġt he", "Ġt h"], ["Ġthe"]),  # h+e outranks Ġt+h
        (["Ġ t", "Ġt h", "h e", "Ġt he"], ["Ġth", "e"]),  # Ġt+h first: Ġthe unreachable
    ],
)
def test_merges_applied_in_rank_order(
    make_byte_metadata: Callable[..., dict[str, Any]], merges: list[str], pieces: list[str]
) -> None:
    extra = [("Ġt", 1), ("he", 1), ("Ġthe", 1), ("Ġth", 1)]
    tok = Tokenizer.from_metadata(make_byte_metadata(extra, merges, pre="gpt-2"))
    assert [tok.id_to_piece(i) for i in tok.encode(" the")] == pieces


@pytest.mark.parametrize(
    ("pre", "whole"),
    [
        ("llama-bpe", True),
        (None, True),
        ("falcon3", True),
        ("falcon_e", True),
        ("gpt-2", False),
        ("qwen2", False),
        ("default", False),
    ],
)
def test_llama3_takes_whole_words_from_the_vocabulary(
    make_byte_metadata: Callable[..., dict[str, Any]], pre: str | None, whole: bool
) -> None:
    # "Ġcat" is in the vocabulary but no merge builds it: LLaMA-3 (like tiktoken and
    # llama.cpp) still uses it; plain GPT-2 BPE (and Qwen2's) cannot reach it
    keys = {} if pre is None else {"pre": pre}
    tok = Tokenizer.from_metadata(make_byte_metadata([("Ġcat", 1)], [], **keys))
    pieces = [tok.id_to_piece(i) for i in tok.encode(" cat")]
    assert pieces == (["Ġcat"] if whole else ["Ġ", "c", "a", "t"])


def test_special_ids(demo_tokenizer: Tokenizer, demo_metadata: dict[str, Any]) -> None:
    tokens = demo_metadata["tokenizer.ggml.tokens"]
    tok = demo_tokenizer
    assert tok.vocab_size == len(tokens)
    assert tok.bos_id is not None and tokens[tok.bos_id] == "<|begin_of_text|>"
    assert tok.eos_id is not None and tokens[tok.eos_id] == "<|end_of_text|>"
    assert tok.eot_id is not None and tokens[tok.eot_id] == "<|eot_id|>"
    assert tok.stop_ids == {tok.eos_id, tok.eot_id}
    assert tok.add_bos
    assert tok.encode("hi", add_bos=True) == [tok.bos_id, *tok.encode("hi")]
    assert tok.is_special(tok.eot_id) and not tok.is_special(tok.encode("hi")[0])


def test_optional_keys(make_byte_metadata: Callable[..., dict[str, Any]]) -> None:
    extra = [("<|end|>", 3), ("<|eom_id|>", 3), ("<|stop|>", 3)]
    meta = make_byte_metadata(
        extra, eos_token_id=256, eom_token_id=257, eot_token_id=258, add_bos_token=False
    )
    tok = Tokenizer.from_metadata(meta)
    assert tok.stop_ids == {256, 257, 258}
    assert tok.eot_id == 258  # the file's end of turn, though not spelled <|eot_id|>
    assert tok.bos_id is None and not tok.add_bos
    assert tok.encode("a", add_bos=True) == tok.encode("a")


def test_control_text_in_user_content_stays_text(demo_tokenizer: Tokenizer) -> None:
    tok = demo_tokenizer
    text = "before<|eot_id|>after <|begin_of_text|>"
    plain = tok.encode(text)
    assert not any(tok.is_special(i) for i in plain)
    assert tok.decode(plain) == text
    allowed = tok.encode(text, allow_special=True)
    assert [i for i in allowed if tok.is_special(i)] == [tok.eot_id, tok.bos_id]
    assert tok.decode(allowed, skip_special=False) == text
    assert tok.decode(allowed) == "beforeafter "


def test_no_control_token_text_can_be_injected(demo_tokenizer: Tokenizer) -> None:
    for text, token_id in demo_tokenizer.special_tokens.items():
        assert demo_tokenizer.encode(text, allow_special=True) == [token_id]
        for wrapped in (text, f"x{text}y", f" {text}\n"):
            ids = demo_tokenizer.encode(wrapped)
            assert not any(demo_tokenizer.is_special(i) for i in ids), wrapped


def test_user_defined_tokens_always_match(
    make_byte_metadata: Callable[..., dict[str, Any]],
) -> None:
    tok = Tokenizer.from_metadata(make_byte_metadata([("<tool>", 4), ("<ctl>", 3)]))
    assert tok.encode("a<tool>b") == [ord("a"), 256, ord("b")]
    assert tok.decode([256]) == "<tool>"  # not a control token: never skipped
    assert tok.token_bytes(256) == b"<tool>"
    assert 257 not in tok.encode("<ctl>")
    assert tok.token_bytes(257) == b"<ctl>" and tok.decode([257]) == ""


def test_split_special(demo_tokenizer: Tokenizer) -> None:
    tok = demo_tokenizer
    parts = tok.split_special("<|begin_of_text|>User: hi<|eot_id|>Assistant: ")
    assert parts == [tok.bos_id, "User: hi", tok.eot_id, "Assistant: "]
    assert tok.split_special("no specials") == ["no specials"]


def test_out_of_range_ids(demo_tokenizer: Tokenizer) -> None:
    for bad in (-1, demo_tokenizer.vocab_size):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            demo_tokenizer.decode([bad])
        with pytest.raises(ValueError, match="outside the vocabulary"):
            demo_tokenizer.token_bytes(bad)


def test_unsupported_metadata(make_byte_metadata: Callable[..., dict[str, Any]]) -> None:
    with pytest.raises(ValueError, match=r"'tekken'.*supported: .*llama-bpe.*qwen2"):
        Tokenizer.from_metadata(make_byte_metadata(pre="tekken"))
    with pytest.raises(ValueError, match=r"'bert'; supported: gpt2 .*llama"):
        Tokenizer.from_metadata({**make_byte_metadata(), "tokenizer.ggml.model": "bert"})
    with pytest.raises(ValueError, match=r"needs tokenizer\.ggml\.scores"):
        Tokenizer.from_metadata({**make_byte_metadata(), "tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="merge 0"):
        Tokenizer.from_metadata(make_byte_metadata(merges=["nospace"]))
    with pytest.raises(ValueError, match="invalid BPE"):
        Tokenizer.from_metadata(make_byte_metadata(merges=["Ġ zz"]))
    with pytest.raises(ValueError, match=r"no tokenizer\.ggml\.tokens"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(ValueError, match="bos token id"):
        Tokenizer.from_metadata(make_byte_metadata(bos_token_id=999))


def test_from_gguf(
    tmp_path: Path, demo_metadata: dict[str, Any], demo_tokenizer: Tokenizer
) -> None:
    writer = GGUFWriter()
    writer.add("general.architecture", "bitnet-b1.58")
    for key, value in demo_metadata.items():
        writer.add(key, value)
    writer.write(tmp_path / "tok.gguf")
    with read_gguf(tmp_path / "tok.gguf") as gguf:
        tok = Tokenizer.from_gguf(gguf)
    text = TEXTS[3]
    assert tok.encode(text, add_bos=True) == demo_tokenizer.encode(text, add_bos=True)
    assert tok.stop_ids == demo_tokenizer.stop_ids


def test_user_defined_stop_tokens_become_control_tokens(
    make_byte_metadata: Callable[..., dict[str, Any]],
) -> None:
    # llama.cpp makes a token spelled like an end of generation a control token, so user
    # text cannot stop a reply by spelling it
    tok = Tokenizer.from_metadata(make_byte_metadata([("<|im_end|>", 4), ("<tool>", 4)]))
    assert tok.stop_ids == {256} and tok.eot_id == 256 and tok.is_special(256)
    assert 256 not in tok.encode("a<|im_end|>b")
    assert tok.encode("<|im_end|>", allow_special=True) == [256]
    assert tok.encode("<tool>") == [257]  # other user-defined tokens still match


def test_unused_and_unknown_tokens_are_hidden(
    make_byte_metadata: Callable[..., dict[str, Any]],
) -> None:
    tok = Tokenizer.from_metadata(make_byte_metadata([("[PAD256]", 5), ("<unk>", 2)]))
    assert tok.is_special(256) and tok.is_special(257)
    assert tok.token_bytes(256) == b"" and tok.decode([256], skip_special=False) == ""
    assert tok.decode([257]) == "" and tok.decode([257], skip_special=False) == "<unk>"
    assert 257 not in tok.encode("<unk>") and tok.encode("<unk>", allow_special=True) == [257]


def test_file_problems_name_the_file(
    tmp_path: Path, make_byte_metadata: Callable[..., dict[str, Any]]
) -> None:
    writer = GGUFWriter()
    writer.add("general.architecture", "llama")
    for key, value in make_byte_metadata(pre="tekken", padding_token_id=999).items():
        writer.add(key, value)
    writer.write(tmp_path / "odd.gguf")
    with read_gguf(tmp_path / "odd.gguf") as gguf, pytest.raises(GGUFError) as caught:
        Tokenizer.from_gguf(gguf)
    assert str(caught.value).startswith(str(tmp_path / "odd.gguf"))
    assert "unsupported tokenizer.ggml.pre 'tekken'" in str(caught.value)


def test_padding_id_past_the_vocabulary_is_ignored(
    make_byte_metadata: Callable[..., dict[str, Any]],
) -> None:
    # files in the wild carry one; llama.cpp ignores it and nothing here uses it
    tok = Tokenizer.from_metadata(make_byte_metadata(padding_token_id=999))
    assert tok.encode("a") == [ord("a")]


def test_encoding_a_long_text_lets_other_threads_run(demo_tokenizer: Tokenizer) -> None:
    """The server encodes prompts on worker threads; its event loop must keep running
    meanwhile, so encoding must not hold the GIL for its whole length."""
    text = "hello world, this is a test of things. " * 25_000  # ~1 MB
    ticks = 0
    done = threading.Event()

    def tick() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            time.sleep(0.001)

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        start = time.perf_counter()
        demo_tokenizer.encode(text)
        took = time.perf_counter() - start
    finally:
        done.set()
        ticker.join()
    # a held GIL lets the ticker run a handful of times (at the 5 ms switch interval at
    # best); a released one, about once per millisecond of encoding
    assert ticks >= 0.25 * took * 1000, (ticks, took)
