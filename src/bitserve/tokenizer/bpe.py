"""BPE tokenizers built from GGUF metadata (spec §5), for every ternary family.

``tokenizer.ggml.model`` selects the vocabulary's kind:

- ``gpt2``: byte-level BPE (LLaMA-3, Falcon3, Falcon-E, Qwen3/Ternary-Bonsai). Tokens are
  stored in GPT-2's byte-to-unicode alphabet: every raw byte maps to one printable
  character, so ``"Ġthe"`` is the bytes ``b" the"``. Merges are strings ``"a b"`` in rank
  order; ``tokenizer.ggml.pre`` names the pre-tokenizer (:mod:`.pretokenizers`).
- ``llama``: SentencePiece-style BPE with scores and byte fallback (LLaMA-2's vocabulary,
  the 1bitLLM models; :mod:`.spm`).

Control tokens (token type 3) and user-defined tokens (type 4) are plain text, matched as
whole tokens before anything else: user-defined ones always, control ones only where the
caller allows it. Injection safety: with ``allow_special=False`` the text ``<|eot_id|>``
is encoded as ordinary text (``<|``, ``eot``, ``_id``, ``|>``), never as the control token.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, decoders, models
from tokenizers import Tokenizer as HFTokenizer

from bitserve.gguf.reader import GGUFError
from bitserve.tokenizer import spm
from bitserve.tokenizer.pretokenizers import LLAMA3_SPLIT_PATTERN, pre_tokenizer_spec
from bitserve.tokenizer.vocab import (
    SPECIAL_TYPES,
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    TOKEN_UNUSED,
    TOKEN_USER_DEFINED,
    SpecialIds,
    check_id,
    control_types,
    eog_ids,
    find_eot,
)

if TYPE_CHECKING:
    from bitserve.gguf.reader import GGUFFile

__all__ = [
    "LLAMA3_SPLIT_PATTERN",
    "TOKENIZER_MODELS",
    "TOKEN_BYTE",
    "TOKEN_CONTROL",
    "TOKEN_NORMAL",
    "TOKEN_UNKNOWN",
    "TOKEN_UNUSED",
    "TOKEN_USER_DEFINED",
    "Tokenizer",
    "bytes_to_piece",
    "piece_to_bytes",
]

# `tokenizer.ggml.model` values bitserve reads, and what they are
TOKENIZER_MODELS: Mapping[str, str] = MappingProxyType(
    {"gpt2": "byte-level BPE", "llama": "SentencePiece BPE"}
)
# matched in text as whole tokens, only where allowed
_MATCHED_SPECIAL_TYPES = (TOKEN_CONTROL, TOKEN_UNKNOWN)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table (256 entries)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR: Mapping[int, str] = MappingProxyType(_bytes_to_unicode())
CHAR_TO_BYTE: Mapping[str, int] = MappingProxyType({c: b for b, c in BYTE_TO_CHAR.items()})


def piece_to_bytes(piece: str) -> bytes:
    """Raw bytes of a byte-level BPE piece; characters outside the alphabet kept as UTF-8."""
    out = bytearray()
    for ch in piece:
        b = CHAR_TO_BYTE.get(ch)
        if b is None:
            out += ch.encode("utf-8")
        else:
            out.append(b)
    return bytes(out)


def bytes_to_piece(raw: bytes) -> str:
    """The byte-level BPE spelling of ``raw`` (inverse of :func:`piece_to_bytes`)."""
    return "".join(BYTE_TO_CHAR[b] for b in raw)


def _split_merges(merges: Iterable[str]) -> list[tuple[str, str]]:
    pairs = []
    for i, merge in enumerate(merges):
        left, sep, right = merge.partition(" ")
        if not sep or not left or not right or " " in right:
            raise ValueError(f"tokenizer merge {i} is not of the form 'a b': {merge!r}")
        pairs.append((left, right))
    return pairs


def _byte_level_bytes(piece: str, token_type: int) -> bytes:
    """The raw bytes a byte-level token stands for (llama.cpp's ``token_to_piece``)."""
    if token_type in (TOKEN_NORMAL, TOKEN_BYTE):
        return piece_to_bytes(piece)
    if token_type == TOKEN_UNUSED:
        return b""  # a [PADn] filler stands for nothing
    return piece.encode("utf-8")  # control, user-defined, unknown: their text


def _byte_level_model(
    pieces: Sequence[str], merges: Iterable[str], ignore_merges: bool
) -> models.BPE:
    vocab: dict[str, int] = {}
    for i, piece in enumerate(pieces):
        vocab.setdefault(piece, i)  # duplicates keep their first id
    try:
        return models.BPE(vocab=vocab, merges=_split_merges(merges), ignore_merges=ignore_merges)
    except Exception as e:  # tokenizers raises a bare Exception on bad merges
        raise ValueError(f"invalid BPE vocabulary or merges: {e}") from e


# what a vocabulary kind builds: the HF tokenizer, each token's bytes, llama.cpp's add_bos
_Parts = tuple[HFTokenizer, tuple[bytes, ...], bool]


def _byte_level(
    pieces: Sequence[str], types: Sequence[int], merges: Iterable[str], pre: str | None
) -> _Parts:
    spec = pre_tokenizer_spec(pre)
    hf = HFTokenizer(_byte_level_model(pieces, merges, spec.ignore_merges))
    hf.pre_tokenizer, hf.normalizer = spec.build()
    hf.decoder = decoders.ByteLevel()
    token_bytes = tuple(_byte_level_bytes(p, t) for p, t in zip(pieces, types, strict=True))
    return hf, token_bytes, spec.add_bos


def _sentencepiece(
    pieces: Sequence[str],
    types: Sequence[int],
    scores: Sequence[float] | None,
    add_space_prefix: bool,
) -> _Parts:
    if scores is None:
        raise ValueError("a SentencePiece vocabulary needs tokenizer.ggml.scores")
    hf = HFTokenizer(spm.sentencepiece_model(pieces, types, scores))
    hf.normalizer = spm.sentencepiece_normalizer(add_space_prefix)
    token_bytes = tuple(spm.piece_bytes(p, t) for p, t in zip(pieces, types, strict=True))
    return hf, token_bytes, True


def _check_model(model: object) -> str:
    if not isinstance(model, str) or model not in TOKENIZER_MODELS:
        supported = ", ".join(f"{k} ({v})" for k, v in TOKENIZER_MODELS.items())
        raise ValueError(f"unsupported tokenizer.ggml.model {model!r}; supported: {supported}")
    return model


class Tokenizer:
    """A BPE tokenizer (byte-level or SentencePiece-style) with the special ids a chat
    server needs.

    Invariants: ids are ``0 <= id < vocab_size``; ``token_bytes(id)`` is the raw bytes
    the token stands for (control tokens: their UTF-8 text); ``decode`` is the UTF-8
    decoding (errors replaced by U+FFFD) of the concatenated ``token_bytes``. A
    SentencePiece vocabulary's ``add_space_prefix`` space is part of the first token
    (``"▁Hello"`` is ``b" Hello"``), as llama.cpp streams it.
    """

    def __init__(
        self,
        tokens: Sequence[str],
        token_types: Sequence[int],
        merges: Iterable[str] = (),
        *,
        model: str = "gpt2",
        pre: str | None = None,
        scores: Sequence[float] | None = None,
        add_space_prefix: bool = True,
        bos_id: int | None = None,
        eos_id: int | None = None,
        eot_id: int | None = None,
        extra_stop_ids: Iterable[int] = (),
        add_bos: bool | None = None,
        add_eos: bool = False,
    ) -> None:
        """``add_bos=None`` takes llama.cpp's default for the vocabulary (true for
        LLaMA-3-style and SentencePiece vocabularies, false otherwise); ``eot_id=None``
        looks the end-of-turn token up by its text."""
        _check_model(model)
        if len(token_types) != len(tokens):
            raise ValueError(f"{len(tokens)} tokens but {len(token_types)} token types")
        self._pieces = tuple(tokens)
        self._types = control_types(self._pieces, token_types)
        for name, tid in (("bos", bos_id), ("eos", eos_id), ("eot", eot_id)):
            check_id(name, tid, len(self._pieces))
        self.model = model
        if model == "gpt2":
            self._hf, self._bytes, default_add_bos = _byte_level(
                self._pieces, self._types, merges, pre
            )
        else:
            self._hf, self._bytes, default_add_bos = _sentencepiece(
                self._pieces, self._types, scores, add_space_prefix
            )
        self._add_added_tokens()
        self._lock = threading.Lock()  # guards the encode_special_tokens switch
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eot_id = eot_id if eot_id is not None else find_eot(self._pieces, self._types)
        self.add_bos = default_add_bos if add_bos is None else add_bos
        self.add_eos = add_eos
        named = [eos_id, self.eot_id, *extra_stop_ids]
        self.stop_ids: frozenset[int] = eog_ids(self._pieces, self._types, named)

    def _add_added_tokens(self) -> None:
        """Control (and unknown) tokens as HF special tokens, user-defined ones as
        tokens matched everywhere; all of them on the raw text, before normalization."""
        kinds = list(zip(self._pieces, self._types, strict=True))
        special = [p for p, t in kinds if t in _MATCHED_SPECIAL_TYPES]
        self._hf.add_special_tokens(
            [AddedToken(p, special=True, normalized=False) for p in dict.fromkeys(special)]
        )
        user = [p for p, t in kinds if t == TOKEN_USER_DEFINED]
        if user:  # add_tokens rebuilds the matcher over all added tokens, even for none
            self._hf.add_tokens([AddedToken(p, special=False, normalized=False) for p in user])

    # -- construction from GGUF --------------------------------------------------------

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF ``tokenizer.ggml.*`` keys; raises ValueError if unusable."""
        model = _check_model(metadata.get("tokenizer.ggml.model"))
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ValueError("GGUF metadata has no tokenizer.ggml.tokens")
        arrays = (("tokens", str, "strings"), ("merges", str, "strings"),
                  ("token_type", int, "integers"), ("scores", (int, float), "numbers"))  # fmt: skip
        for key, kind, kinds in arrays:
            values = metadata.get(f"tokenizer.ggml.{key}") or []
            if not isinstance(values, list) or not all(isinstance(v, kind) for v in values):
                raise ValueError(f"tokenizer.ggml.{key} must be an array of {kinds}")
        types = metadata.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
        ids = SpecialIds.from_metadata(metadata, len(tokens))
        add_bos = metadata.get("tokenizer.ggml.add_bos_token")
        return cls(
            tokens,
            types,
            metadata.get("tokenizer.ggml.merges") or [],
            model=model,
            pre=metadata.get("tokenizer.ggml.pre"),
            scores=metadata.get("tokenizer.ggml.scores"),
            add_space_prefix=bool(metadata.get("tokenizer.ggml.add_space_prefix", True)),
            bos_id=ids.bos,
            eos_id=ids.eos,
            eot_id=ids.eot,
            extra_stop_ids=[] if ids.eom is None else [ids.eom],
            add_bos=None if add_bos is None else bool(add_bos),
            add_eos=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        )

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> Tokenizer:
        """:meth:`from_metadata` on the file's keys; a problem is a ``GGUFError`` naming
        the file."""
        try:
            return cls.from_metadata(gguf.metadata)
        except GGUFError:
            raise
        except ValueError as e:
            raise GGUFError(gguf.path, str(e)) from e

    # -- vocabulary ----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def special_tokens(self) -> Mapping[str, int]:
        """Text → id of every control token (token type 3; llama.cpp treats an unknown
        token, type 2, the same way)."""
        kinds = zip(self._pieces, self._types, strict=True)
        return MappingProxyType(
            {p: i for i, (p, t) in enumerate(kinds) if t in _MATCHED_SPECIAL_TYPES}
        )

    def _check(self, token_id: int) -> int:
        if not 0 <= token_id < len(self._pieces):
            raise ValueError(f"token id {token_id} outside the vocabulary of {len(self._pieces)}")
        return token_id

    def id_to_piece(self, token_id: int) -> str:
        """The token as stored in the vocabulary (byte-level alphabet or ``▁`` spaces;
        control tokens verbatim)."""
        return self._pieces[self._check(token_id)]

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes the token stands for (llama.cpp's ``token_to_piece``)."""
        return self._bytes[self._check(token_id)]

    def is_special(self, token_id: int) -> bool:
        """True for control tokens (BOS, EOS, ``<|eot_id|>``...) and unknown and unused
        ones: tokens whose text is not text the model writes."""
        return self._types[self._check(token_id)] in SPECIAL_TYPES

    # -- encoding and decoding -------------------------------------------------------------

    def encode(
        self, text: str, add_bos: bool = False, allow_special: bool = False, add_eos: bool = False
    ) -> list[int]:
        """Token ids of ``text``; control-token text becomes control ids only if allowed."""
        with self._lock:
            self._hf.encode_special_tokens = not allow_special
            # encode_batch releases the GIL (encode does not): a long text encoded on a
            # worker thread then never stalls the server's event loop
            ids: list[int] = self._hf.encode_batch([text], add_special_tokens=False)[0].ids
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def split_special(self, text: str) -> list[str | int]:
        """Split ``text`` at the control tokens it spells: plain runs (str) and ids (int).

        Concatenating the strings and the ids' texts gives back ``text``.
        """
        with self._lock:
            self._hf.encode_special_tokens = False
            encoding = self._hf.encode_batch([text], add_special_tokens=False)[0]  # GIL: encode
        parts: list[str | int] = []
        start = 0
        for token_id, (a, b) in zip(encoding.ids, encoding.offsets, strict=True):
            if self._types[token_id] in _MATCHED_SPECIAL_TYPES:
                if text[a:b] != self._pieces[token_id]:
                    raise ValueError(f"control token {token_id} not found at offsets {a}:{b}")
                if a > start:
                    parts.append(text[start:a])
                parts.append(token_id)
                start = b
        if start < len(text):
            parts.append(text[start:])
        return parts

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of ``ids``; invalid UTF-8 becomes U+FFFD; special tokens skipped by default."""
        raw = b"".join(
            self.token_bytes(i) for i in ids if not (skip_special and self.is_special(i))
        )
        return raw.decode("utf-8", errors="replace")

    def pre_tokenize(self, text: str) -> list[str]:
        """The pieces BPE merges within, for tests and debugging: the pre-tokens of the
        normalized ``text`` (a SentencePiece vocabulary has one: the whole text)."""
        normalizer = self._hf.normalizer
        if normalizer is not None:
            text = normalizer.normalize_str(text)
        pre_tokenizer = self._hf.pre_tokenizer
        if pre_tokenizer is None:
            return [text] if text else []
        return [text[a:b] for _, (a, b) in pre_tokenizer.pre_tokenize_str(text)]
