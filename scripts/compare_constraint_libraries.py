"""Measure the constrained-decoding libraries bitserve could use, on 128k-token vocabularies.

Why this exists: issue 19 asks to choose between llguidance, xgrammar and outlines-core
by measurement. For each library and vocabulary it prints

- tokenizer init: building the library's view of the vocabulary (once per model);
- compile: turning one JSON schema into a matcher-ready grammar (once per schema: cached);
- mask: computing one next-token mask while walking a valid document token by token
  (every decode step of a constrained sequence pays it), mean and worst.

Vocabularies: ``synthetic`` is the tokenizer of the 2B-4T-shaped synthetic model
(``llama3_tokenizer_metadata``: 2000 trained tokens, the rest control tokens, which no
grammar allows), ``dense`` is a byte-level BPE of 128,000 ordinary tokens trained on this
machine's Python sources (cached in /tmp), closer to a real LLaMA-3 table where nearly every
token is text a grammar must look at.

``--sampler`` also times bitserve's own ``Sampler.step`` (server defaults) without a
constraint and with a JSON schema, ``json_object`` and tools in ``auto`` mode.

Not a test and not a project dependency: run it in a scratch venv holding the three
libraries (xgrammar pulls in PyTorch and CUDA wheels, ~5 GB)::

    python3 -m venv /tmp/cmpvenv && /tmp/cmpvenv/bin/pip install llguidance xgrammar \\
        outlines-core tokenizers numpy jinja2
    PYTHONPATH=src /tmp/cmpvenv/bin/python scripts/compare_constraint_libraries.py
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bitserve.model.demo import llama3_tokenizer_metadata
from bitserve.tokenizer.bpe import Tokenizer

DENSE_CACHE = Path("/tmp/bitserve-dense-128k.json")

SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "email": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "role": {"enum": ["admin", "user", "guest"]},
        },
        "required": ["name", "age", "email", "role"],
        "additionalProperties": False,
    },
    "order": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string"},
                        "qty": {"type": "integer", "minimum": 1},
                        "price": {"type": "number", "minimum": 0},
                    },
                    "required": ["sku", "qty", "price"],
                    "additionalProperties": False,
                },
            },
            "address": {
                "type": "object",
                "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
                "required": ["street", "city"],
                "additionalProperties": False,
            },
        },
        "required": ["id", "items", "address"],
        "additionalProperties": False,
    },
}

DOCUMENTS = {
    "person": {"name": "Ada Lovelace", "age": 36, "email": None, "role": "admin"},
    "order": {
        "id": "A-1001",
        "items": [
            {"sku": "widget", "qty": 2, "price": 9.5},
            {"sku": "gadget", "qty": 1, "price": 120},
        ],
        "address": {"street": "1 Main Street", "city": "Springfield"},
    },
}


# ---- vocabularies -------------------------------------------------------------------------


class Vocab:
    """Token bytes by id, which ids are special, an encoder, and the end-of-text id."""

    def __init__(
        self,
        name: str,
        tokens: list[bytes],
        special: set[int],
        eos: int,
        encode: Callable[[str], list[int]],
    ) -> None:
        self.name, self.tokens, self.special, self.eos, self.encode = (
            name,
            tokens,
            special,
            eos,
            encode,
        )


def synthetic_vocab() -> Vocab:
    tok = Tokenizer.from_metadata(llama3_tokenizer_metadata())
    tokens = [tok.token_bytes(i) for i in range(tok.vocab_size)]
    special = {i for i in range(tok.vocab_size) if tok.is_special(i)}
    eot = tok.eot_id if tok.eot_id is not None else tok.eos_id
    assert eot is not None
    return Vocab("synthetic", tokens, special, eot, lambda s: tok.encode(s))


def dense_vocab() -> Vocab:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if not DENSE_CACHE.exists():
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=128000,
            special_tokens=["<|end_of_text|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        files = sorted(glob.glob("/usr/lib/python3*/**/*.py", recursive=True))
        hf.train(files, trainer)
        hf.save(str(DENSE_CACHE))
    hf = HFTokenizer.from_file(str(DENSE_CACHE))
    n = hf.get_vocab_size()
    byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
    tokens = []
    for i in range(n):
        piece = hf.id_to_token(i)
        if piece == "<|end_of_text|>":
            tokens.append(piece.encode())
        else:
            tokens.append(bytes(byte_decoder[c] for c in piece))
    eos = hf.token_to_id("<|end_of_text|>")
    return Vocab("dense", tokens, {eos}, eos, lambda s: hf.encode(s).ids)


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


# ---- the libraries ------------------------------------------------------------------------


class Llguidance:
    name = "llguidance"

    def __init__(self, vocab: Vocab) -> None:
        import llguidance
        import llguidance.numpy as llnp

        class Wrapped:
            eos_token_id = vocab.eos
            bos_token_id = None
            tokens = vocab.tokens
            special_token_ids = sorted(vocab.special)

            def __call__(self, text: bytes) -> list[int]:
                return vocab.encode(text.decode("utf-8", "replace"))

        self.llg, self.llnp = llguidance, llnp
        self.tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapped()))
        self.mask = llnp.allocate_token_bitmask(1, len(vocab.tokens))

    def compile(self, schema: dict[str, Any]) -> Any:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema,
            defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
        )
        matcher = self.llg.LLMatcher(self.tok, grammar)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def fill(self, matcher: Any) -> None:
        self.llnp.fill_next_token_bitmask(matcher, self.mask)

    def allowed(self, token: int) -> bool:
        return bool((self.mask[0, token // 32] >> (token % 32)) & 1)

    def consume(self, matcher: Any, token: int) -> None:
        assert matcher.consume_token(token), matcher.get_error()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, vocab: Vocab) -> None:
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo(
            vocab.tokens,
            vocab_type=xgrammar.VocabType.RAW,
            stop_token_ids=[vocab.eos],
        )
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2)
        self.mask = xgrammar.allocate_token_bitmask(1, len(vocab.tokens))

    def compile(self, schema: dict[str, Any]) -> Any:
        compiled = self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(", ", ": ")
        )
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any) -> None:
        matcher.fill_next_token_bitmask(self.mask)

    def allowed(self, token: int) -> bool:
        return bool((int(self.mask[0, token // 32]) >> (token % 32)) & 1)

    def consume(self, matcher: Any, token: int) -> None:
        assert matcher.accept_token(token)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, vocab: Vocab) -> None:
        import outlines_core

        self.oc = outlines_core
        table: dict[bytes, list[int]] = {}
        for i, t in enumerate(vocab.tokens):
            if i not in vocab.special and i != vocab.eos:
                table.setdefault(t, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(vocab.eos, table)
        self.mask = np.zeros((len(vocab.tokens) + 31) // 32, dtype=np.int32)

    def compile(self, schema: dict[str, Any]) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema), None)
        return self.oc.Guide(self.oc.Index(regex, self.vocabulary))

    def fill(self, guide: Any) -> None:
        guide.write_mask_into(self.mask.ctypes.data, self.mask.size, 4)

    def allowed(self, token: int) -> bool:
        return bool((int(self.mask[token // 32]) >> (token % 32)) & 1)

    def consume(self, guide: Any, token: int) -> None:
        guide.advance(token)


# ---- the measurement ----------------------------------------------------------------------


def measure(library: type, vocab: Vocab) -> dict[str, Any]:
    t0 = time.perf_counter()
    lib = library(vocab)
    row: dict[str, Any] = {"init_s": time.perf_counter() - t0}
    for name, schema in SCHEMAS.items():
        t0 = time.perf_counter()
        matcher = lib.compile(schema)
        row[f"compile_{name}_s"] = time.perf_counter() - t0
        doc = json.dumps(DOCUMENTS[name], separators=(", ", ": "))
        times = []
        for token in vocab.encode(doc):
            t0 = time.perf_counter()
            lib.fill(matcher)
            times.append(time.perf_counter() - t0)
            if not lib.allowed(token):
                raise AssertionError(f"{lib.name} refused token {token} of a valid {name}")
            lib.consume(matcher, token)
        row[f"mask_{name}_mean_us"] = statistics.mean(times) * 1e6
        row[f"mask_{name}_max_us"] = max(times) * 1e6
    return row


# ---- bitserve's own sampler with and without the mask ---------------------------------------


def bitserve_tokenizer(name: str) -> Tokenizer:
    """The same vocabularies as bitserve ``Tokenizer``s (the dense one from its BPE)."""
    if name == "synthetic":
        return Tokenizer.from_metadata(llama3_tokenizer_metadata())
    dense_vocab()  # trains and caches it if needed
    hf = json.loads(DENSE_CACHE.read_text("utf-8"))
    ids = hf["model"]["vocab"]
    tokens = sorted(ids, key=ids.__getitem__)
    merges = [m if isinstance(m, str) else " ".join(m) for m in hf["model"]["merges"]]
    return Tokenizer.from_metadata(
        {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3 if t == "<|end_of_text|>" else 1 for t in tokens],
            "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.eos_token_id": tokens.index("<|end_of_text|>"),
        }
    )


def measure_sampler(name: str, steps: int = 300) -> None:
    """Median time of one ``Sampler.step`` (server defaults) on random logits: without a
    constraint, with a JSON schema, with json_object, with tools in auto mode."""
    from bitserve.api.chat.output import plan_output
    from bitserve.api.chat.tools import tool_plan
    from bitserve.engine.constraint import ConstraintCompiler
    from bitserve.engine.sampling import Sampler
    from bitserve.engine.types import SamplingParams
    from bitserve.tokenizer.tools import HERMES

    tok = bitserve_tokenizer(name)
    compiler = ConstraintCompiler(tok, tok.stop_ids)
    function = {"type": "function", "function": {"name": "f", "parameters": SCHEMAS["order"]}}
    tools = tool_plan([function], "auto", True, HERMES)
    cases = {
        "none": None,
        "json_schema": compiler.json_schema(SCHEMAS["order"]),
        "json_object": compiler.json_object(),
        "tools_auto": plan_output(compiler, None, tools, False, False).constraint,
    }
    rng = np.random.default_rng(0)
    logits = [rng.normal(0, 3, tok.vocab_size).astype(np.float32) for _ in range(64)]
    for case, compiled in cases.items():
        sampler = Sampler.create(SamplingParams(seed=1, constraint=compiled), tok.vocab_size)
        times = []
        for i in range(steps):
            state = sampler.constraint
            if compiled is not None and state is not None and state.is_finished:
                sampler.constraint = compiled.start()
            t0 = time.perf_counter()
            sampler.step(logits[i % len(logits)], [1, 2, 3], want_logprobs=False)
            times.append(time.perf_counter() - t0)
        print(f"bitserve sampler ({name}) {case:12s} {statistics.median(times) * 1e6:6.0f} us")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--libraries", default="llguidance,xgrammar,outlines-core")
    p.add_argument("--vocabularies", default="synthetic,dense")
    p.add_argument(
        "--sampler", action="store_true", help="also time bitserve's Sampler.step with each"
    )
    args = p.parse_args()
    libraries = {"llguidance": Llguidance, "xgrammar": Xgrammar, "outlines-core": OutlinesCore}
    makers = {"synthetic": synthetic_vocab, "dense": dense_vocab}
    for vname in args.vocabularies.split(","):
        vocab = makers[vname]()
        print(f"## vocabulary {vname}: {len(vocab.tokens)} tokens, {len(vocab.special)} special")
        for lname in args.libraries.split(","):
            try:
                row = measure(libraries[lname], vocab)
            except Exception as exc:  # a library that cannot do it is a result too
                print(f"{lname:14s} FAILED: {type(exc).__name__}: {exc}")
                continue
            cells = " ".join(
                f"{k}={v:.3f}" if k.endswith("_s") else f"{k}={v:.0f}" for k, v in row.items()
            )
            print(f"{lname:14s} {cells}", flush=True)
        if args.sampler:
            measure_sampler(vname)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
