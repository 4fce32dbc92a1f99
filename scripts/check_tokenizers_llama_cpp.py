#!/usr/bin/env python3
"""Hold bitserve's tokenizers to llama.cpp's on each family's fixture vocabulary.

    pip install llama-cpp-python   # not a bitserve dependency: it compiles llama.cpp
    python3 scripts/check_tokenizers_llama_cpp.py

For each family of ``bitserve.tokenizer.fixtures`` and for a SentencePiece model trained
here with LLaMA-2's settings (``sentencepiece``, a dev dependency), this writes a
vocabulary-only GGUF with bitserve's writer, loads it in llama.cpp (``vocab_only``) and
compares, on the tests' adversarial strings, every line of the demo corpus and 3000
random strings (fixed seed) mixing scripts, digits, spaces, line breaks, marks and emoji:

- token ids of the text as user text (control tokens not parsed) and as a template
  (parsed);
- every token's bytes (``token_to_piece`` with specials shown) and its end-of-generation
  flag; the BOS, EOS and end-of-turn ids and the add-BOS flag.

It prints one line per family and exits 1 on a difference not listed here. Known,
by design:

- ``falcon_e`` (Falcon-E's published files): upstream llama.cpp refuses the name;
  bitnet.cpp gives it LLaMA-3's rules, checked here through the same file named falcon3.
- ``qwen2``: bitserve applies the NFC normalization of Qwen's tokenizer.json, llama.cpp
  does not, so text that is not in NFC encodes differently (counted; each must encode
  as llama.cpp encodes its NFC form).
- an end-of-turn id the file does not name: llama.cpp takes the first token spelled like
  one in its hash map's order (Qwen3: ``<|endoftext|>`` or ``<|im_end|>``), bitserve the
  first of a fixed list (``<|im_end|>``); both stop generation either way.
- ``llama`` (SentencePiece): llama.cpp may merge user text into a control token whose
  text the pieces spell; bitserve never does (not met on these vocabularies).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import unicodedata
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from bitserve.gguf import GGUFWriter
from bitserve.tokenizer import Tokenizer
from bitserve.tokenizer.fixtures import (
    ADVERSARIAL_TEXTS,
    FAMILIES,
    random_texts,
    tokenizer_metadata,
)
from bitserve.tokenizer.vocab import (
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    TOKEN_UNUSED,
)


def write_vocab_only(metadata: dict[str, Any], path: Path) -> None:
    """A GGUF llama.cpp loads with ``vocab_only``: a llama header and the tokenizer."""
    w = GGUFWriter()
    w.add("general.architecture", "llama")
    hparams = {
        "context_length": 32768,
        "embedding_length": 64,
        "block_count": 1,
        "feed_forward_length": 128,
        "attention.head_count": 4,
        "attention.head_count_kv": 4,
        "attention.layer_norm_rms_epsilon": 1e-5,
        "rope.dimension_count": 16,
    }
    for key, value in hparams.items():
        w.add(f"llama.{key}", value)
    for key, value in metadata.items():
        w.add(key, value)
    w.write(path)


def sentencepiece_metadata() -> dict[str, Any]:
    """A LLaMA-2-style tokenizer.model trained on the demo corpus, converted like
    llama.cpp's convert_hf_to_gguf.py converts one."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()),
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
    sp = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    kinds: list[tuple[Callable[[int], bool], int]] = [
        (sp.is_unknown, TOKEN_UNKNOWN),
        (sp.is_control, TOKEN_CONTROL),
        (sp.is_unused, TOKEN_UNUSED),
        (sp.is_byte, TOKEN_BYTE),
    ]
    n = sp.get_piece_size()
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [
            next((kind for test, kind in kinds if test(i)), TOKEN_NORMAL) for i in range(n)
        ],
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }


def corpus_lines() -> list[str]:
    text = resources.files("bitserve.data").joinpath("demo_corpus.txt").read_text("utf-8")
    return text.splitlines()


def compare(name: str, metadata: dict[str, Any], directory: Path) -> tuple[int, int, list[str]]:
    """(strings checked, strings differing, notes) for one vocabulary."""
    import llama_cpp

    path = directory / f"{name}.gguf"
    write_vocab_only(metadata, path)
    ours = Tokenizer.from_metadata(metadata)
    theirs = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    model = theirs._model
    vocab = model.vocab
    notes: list[str] = []
    n_tokens = llama_cpp.llama_vocab_n_tokens(vocab)
    pieces = [model.detokenize([t], special=True) for t in range(n_tokens)]
    if pieces != [ours.token_bytes(t) for t in range(n_tokens)]:
        notes.append("token pieces differ")
    eog = {t for t in range(n_tokens) if llama_cpp.llama_vocab_is_eog(vocab, t)}
    if eog != ours.stop_ids:
        notes.append(f"end-of-generation ids differ: llama.cpp {sorted(eog)}")
    specials = (model.token_bos(), model.token_eos(), model.add_bos_token())
    if specials != (ours.bos_id, ours.eos_id, ours.add_bos):
        notes.append(f"BOS, EOS or add_bos differ: llama.cpp {specials}")
    eot = model.token_eot()
    if (None if eot < 0 else eot) != ours.eot_id:
        both_stop = eot in eog and ours.eot_id in ours.stop_ids
        notes.append(
            ("end of turn, as designed: " if both_stop else "end of turn differs: ")
            + f"llama.cpp {eot} {pieces[eot]!r}, bitserve {ours.eot_id}"
        )
    texts = [*ADVERSARIAL_TEXTS, *corpus_lines(), *random_texts(3000)]
    differing = not_nfc = 0
    nfc_first = metadata["tokenizer.ggml.pre"] == "qwen2"
    for text in texts:
        for parse in (False, True):
            expected = model.tokenize(text.encode(), add_bos=False, special=parse)
            if ours.encode(text, allow_special=parse) == expected:
                continue
            differing += 1
            nfc = unicodedata.normalize("NFC", text)
            if nfc_first and ours.encode(text, allow_special=parse) == model.tokenize(
                nfc.encode(), add_bos=False, special=parse
            ):
                not_nfc += 1  # the same once llama.cpp is given the NFC form
            else:
                notes.append(f"differs (parse_special={parse}): {text!r}")
            break
    if not_nfc:
        notes.append(f"{not_nfc} strings not in NFC differ as designed (same on their NFC form)")
    return len(texts), differing, notes


def main() -> int:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("check_tokenizers_llama_cpp: needs llama-cpp-python (pip install llama-cpp-python)",
              file=sys.stderr)  # fmt: skip
        return 2
    vocabularies: dict[str, dict[str, Any]] = {}
    for family in FAMILIES:
        metadata = tokenizer_metadata(family, 2048)
        if metadata["tokenizer.ggml.pre"] == "falcon_e":  # see the docstring
            metadata = {**metadata, "tokenizer.ggml.pre": "falcon3"}
            family += " (as falcon3)"
        vocabularies[family] = metadata
    for pre in ("gpt-2", "default"):  # the other pre-tokenizers, on a LLaMA-3-style vocabulary
        vocabularies[f"pre {pre}"] = {**vocabularies["llama-bpe"], "tokenizer.ggml.pre": pre}
    vocabularies["sentencepiece-llama2"] = sentencepiece_metadata()
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for name, metadata in vocabularies.items():
            checked, differing, notes = compare(name, metadata, Path(tmp))
            failed |= any("as designed" not in n for n in notes)
            print(f"{name:22s} {checked - differing}/{checked} strings encode the same")
            for note in notes:
                print(f"    {note}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
