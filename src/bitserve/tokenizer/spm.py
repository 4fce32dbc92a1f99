"""SentencePiece-style vocabularies (``tokenizer.ggml.model`` = ``llama``), e.g. LLaMA-2's,
which the 1bitLLM BitNet models use.

Pieces spell a space as ``▁`` (U+2581) and carry scores; byte tokens ``<0xXX>`` stand for
the UTF-8 bytes of characters no piece holds (byte fallback). Encoding, as llama.cpp and
SentencePiece do it: prefix the text with a space (``add_space_prefix``: at the start and
after every control or user-defined token), write spaces as ``▁``, start from single
characters and keep merging the adjacent pair whose concatenation is the best-scored
piece; a character no piece holds becomes its byte tokens.

HF ``tokenizers`` runs it: a BPE model whose merges are every (left, right) split of each
piece, ranked by the piece's score (what transformers' LlamaConverter builds from a
``tokenizer.model``), with byte fallback and the ``▁`` normalizer of LLaMA-2's published
``tokenizer.json``.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import models, normalizers

from bitserve.tokenizer.vocab import TOKEN_BYTE, TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_UNUSED

SPACE_PIECE = "\u2581"  # ▁


def byte_piece(byte: int) -> str:
    """The byte token's text for ``byte``: ``<0x0A>``."""
    return f"<0x{byte:02X}>"


def piece_bytes(piece: str, token_type: int) -> bytes:
    """The raw bytes a token stands for (llama.cpp's ``token_to_piece``)."""
    if token_type == TOKEN_BYTE:
        if len(piece) != 6 or not piece.startswith("<0x") or not piece.endswith(">"):
            raise ValueError(f"byte token {piece!r} is not of the form <0xXX>")
        return bytes([int(piece[3:5], 16)])
    if token_type == TOKEN_NORMAL:
        return piece.replace(SPACE_PIECE, " ").encode("utf-8")
    if token_type == TOKEN_UNUSED:
        return b""  # a [PADn] filler stands for nothing, as in llama.cpp
    return piece.encode("utf-8")  # control, user-defined, unknown: their text


def merges_from_scores(
    pieces: Sequence[str], types: Sequence[int], scores: Sequence[float]
) -> list[tuple[str, str]]:
    """Every split of every normal piece into two normal pieces, best-scored piece first.

    Splits of one piece share its rank in SentencePiece; they are adjacent here (ordered
    by id), so no other merge falls between them.
    """
    ids: dict[str, int] = {}
    for i, (piece, kind) in enumerate(zip(pieces, types, strict=True)):
        if kind == TOKEN_NORMAL:
            ids.setdefault(piece, i)
    ranked: list[tuple[float, int, int, int, str, str]] = []
    for piece, i in ids.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            left_id, right_id = ids.get(left), ids.get(right)
            if left_id is not None and right_id is not None:
                ranked.append((-float(scores[i]), i, left_id, right_id, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def sentencepiece_model(
    pieces: Sequence[str], types: Sequence[int], scores: Sequence[float]
) -> models.BPE:
    """The HF BPE model of a SentencePiece vocabulary (ids are the vocabulary's)."""
    if len(scores) != len(pieces):
        raise ValueError(f"{len(pieces)} tokens but {len(scores)} scores")
    vocab: dict[str, int] = {}
    for i, piece in enumerate(pieces):
        vocab.setdefault(piece, i)  # duplicates keep their first id
    unk = next((p for p, t in zip(pieces, types, strict=True) if t == TOKEN_UNKNOWN), None)
    merges = merges_from_scores(pieces, types, scores)
    return models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)


def sentencepiece_normalizer(add_space_prefix: bool) -> normalizers.Normalizer:
    """Spaces as ``▁``; with ``add_space_prefix`` one more in front of each text run."""
    escape = normalizers.Replace(" ", SPACE_PIECE)
    if not add_space_prefix:
        return escape
    return normalizers.Sequence([normalizers.Prepend(SPACE_PIECE), escape])
