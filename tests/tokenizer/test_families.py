"""Each ternary family's byte-level tokenizer against HF ``tokenizers`` built from the same
vocabulary and merges, configured as the family's published ``tokenizer.json`` is.

The fixture metadata (:mod:`bitserve.tokenizer.fixtures`) is what llama.cpp's converter
would write for a vocabulary trained on the demo corpus; our tokenizer reads only that,
the reference reads a tokenizer.json rebuilt from it with the published settings
(written out here, not taken from bitserve's own tables).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import pytest
from tokenizers import Tokenizer as HFTokenizer

from bitserve.gguf import GGUFWriter, read_gguf
from bitserve.tokenizer import IncrementalDetokenizer, Tokenizer
from bitserve.tokenizer.fixtures import FAMILIES, min_vocab_size, tokenizer_metadata
from bitserve.tokenizer.vocab import TOKEN_CONTROL, TOKEN_UNUSED, TOKEN_USER_DEFINED

BYTE_LEVEL = [f for f in FAMILIES if f != "llama-spm"]
ROUND_TRIP = "Hello  world,\n\tit's 12345 o'clock! naïve café 你好 😀🦙"

# the pre-tokenizer, normalizer and decoder sections of the published tokenizer.json files
_LLAMA3_JSON = {  # meta-llama/Meta-Llama-3-8B; llama.cpp reads falcon3 and falcon_e alike
    "normalizer": None,
    "pre_tokenizer": {
        "type": "Sequence",
        "pretokenizers": [
            {
                "type": "Split",
                "pattern": {
                    "Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
                    "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
                },
                "behavior": "Isolated",
                "invert": False,
            },
            {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": True,
                "use_regex": False,
            },
        ],
    },
    "decoder": {
        "type": "ByteLevel",
        "add_prefix_space": True,
        "trim_offsets": True,
        "use_regex": True,
    },
    "ignore_merges": True,
}
_QWEN2_JSON = {  # Qwen/Qwen3-*: NFC, single digits, merges always applied
    "normalizer": {"type": "NFC"},
    "pre_tokenizer": {
        "type": "Sequence",
        "pretokenizers": [
            {
                "type": "Split",
                "pattern": {
                    "Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
                    "\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
                },
                "behavior": "Isolated",
                "invert": False,
            },
            {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": False,
                "use_regex": False,
            },
        ],
    },
    "decoder": {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": False,
    },
    "ignore_merges": False,
}
PUBLISHED = {
    "llama-bpe": _LLAMA3_JSON,
    "falcon3": _LLAMA3_JSON,
    "falcon-e": _LLAMA3_JSON,
    "qwen2": _QWEN2_JSON,
}


def hf_reference(metadata: dict[str, Any], family: str) -> HFTokenizer:
    """HF's tokenizer for the vocabulary in ``metadata``, as its tokenizer.json would be."""
    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata["tokenizer.ggml.token_type"]
    vocab: dict[str, int] = {}
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind != TOKEN_UNUSED:  # [PADn] exist only in the converted file
            vocab.setdefault(token, i)
    added = [
        {
            "id": i,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": kind == TOKEN_CONTROL,
        }
        for i, (token, kind) in enumerate(zip(tokens, types, strict=True))
        if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
    ]
    published = PUBLISHED[family]
    model = {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": published["ignore_merges"],
        "vocab": vocab,
        "merges": metadata["tokenizer.ggml.merges"],
    }
    config = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": published["normalizer"],
        "pre_tokenizer": published["pre_tokenizer"],
        "post_processor": None,
        "decoder": published["decoder"],
        "model": model,
    }
    return HFTokenizer.from_str(json.dumps(config))


@pytest.fixture(scope="module", params=BYTE_LEVEL)
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def pair(family: str) -> tuple[Tokenizer, HFTokenizer]:
    metadata = tokenizer_metadata(family, min_vocab_size(family) + 11)  # with [PADn] too
    return Tokenizer.from_metadata(metadata), hf_reference(metadata, family)


def test_encodes_like_hf(
    pair: tuple[Tokenizer, HFTokenizer], adversarial_texts: tuple[str, ...]
) -> None:
    ours, hf = pair
    wrong = []
    for text in adversarial_texts:
        hf.encode_special_tokens = True  # control-token text as plain text
        plain = hf.encode(text, add_special_tokens=False).ids
        hf.encode_special_tokens = False
        parsed = hf.encode(text, add_special_tokens=False).ids
        if ours.encode(text) != plain or ours.encode(text, allow_special=True) != parsed:
            wrong.append(text)
    assert not wrong


def test_decodes_like_hf(
    pair: tuple[Tokenizer, HFTokenizer], adversarial_texts: tuple[str, ...]
) -> None:
    ours, hf = pair
    for text in adversarial_texts:
        ids = ours.encode(text, allow_special=True)
        assert (
            ours.decode(ids, skip_special=False)
            == hf.decode(ids, skip_special_tokens=False)
            == (hf.normalizer.normalize_str(text) if hf.normalizer else text)
        )
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_streams_like_decode(
    pair: tuple[Tokenizer, HFTokenizer], adversarial_texts: tuple[str, ...]
) -> None:
    ours, _ = pair
    for text in adversarial_texts:
        ids = ours.encode(text)
        detok = IncrementalDetokenizer(ours)
        chunks = [detok.push(i) for i in ids]
        assert "".join(chunks) + detok.flush() == ours.decode(ids)
        assert not any("\ufffd" in c for c in chunks)


def test_control_text_never_becomes_a_control_token(pair: tuple[Tokenizer, HFTokenizer]) -> None:
    ours, _ = pair
    for text, token_id in ours.special_tokens.items():
        assert ours.encode(text, allow_special=True) == [token_id]
        for wrapped in (text, f"x{text}y", f" {text}\n"):
            assert not any(ours.is_special(i) for i in ours.encode(wrapped)), wrapped


@pytest.mark.parametrize(
    ("family", "bos", "eos", "eot", "stops", "add_bos"),
    [
        (
            "llama-bpe",
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|eot_id|>",
            ["<|end_of_text|>", "<|eot_id|>"],
            True,
        ),
        ("falcon3", "<|endoftext|>", "<|endoftext|>", "<|endoftext|>", ["<|endoftext|>"], True),
        ("falcon-e", "<|endoftext|>", "<|endoftext|>", "<|endoftext|>", ["<|endoftext|>"], True),
        (
            "qwen2",
            "<|endoftext|>",
            "<|im_end|>",
            "<|im_end|>",
            ["<|endoftext|>", "<|im_end|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"],
            False,
        ),
        ("llama-spm", "<s>", "</s>", None, ["</s>"], True),
    ],
)
def test_special_tokens_of_each_family(
    family: str, bos: str, eos: str, eot: str | None, stops: list[str], add_bos: bool
) -> None:
    tok = Tokenizer.from_metadata(tokenizer_metadata(family))
    piece = lambda i: None if i is None else tok.id_to_piece(i)  # noqa: E731
    assert (piece(tok.bos_id), piece(tok.eos_id), piece(tok.eot_id)) == (bos, eos, eot)
    assert sorted(tok.id_to_piece(i) for i in tok.stop_ids) == sorted(stops)
    assert tok.add_bos is add_bos
    assert tok.encode("hi", add_bos=True)[0] == tok.bos_id


def test_qwen3_think_tags_are_text_tokens() -> None:
    tok = Tokenizer.from_metadata(tokenizer_metadata("qwen2"))
    ids = tok.encode("<think>a</think>")  # user-defined tokens match even in user text
    pieces = [tok.id_to_piece(i) for i in ids]
    assert pieces[0] == "<think>" and pieces[-1] == "</think>"
    assert not any(tok.is_special(i) for i in ids)
    assert tok.decode(ids) == "<think>a</think>"


@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_metadata_round_trips(family: str) -> None:
    tok = Tokenizer.from_metadata(tokenizer_metadata(family))
    assert tok.vocab_size == min_vocab_size(family)
    ids = tok.encode(ROUND_TRIP)
    prefix = " " if family == "llama-spm" else ""  # SentencePiece's add_space_prefix
    assert tok.decode(ids) == prefix + ROUND_TRIP
    assert len(ids) < len(ROUND_TRIP.encode())


@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_pads_to_vocab_size(family: str) -> None:
    small = Tokenizer.from_metadata(tokenizer_metadata(family))
    size = min_vocab_size(family) + 37
    big = Tokenizer.from_metadata(tokenizer_metadata(family, size))
    assert big.vocab_size == size
    assert big.encode(ROUND_TRIP) == small.encode(ROUND_TRIP)
    if family == "llama-bpe":  # LLaMA-3 keeps its 256 control tokens last
        assert (big.bos_id, big.eos_id, big.eot_id) == (size - 256, size - 255, size - 247)
    else:  # [PADn] unused tokens at the end, never produced, never shown
        assert (big.bos_id, big.eos_id, big.stop_ids) == (
            small.bos_id,
            small.eos_id,
            small.stop_ids,
        )
        assert big.id_to_piece(size - 1) == f"[PAD{size - 1}]" and big.is_special(size - 1)
        assert big.decode([size - 1]) == ""
    with pytest.raises(ValueError, match=f"below the {family} fixture"):
        tokenizer_metadata(family, min_vocab_size(family) - 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_from_gguf_file(tmp_path: Path, family: str) -> None:
    metadata = tokenizer_metadata(family)
    writer = GGUFWriter()
    writer.add("general.architecture", "llama")
    for key, value in metadata.items():
        writer.add(key, value)
    writer.write(tmp_path / "vocab.gguf")
    with read_gguf(tmp_path / "vocab.gguf") as file:
        tok = Tokenizer.from_gguf(file)
    direct = Tokenizer.from_metadata(metadata)
    assert tok.encode(ROUND_TRIP, add_bos=True) == direct.encode(ROUND_TRIP, add_bos=True)
    assert tok.stop_ids == direct.stop_ids and tok.add_bos == direct.add_bos
    # typed as llama.cpp's converter writes them (llama.cpp refuses other types)
    fields = gguf.GGUFReader(tmp_path / "vocab.gguf").fields
    V = gguf.GGUFValueType
    assert fields["tokenizer.ggml.token_type"].types == [V.ARRAY, V.INT32]
    assert fields["tokenizer.ggml.tokens"].types == [V.ARRAY, V.STRING]
    if family == "llama-spm":
        assert fields["tokenizer.ggml.scores"].types == [V.ARRAY, V.FLOAT32]
    else:
        assert fields["tokenizer.ggml.merges"].types == [V.ARRAY, V.STRING]


def test_unknown_family() -> None:
    with pytest.raises(ValueError, match="unknown tokenizer family 'gpt-j'; known: llama-bpe"):
        tokenizer_metadata("gpt-j")


@pytest.mark.parametrize("family", FAMILIES)
def test_split_special(family: str) -> None:
    tok = Tokenizer.from_metadata(tokenizer_metadata(family))
    eos = tok.eos_id
    assert eos is not None
    end = tok.id_to_piece(eos)
    text = f"cafe\u0301 {end} <think>x</think>\n{end}"  # not NFC; qwen2 normalizes
    assert tok.split_special(text) == ["cafe\u0301 ", eos, " <think>x</think>\n", eos]
