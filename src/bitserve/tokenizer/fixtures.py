"""GGUF tokenizer metadata of each ternary family, for tiny test models.

Real vocabularies cannot be downloaded in tests, so each family's tokenizer is trained
with HF ``tokenizers`` on the shipped demo corpus, configured like the family's published
``tokenizer.json`` (pre-tokenizer regex, normalizer), and written into ``tokenizer.ggml.*``
keys the way llama.cpp's converter writes the real file: the family's token alphabet,
its special tokens where the real file has them, the same types, special ids and flags,
and ``[PADn]`` unused tokens up to ``vocab_size`` (as the converter pads a vocabulary to
the model's size). Deterministic; trained once per process.

========== ======================================= ======================================
family     published files                          layout
========== ======================================= ======================================
llama-bpe  BitNet-2B-4T, Llama3-8B-1.58             trained BPE, then LLaMA-3's 256 control
                                                    tokens (BOS, EOS, ``<|eot_id|>``...)
falcon3    Falcon3-*-Instruct-1.58bit               Falcon's control tokens first
                                                    (``<|endoftext|>`` = 11 = EOS), then BPE
falcon-e   Falcon-E-1B/3B (``pre`` = ``falcon_e``)  as falcon3
qwen2      Ternary-Bonsai (Qwen3)                   BPE (NFC, single digits), then Qwen3's
                                                    26 added tokens; no BOS added
llama-spm  1bitLLM bitnet_b1_58-* (LLaMA-2)         SentencePiece: ``<unk> <s> </s>``, the 256
                                                    byte tokens, pieces by score
========== ======================================= ======================================
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from tokenizers import Regex, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from bitserve.tokenizer.pretokenizers import LLAMA3_SPLIT_PATTERN, QWEN2_SPLIT_PATTERN
from bitserve.tokenizer.spm import SPACE_PIECE, byte_piece
from bitserve.tokenizer.vocab import (
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    TOKEN_UNUSED,
    TOKEN_USER_DEFINED,
)

TRAINED_VOCAB = 1000  # learned tokens (and SentencePiece pieces) per family

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

C, U = TOKEN_CONTROL, TOKEN_USER_DEFINED


def _words(text: str) -> list[str]:
    return text.split()


def llama3_special_tokens() -> list[str]:
    """LLaMA-3's 256 control tokens in id order (offset 0 BOS, 1 EOS, 9 end of turn)."""
    names = {
        0: "<|begin_of_text|>",
        1: "<|end_of_text|>",
        6: "<|start_header_id|>",
        7: "<|end_header_id|>",
        9: "<|eot_id|>",
    }
    reserved = iter(range(256))
    return [
        names[k] if k in names else f"<|reserved_special_token_{next(reserved)}|>"
        for k in range(256)
    ]


# Falcon's control tokens (ids 0..11), a few of Falcon3's unused ones and its pad
_FALCON_NAMES = _words(
    "TITLE ABSTRACT INTRODUCTION SUMMARY COMMENT ANSWER QUESTION DOMAIN PREFIX SUFFIX MIDDLE"
)
_FALCON_SPECIALS = [
    *((f">>{name}<<", C) for name in _FALCON_NAMES),
    ("<|endoftext|>", C),
    *((f">>UNUSED_{i}<<", C) for i in range(4)),
    ("<|pad|>", C),
]

# Qwen3's added tokens (151643.. in the real file); tool and think tags are not special
_QWEN3_NAMES = _words(
    "endoftext im_start im_end object_ref_start object_ref_end box_start box_end quad_start "
    "quad_end vision_start vision_end vision_pad image_pad video_pad"
)
_QWEN3_SPECIALS = [
    *((f"<|{name}|>", C) for name in _QWEN3_NAMES),
    ("<tool_call>", U),
    ("</tool_call>", U),
    *((f"<|{name}|>", C) for name in ("fim_prefix", "fim_middle", "fim_suffix", "fim_pad")),
    ("<|repo_name|>", C),
    ("<|file_sep|>", C),
    ("<tool_response>", U),
    ("</tool_response>", U),
    ("<think>", U),
    ("</think>", U),
]


# characters random strings are drawn from: letters of several scripts, digits of several
# systems, punctuation, every kind of space and line break, apostrophes, marks, emoji
_POOL = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    "\u00e9\u00c5\u00df\u00e7\u00f1\u00f8\u0142\u03a9\u03c0\u0436\u042f"
    "\u4f60\u597d\u4e16\u754c\u3053\u3093\u306b\u3061\u306f\uc548\ub155\ud55c"
    "\u0663\u0664\u0665\u0966\u0967\u0968\u2460\u216b\u00bd"
    "'\"`~!@#$%^&*()-_=+[]{}|;:,.<>/?\\\u2014\u2013\u2026\u00ab\u00bb\u201c\u201d\u2018\u2019\u00bf\u00a1"
    " \t\n\r\u00a0\u2009\u3000\u200b\u0085\u2028\u000b\u000c"
    "\u0301\u0308\u200d\ufe0f\U0001f600\U0001f999\U0001f44d\U0001f3fd\U0001f1eb\U0001f1f7"
)
_WORDS = ("'s", "'LL", " the", "  ", "\r\n", "123456", "<|", "|>")


def random_texts(count: int, seed: int = 14) -> list[str]:
    """``count`` random strings of :data:`_POOL` characters and tricky fragments."""
    rng = random.Random(seed)
    return [
        "".join(rng.choices(_POOL, k=rng.randint(1, 40))) + "".join(rng.choices(_WORDS, k=3))
        for _ in range(count)
    ]


@dataclass(frozen=True, slots=True)
class _Family:
    pre: str
    split_pattern: str = LLAMA3_SPLIT_PATTERN
    nfc: bool = False
    before: Sequence[tuple[str, int]] = ()  # added tokens ahead of the trained ones
    after: Sequence[tuple[str, int]] = ()  # and after them
    ids: dict[str, str] = field(default_factory=dict)  # key → token text
    flags: dict[str, bool] = field(default_factory=dict)  # add_bos_token...
    # padded with reserved control tokens ahead of `after` (LLaMA-3 keeps its 256 control
    # tokens last), not with [PADn] tokens at the end
    reserved_fill: str | None = None


_LLAMA3 = _Family(
    "llama-bpe",
    after=[(token, C) for token in llama3_special_tokens()],
    reserved_fill="<|reserved_special_token_{}|>",
    ids={"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "eot": "<|eot_id|>"},
    flags={"add_bos_token": True},
)
_FALCON3 = _Family(
    "falcon3",
    before=_FALCON_SPECIALS,
    ids={"bos": "<|endoftext|>", "eos": "<|endoftext|>", "padding": "<|pad|>"},
)
FAMILIES: dict[str, _Family] = {
    "llama-bpe": _LLAMA3,
    "falcon3": _FALCON3,
    "falcon-e": _Family("falcon_e", before=_FALCON3.before, ids=_FALCON3.ids),
    "qwen2": _Family(
        "qwen2",
        split_pattern=QWEN2_SPLIT_PATTERN,
        nfc=True,
        after=_QWEN3_SPECIALS,
        ids={"bos": "<|endoftext|>", "eos": "<|im_end|>", "padding": "<|endoftext|>"},
        flags={"add_bos_token": False},
    ),
    "llama-spm": _Family("default"),  # SentencePiece: see _spm_vocabulary
}


def _corpus_lines() -> list[str]:
    text = resources.files("bitserve.data").joinpath("demo_corpus.txt").read_text("utf-8")
    return [line + "\n" for line in text.splitlines()]


def _model_json(hf: HFTokenizer) -> dict[str, Any]:
    model: dict[str, Any] = json.loads(hf.to_str())["model"]
    return model


@functools.cache
def train_byte_level_bpe(
    split_pattern: str, nfc: bool = False, vocab_size: int = TRAINED_VOCAB
) -> tuple[list[str], list[str]]:
    """(tokens in id order, merges ``"a b"`` in rank order) of a byte-level BPE trained on
    the demo corpus with ``split_pattern`` (and NFC first if ``nfc``): ``vocab_size``
    tokens in GPT-2's byte alphabet, all 256 bytes included. Deterministic; the lists are
    shared (cached), so callers must not change them."""
    hf = HFTokenizer(models.BPE(ignore_merges=True))
    hf.normalizer = normalizers.NFC() if nfc else None
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator(_corpus_lines(), trainer)
    model = _model_json(hf)
    vocab: dict[str, int] = model["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise RuntimeError("trained BPE vocabulary ids are not contiguous")
    # merges are ["a", "b"] pairs (tokenizers >= 0.20) or "a b" strings
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


@functools.cache
def _spm_vocabulary() -> tuple[list[str], list[int], list[float]]:
    """(pieces, types, scores) laid out like LLaMA-2's ``tokenizer.model``: ``<unk>``,
    ``<s>``, ``</s>``, the 256 byte tokens, then pieces by falling score (merged ones in
    merge order, then single characters).

    Trained as SentencePiece trains LLaMA-2's: BPE within words (``▁`` starts a word),
    single digits, byte fallback for characters outside the corpus.
    """
    hf = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    hf.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPACE_PIECE), normalizers.Replace(" ", SPACE_PIECE)]
    )
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(SPACE_PIECE, behavior="merged_with_next"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    trainer = trainers.BpeTrainer(vocab_size=TRAINED_VOCAB, show_progress=False)
    hf.train_from_iterator(_corpus_lines(), trainer)
    model = _model_json(hf)
    merged = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    merged_pieces = [m.replace(" ", "") for m in merged]
    chars = sorted(set(model["vocab"]) - set(merged_pieces))
    pieces = ["<unk>", "<s>", "</s>", *(byte_piece(b) for b in range(256))]
    types = [TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL, *([TOKEN_BYTE] * 256)]
    scores = [0.0] * len(pieces)
    for rank, piece in enumerate(dict.fromkeys([*merged_pieces, *chars])):
        pieces.append(piece)
        types.append(TOKEN_NORMAL)
        scores.append(-float(rank))
    return pieces, types, scores


def _pad(tokens: list[str], types: list[int], vocab_size: int | None, family: str) -> None:
    """Pad to ``vocab_size`` with ``[PADn]`` unused tokens, as llama.cpp's converter does."""
    if vocab_size is None:
        return
    if vocab_size < len(tokens):
        raise ValueError(
            f"vocab_size {vocab_size} is below the {family} fixture vocabulary's {len(tokens)}"
        )
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    types += [TOKEN_UNUSED] * (vocab_size - len(types))


def min_vocab_size(family: str) -> int:
    """The smallest ``vocab_size`` :func:`tokenizer_metadata` takes for ``family``."""
    return len(tokenizer_metadata(family)["tokenizer.ggml.tokens"])


def tokenizer_metadata(family: str, vocab_size: int | None = None) -> dict[str, Any]:
    """``tokenizer.ggml.*`` keys of ``family`` (one of :data:`FAMILIES`), padded to
    ``vocab_size`` tokens (None: as trained, :func:`min_vocab_size`).

    Pass the result as ``write_synthetic_model(..., tokenizer_metadata=...)``; the model's
    vocabulary size must be the token count.
    """
    spec = FAMILIES.get(family)
    if spec is None:
        raise ValueError(f"unknown tokenizer family {family!r}; known: {', '.join(FAMILIES)}")
    if family == "llama-spm":
        return _spm_metadata(vocab_size)
    trained, merges = train_byte_level_bpe(spec.split_pattern, spec.nfc)
    after = list(spec.after)
    size = len(spec.before) + len(trained) + len(after)
    if spec.reserved_fill is not None and vocab_size is not None and vocab_size > size:
        first = sum(p.startswith(spec.reserved_fill.split("{")[0]) for p, _ in after)
        fill = [(spec.reserved_fill.format(first + i), C) for i in range(vocab_size - size)]
        after = fill + after
    tokens = [p for p, _ in spec.before] + trained + [p for p, _ in after]
    types = [t for _, t in spec.before] + [TOKEN_NORMAL] * len(trained) + [t for _, t in after]
    _pad(tokens, types, vocab_size, family)
    metadata: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": spec.pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": list(merges),
    }
    metadata.update({f"tokenizer.ggml.{k}_token_id": tokens.index(v) for k, v in spec.ids.items()})
    metadata.update({f"tokenizer.ggml.{k}": v for k, v in spec.flags.items()})
    return metadata


def _spm_metadata(vocab_size: int | None) -> dict[str, Any]:
    cached_pieces, cached_types, cached_scores = _spm_vocabulary()
    pieces, types, scores = list(cached_pieces), list(cached_types), list(cached_scores)
    n_trained = len(pieces)
    _pad(pieces, types, vocab_size, "llama-spm")
    scores += [-1000.0] * (len(pieces) - n_trained)
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": pieces,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }
