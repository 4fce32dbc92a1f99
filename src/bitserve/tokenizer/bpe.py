"""Byte-level BPE tokenizers (GPT-2 / LLaMA-3 family) built from GGUF metadata (spec §5).

The vocabulary (``tokenizer.ggml.tokens``) is stored in GPT-2's byte-to-unicode alphabet:
every raw byte maps to one printable character, so ``"Ġthe"`` is the bytes ``b" the"``.
Merges are strings ``"a b"`` in rank order. Control tokens (token type 3) and user-defined
tokens (type 4) are plain text, matched as whole tokens before pre-tokenization.

Injection safety: with ``allow_special=False`` the text ``<|eot_id|>`` is encoded as
ordinary text (``<|``, ``eot``, ``_id``, ``|>``), never as the control token.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

if TYPE_CHECKING:
    from bitserve.gguf.reader import GGUFFile

# the LLaMA-3 pre-tokenizer split pattern, exactly as in spec §5
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# `tokenizer.ggml.pre` values → split pattern (None: GPT-2's own ByteLevel regex).
# A missing key means LLaMA-3: the official BitNet file has none (spec §5).
PRE_TOKENIZER_PATTERNS: Mapping[str, str | None] = MappingProxyType(
    {
        "llama-bpe": LLAMA3_SPLIT_PATTERN,
        "llama3": LLAMA3_SPLIT_PATTERN,
        "smaug-bpe": LLAMA3_SPLIT_PATTERN,
        "dbrx": LLAMA3_SPLIT_PATTERN,
        "gpt-2": None,
    }
)

# llama.cpp token types
TOKEN_NORMAL = 1
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4


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


def _pre_tokenizer(pre: str | None) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """(pre-tokenizer, ignore_merges) for a ``tokenizer.ggml.pre`` value."""
    key = pre or "llama-bpe"
    if key not in PRE_TOKENIZER_PATTERNS:
        supported = ", ".join(sorted(PRE_TOKENIZER_PATTERNS))
        raise ValueError(f"unsupported tokenizer.ggml.pre {pre!r}; supported: {supported}")
    pattern = PRE_TOKENIZER_PATTERNS[key]
    if pattern is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
    split = pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    # LLaMA-3 (tiktoken, llama.cpp) takes a whole pre-token from the vocabulary first
    return pre_tokenizers.Sequence([split, byte_level]), True


class Tokenizer:
    """A byte-level BPE tokenizer with the special ids a chat server needs.

    Invariants: ids are ``0 <= id < vocab_size``; ``token_bytes(id)`` is the raw bytes
    the token stands for (control tokens: their UTF-8 text); ``decode`` is the UTF-8
    decoding (errors replaced by U+FFFD) of the concatenated ``token_bytes``.
    """

    def __init__(
        self,
        tokens: Sequence[str],
        token_types: Sequence[int],
        merges: Iterable[str],
        *,
        pre: str | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
        extra_stop_ids: Iterable[int] = (),
        add_bos: bool = True,
    ) -> None:
        if len(token_types) != len(tokens):
            raise ValueError(f"{len(tokens)} tokens but {len(token_types)} token types")
        self._pieces = tuple(tokens)
        self._types = tuple(int(t) for t in token_types)
        for name, tid in (("bos", bos_id), ("eos", eos_id)):
            if tid is not None and not 0 <= tid < len(tokens):
                raise ValueError(f"{name} token id {tid} outside the vocabulary of {len(tokens)}")
        self._special = {
            p: i
            for i, (p, t) in enumerate(zip(tokens, self._types, strict=True))
            if t == TOKEN_CONTROL
        }
        self._bytes = tuple(
            p.encode("utf-8") if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED) else piece_to_bytes(p)
            for p, t in zip(tokens, self._types, strict=True)
        )
        self._hf = self._build_hf(merges, pre)
        self._lock = threading.Lock()  # guards the encode_special_tokens switch
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eot_id: int | None = self._special.get("<|eot_id|>")
        self.add_bos = add_bos
        stops = {eos_id, self.eot_id, *extra_stop_ids}
        self.stop_ids: frozenset[int] = frozenset(i for i in stops if i is not None)

    def _build_hf(self, merges: Iterable[str], pre: str | None) -> HFTokenizer:
        vocab: dict[str, int] = {}
        for i, piece in enumerate(self._pieces):
            vocab.setdefault(piece, i)  # duplicates keep their first id
        pre_tokenizer, ignore_merges = _pre_tokenizer(pre)
        try:
            model = models.BPE(
                vocab=vocab, merges=_split_merges(merges), ignore_merges=ignore_merges
            )
        except Exception as e:  # tokenizers raises a bare Exception on bad merges
            raise ValueError(f"invalid BPE vocabulary or merges: {e}") from e
        hf = HFTokenizer(model)
        hf.pre_tokenizer = pre_tokenizer
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens(
            [AddedToken(p, special=True, normalized=False) for p in self._special]
        )
        user = [
            p for p, t in zip(self._pieces, self._types, strict=True) if t == TOKEN_USER_DEFINED
        ]
        if user:  # add_tokens rebuilds the matcher over all added tokens, even for none
            hf.add_tokens([AddedToken(p, special=False, normalized=False) for p in user])
        return hf

    # -- construction from GGUF --------------------------------------------------------

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF ``tokenizer.ggml.*`` keys; raises ValueError if unusable."""
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"unsupported tokenizer.ggml.model {model!r}: only 'gpt2' (byte-level BPE)"
            )
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ValueError("GGUF metadata has no tokenizer.ggml.tokens")
        types = metadata.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
        extra = (metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom"))
        return cls(
            tokens,
            types,
            metadata.get("tokenizer.ggml.merges") or [],
            pre=metadata.get("tokenizer.ggml.pre"),
            bos_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_id=metadata.get("tokenizer.ggml.eos_token_id"),
            extra_stop_ids=[int(i) for i in extra if i is not None],
            add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", True)),
        )

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> Tokenizer:
        return cls.from_metadata(gguf.metadata)

    # -- vocabulary ----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def special_tokens(self) -> Mapping[str, int]:
        """Text → id of every control token (token type 3)."""
        return MappingProxyType(self._special)

    def _check(self, token_id: int) -> int:
        if not 0 <= token_id < len(self._pieces):
            raise ValueError(f"token id {token_id} outside the vocabulary of {len(self._pieces)}")
        return token_id

    def id_to_piece(self, token_id: int) -> str:
        """The token as stored in the vocabulary (byte-level alphabet; control tokens verbatim)."""
        return self._pieces[self._check(token_id)]

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes the token stands for (llama.cpp's ``bytes`` field)."""
        return self._bytes[self._check(token_id)]

    def is_special(self, token_id: int) -> bool:
        """True for control tokens (BOS, EOS, ``<|eot_id|>``, reserved tokens...)."""
        return self._types[self._check(token_id)] == TOKEN_CONTROL

    # -- encoding and decoding -------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``; control-token text becomes control ids only if allowed."""
        with self._lock:
            self._hf.encode_special_tokens = not allow_special
            # encode_batch releases the GIL (encode does not): a long text encoded on a
            # worker thread then never stalls the server's event loop
            ids: list[int] = self._hf.encode_batch([text], add_special_tokens=False)[0].ids
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def split_special(self, text: str) -> list[str | int]:
        """Split ``text`` at the control tokens it spells: plain runs (str) and ids (int).

        Concatenating the strings and the ids' texts gives back ``text``.
        """
        with self._lock:
            self._hf.encode_special_tokens = False
            encoding = self._hf.encode(text, add_special_tokens=False)
        parts: list[str | int] = []
        start = 0
        for token_id, (a, b) in zip(encoding.ids, encoding.offsets, strict=True):
            if self._types[token_id] == TOKEN_CONTROL:
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
        """Text of ``ids``; invalid UTF-8 becomes U+FFFD; control tokens skipped by default."""
        raw = b"".join(
            self.token_bytes(i) for i in ids if not (skip_special and self.is_special(i))
        )
        return raw.decode("utf-8", errors="replace")

    def pre_tokenize(self, text: str) -> list[str]:
        """The pre-token pieces of ``text`` (raw text, before BPE), for tests and debugging."""
        pre_tokenizer = self._hf.pre_tokenizer
        assert pre_tokenizer is not None
        return [text[a:b] for _, (a, b) in pre_tokenizer.pre_tokenize_str(text)]
