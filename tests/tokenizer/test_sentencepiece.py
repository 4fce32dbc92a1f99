"""SentencePiece-style vocabularies (``tokenizer.ggml.model`` = ``llama``, LLaMA-2's).

Three references: the ``sentencepiece`` library itself, on a model trained here with
LLaMA-2's trainer settings and converted to GGUF keys the way llama.cpp's converter
does; HF ``tokenizers`` with LLaMA-2's published tokenizer.json (merges listed from the
scores as transformers' converter lists them); and a plain transcription of llama.cpp's
SPM algorithm (score-ranked merges of adjacent symbols, leftmost first on ties, byte
fallback for what no piece holds).
"""

from __future__ import annotations

import heapq
import io
import json
from collections.abc import Sequence
from importlib import resources
from typing import Any

import pytest
import sentencepiece
from tokenizers import Tokenizer as HFTokenizer

from bitserve.tokenizer import IncrementalDetokenizer, Tokenizer
from bitserve.tokenizer.fixtures import tokenizer_metadata
from bitserve.tokenizer.vocab import (
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    TOKEN_UNUSED,
)


@pytest.fixture(scope="module")
def sp() -> sentencepiece.SentencePieceProcessor:
    """A BPE model trained on the demo corpus as LLaMA-2's tokenizer.model was trained."""
    corpus = resources.files("bitserve.data").joinpath("demo_corpus.txt").read_text("utf-8")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus.splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=1000,
        hard_vocab_limit=False,
        split_digits=True,
        byte_fallback=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        character_coverage=0.99,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())


def converted_metadata(
    sp: sentencepiece.SentencePieceProcessor, vocab_size: int | None = None
) -> dict[str, Any]:
    """GGUF keys as llama.cpp's convert_hf_to_gguf.py writes them for a tokenizer.model."""
    n = sp.get_piece_size()
    tokens, scores, types = [], [], []
    for i in range(n):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        kind = TOKEN_NORMAL
        if sp.is_unknown(i):
            kind = TOKEN_UNKNOWN
        elif sp.is_control(i):
            kind = TOKEN_CONTROL
        elif sp.is_unused(i):
            kind = TOKEN_UNUSED
        elif sp.is_byte(i):
            kind = TOKEN_BYTE
        types.append(kind)
    for i in range(n, vocab_size or n):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(TOKEN_UNUSED)
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }


def llama_cpp_spm(metadata: dict[str, Any], text: str, add_space_prefix: bool = True) -> list[int]:
    """llama.cpp's ``llm_tokenizer_spm`` on one run of plain text, written out plainly."""
    pieces: Sequence[str] = metadata["tokenizer.ggml.tokens"]
    scores: Sequence[float] = metadata["tokenizer.ggml.scores"]
    if not text:
        return []
    ids = {p: i for i, p in enumerate(pieces)}
    symbols = list((" " + text if add_space_prefix else text).replace(" ", "\u2581"))
    prev = [i - 1 for i in range(len(symbols))]
    nxt = [i + 1 if i + 1 < len(symbols) else -1 for i in range(len(symbols))]
    queue: list[tuple[float, int, int, int]] = []

    def add_bigram(left: int, right: int) -> None:
        if left == -1 or right == -1:
            return
        merged = symbols[left] + symbols[right]
        if merged in ids:  # best score first, then leftmost
            heapq.heappush(queue, (-scores[ids[merged]], left, right, len(merged.encode())))

    for i in range(1, len(symbols)):
        add_bigram(i - 1, i)
    while queue:
        _, left, right, size = heapq.heappop(queue)
        if not symbols[left] or not symbols[right]:
            continue
        if len(symbols[left].encode()) + len(symbols[right].encode()) != size:
            continue
        symbols[left] += symbols[right]
        symbols[right] = ""
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        add_bigram(prev[left], left)
        add_bigram(left, nxt[left])
    out: list[int] = []
    i = 0
    while i != -1:
        symbol = symbols[i]
        if symbol in ids:
            out.append(ids[symbol])
        else:  # no piece holds it: its UTF-8 bytes
            out += [ids[f"<0x{b:02X}>"] for b in symbol.encode()]
        i = nxt[i]
    return out


def hf_llama2_reference(sp: sentencepiece.SentencePieceProcessor) -> HFTokenizer:
    """HF's tokenizer for ``sp`` as meta-llama/Llama-2-7b-hf's tokenizer.json is built:
    BPE with byte fallback, every two-piece split of each piece as a merge ranked by the
    piece's score, the ``▁`` normalizer and decoder."""
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(n)}
    merges = []
    for piece in vocab:
        local = [
            (piece[:k], piece[k:])
            for k in range(1, len(piece))
            if piece[:k] in vocab and piece[k:] in vocab
        ]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: scores[m[0] + m[1]], reverse=True)  # stable
    special = [sp.id_to_piece(i) for i in (sp.unk_id(), sp.bos_id(), sp.eos_id())]
    config = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": vocab[p],
                "content": p,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for p in special
        ],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "\u2581"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [list(m) for m in merges],
        },
    }
    return HFTokenizer.from_str(json.dumps(config))


def test_encodes_and_decodes_like_hf(
    sp: sentencepiece.SentencePieceProcessor, adversarial_texts: tuple[str, ...]
) -> None:
    tok = Tokenizer.from_metadata(converted_metadata(sp))
    hf = hf_llama2_reference(sp)
    wrong = []
    for text in (*adversarial_texts, "<s>Hi</s> there", " </s>x"):
        hf.encode_special_tokens = True
        plain = hf.encode(text, add_special_tokens=False).ids
        hf.encode_special_tokens = False
        parsed = hf.encode(text, add_special_tokens=False).ids
        if tok.encode(text) != plain or tok.encode(text, allow_special=True) != parsed:
            wrong.append(text)
            continue
        # HF's decoder strips one leading space of the whole text (the one the encoder
        # put in front); llama.cpp keeps it with the first token
        ours = tok.decode(parsed, skip_special=False)
        if ours.removeprefix(" ") != hf.decode(parsed, skip_special_tokens=False):
            wrong.append(text)
    assert not wrong


def test_converter_layout(sp: sentencepiece.SentencePieceProcessor) -> None:
    tok = Tokenizer.from_metadata(converted_metadata(sp))
    assert (tok.bos_id, tok.eos_id, tok.stop_ids, tok.add_bos) == (1, 2, {2}, True)
    assert tok.id_to_piece(0) == "<unk>" and tok.is_special(0)
    assert tok.id_to_piece(3 + 0x0A) == "<0x0A>" and tok.token_bytes(3 + 0x0A) == b"\n"


def test_encodes_like_sentencepiece_and_llama_cpp(
    sp: sentencepiece.SentencePieceProcessor, adversarial_texts: tuple[str, ...]
) -> None:
    metadata = converted_metadata(sp)
    tok = Tokenizer.from_metadata(metadata)
    wrong = []
    for text in adversarial_texts:
        ours = tok.encode(text)
        if not ours == sp.encode(text) == llama_cpp_spm(metadata, text):
            wrong.append(text)
    assert not wrong


def test_decodes_like_sentencepiece(
    sp: sentencepiece.SentencePieceProcessor, adversarial_texts: tuple[str, ...]
) -> None:
    tok = Tokenizer.from_metadata(converted_metadata(sp))
    for text in adversarial_texts:
        ids = tok.encode(text)
        # the prefix space is the first token's (llama.cpp streams " Hello");
        # SentencePiece drops it when decoding a whole text
        assert tok.decode(ids) == (" " + sp.decode(ids) if text else "")
        assert tok.decode(ids) == (" " + text if text else "")


def test_byte_fallback_streams_whole_characters(sp: sentencepiece.SentencePieceProcessor) -> None:
    tok = Tokenizer.from_metadata(converted_metadata(sp))
    text = "🦙 ☃ \U0001d518 a😀b"
    ids = tok.encode(text)
    assert sum(tok.id_to_piece(i).startswith("<0x") for i in ids) >= 12  # all byte fallback
    detok = IncrementalDetokenizer(tok)
    chunks = [detok.push(i) for i in ids]
    assert not any("\ufffd" in c for c in chunks)
    assert "".join(chunks) + detok.flush() == " " + text
    held = [c for c, i in zip(chunks, ids, strict=True) if tok.id_to_piece(i).startswith("<0xF0")]
    assert held and all(c == "" for c in held)  # a 4-byte character waits for its last byte


def test_space_prefix_after_every_special_token(sp: sentencepiece.SentencePieceProcessor) -> None:
    tok = Tokenizer.from_metadata(converted_metadata(sp))
    ids = tok.encode("<s>Hello</s>there", allow_special=True)
    assert ids == [1, *tok.encode("Hello"), 2, *tok.encode("there")]  # llama.cpp does the same
    assert tok.decode(ids, skip_special=False) == "<s> Hello</s> there"
    plain = tok.encode("<s>Hello</s>")  # user text: never the control tokens
    assert 1 not in plain and 2 not in plain and tok.decode(plain) == " <s>Hello</s>"


def test_without_space_prefix(sp: sentencepiece.SentencePieceProcessor) -> None:
    metadata = {**converted_metadata(sp), "tokenizer.ggml.add_space_prefix": False}
    tok = Tokenizer.from_metadata(metadata)
    for text in ("Hello world", " leading", "tail "):
        ids = tok.encode(text)
        assert ids == llama_cpp_spm(metadata, text, add_space_prefix=False)
        assert tok.decode(ids) == text


def test_padded_vocabulary(sp: sentencepiece.SentencePieceProcessor) -> None:
    tok = Tokenizer.from_metadata(converted_metadata(sp, vocab_size=1100))
    assert tok.vocab_size == 1100
    assert tok.encode("the lake") == sp.encode("the lake")
    assert tok.is_special(1099) and tok.decode([1099]) == ""


def test_fixture_vocabulary_encodes_like_llama_cpp(adversarial_texts: tuple[str, ...]) -> None:
    metadata = tokenizer_metadata("llama-spm")
    tok = Tokenizer.from_metadata(metadata)
    wrong = [t for t in adversarial_texts if tok.encode(t) != llama_cpp_spm(metadata, t)]
    assert not wrong
