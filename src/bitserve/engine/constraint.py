"""Constrained decoding: at each step only tokens that keep the output a valid prefix of a
grammar may be sampled (structured output, tool calls, GBNF).

The grammar library is llguidance, chosen by measurement on 128k-token vocabularies
(``scripts/compare_constraint_libraries.py``; figures in docs/api.md): it builds its view
of the vocabulary in ~0.2 s, compiles a JSON schema in ~1-3 ms (outlines-core needs
160-370 ms: it precomputes every state's mask), computes a mask in ~10-50 µs (all three
are this fast), speaks JSON Schema, Lark-style CFGs, regexes and (converted) GBNF, and
needs no PyTorch (xgrammar does: ~5 GB of wheels and a 1.6-1.9 s tokenizer setup).

Three objects, built at three moments:

- :class:`ConstraintCompiler` (one per served model): the library's tokenizer, built on
  first use, and an LRU cache of compiled grammars, so a schema is compiled once;
- :class:`CompiledConstraint` (one per grammar): what the engine's requests carry
  (``SamplingParams.constraint``); immutable, shared by every sequence that uses it;
- :class:`TokenConstraint` (one per sequence): its position in the grammar. The sampler
  masks each step's logits with :meth:`TokenConstraint.apply` and moves it on with
  :meth:`TokenConstraint.advance`.

Once the grammar is complete only the model's stop tokens are allowed, so a constrained
sequence ends with "stop"; one that runs out of ``max_tokens`` first ends with "length".
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import llguidance
import numpy as np

from bitserve.engine.gbnf import GbnfError, gbnf_to_lark

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

    from bitserve.tokenizer import Tokenizer

CACHE_SIZE = 128  # compiled grammars kept per model (each is a few hundred KB at most)

# Objects and arrays a schema may nest: far beyond any real schema, and short of the
# recursion limits of this module's walks and of the library's own compiler.
MAX_SCHEMA_DEPTH = 100

# Schemas (as compact JSON) and grammars longer than this are refused before any work:
# compiling costs more than linearly in their size (5000 optional properties, 150 KB of
# schema, took the library ~6 s of CPU and 20 s on a busy server, to fail at the first
# mask), and one request may not buy that. 64 KiB of schema is ~2000 such properties (under
# a second); the largest real tool and response schemas are a few KB.
MAX_GRAMMAR_CHARS = 65_536

# JSON as OpenAI's models write it: one space after ':' and ',' and nowhere else. Fixed
# separators keep the output compact (a small model left free adds whitespace forever)
# and make streamed tool-call arguments easy to cut out of the text.
JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


# keywords whose value is a schema, a list of schemas, or a map of name → schema
_SCHEMA_KEYWORDS = (
    "additionalProperties",
    "items",
    "not",
    "if",
    "then",
    "else",
    "contains",
    "propertyNames",
    "unevaluatedProperties",
    "unevaluatedItems",
)
_LIST_KEYWORDS = ("anyOf", "oneOf", "prefixItems", "items")  # allOf: see _closed
_MAP_KEYWORDS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def check_schema(schema: Mapping[str, Any] | bool) -> None:
    """Raise :class:`ConstraintError` for a schema no walk may take: nested deeper than
    :data:`MAX_SCHEMA_DEPTH`, with library options (``x-guidance``) that are not an
    object, or with a number JSON cannot write (``1e400`` is read as infinity, which the
    library was handed as ``null``)."""
    if isinstance(schema, Mapping) and not isinstance(schema.get("x-guidance", {}), Mapping):
        raise ConstraintError("x-guidance must be an object")
    level: list[Any] = [schema] if isinstance(schema, Mapping) else []
    for _ in range(MAX_SCHEMA_DEPTH + 1):
        children = [
            child
            for node in level
            for child in (node.values() if isinstance(node, Mapping) else node)
        ]
        if any(isinstance(c, float) and not math.isfinite(c) for c in children):
            raise ConstraintError("the schema holds a number too large for JSON (e.g. 1e400)")
        level = [child for child in children if isinstance(child, (Mapping, list))]
        if not level:
            return
    raise ConstraintError(
        f"the schema nests objects and arrays more than {MAX_SCHEMA_DEPTH} levels deep"
    )


def check_size(length: int, what: str) -> None:
    """Raise :class:`ConstraintError` for ``what`` (a grammar, a schema) of ``length``
    characters above :data:`MAX_GRAMMAR_CHARS`."""
    if length > MAX_GRAMMAR_CHARS:
        raise ConstraintError(
            f"{what} is {length} characters long, above the limit of {MAX_GRAMMAR_CHARS}"
        )


def closed_objects(schema: Any) -> Any:
    """``schema`` where every object that lists ``properties`` and says nothing about
    others (no ``additionalProperties``/``patternProperties``) allows no others.

    JSON Schema lets such objects have any further properties, and a model left free to
    invent them may never stop (a random one does not). Like xgrammar's strict mode
    (vLLM's default) and llama.cpp's converter, only the declared properties are
    generated: the output stays valid against the original schema. Say
    ``"additionalProperties": true`` to allow more; ``{"type": "object"}`` alone stays any
    object. A name that ``required`` lists but ``properties`` does not is declared, with
    any value (closed out, it would make the object unsatisfiable). The branches of an
    ``allOf`` are left open at their own level (each may list properties the others add:
    closing them would make the whole unsatisfiable), and so are both sides of a ``$ref``
    beside ``properties`` (the same combination)."""
    return _closed(schema, True, _combined_refs(schema))


def _combined_refs(schema: Any) -> set[str]:
    """The local ``$ref`` targets used beside ``properties`` anywhere in ``schema``."""
    if isinstance(schema, list):
        return set().union(*(_combined_refs(s) for s in schema))
    if not isinstance(schema, dict):
        return set()
    found = set().union(*(_combined_refs(v) for v in schema.values()))
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#") and "properties" in schema:
        found.add(ref)
    return found


def _closed(schema: Any, close: bool, combined: set[str], path: str = "#") -> Any:
    """``schema`` (found at ``path``) with its objects closed; ``combined``: the
    :func:`_combined_refs` targets, left open at their own level."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_KEYWORDS:
        if isinstance(out.get(key), dict):
            out[key] = _closed(out[key], True, combined, f"{path}/{key}")
    for key in _LIST_KEYWORDS:
        if isinstance(out.get(key), list):
            out[key] = [
                _closed(s, True, combined, f"{path}/{key}/{i}") for i, s in enumerate(out[key])
            ]
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [
            _closed(s, False, combined, f"{path}/allOf/{i}") for i, s in enumerate(out["allOf"])
        ]
    for key in _MAP_KEYWORDS:
        if isinstance(out.get(key), dict):
            out[key] = {
                name: _closed(s, True, combined, f"{path}/{key}/{name}")
                for name, s in out[key].items()
            }
    others = ("additionalProperties", "patternProperties", "unevaluatedProperties", "allOf")
    if (
        close
        and path not in combined
        and "properties" in out
        and not any(k in out for k in (*others, "$ref"))
    ):
        out["additionalProperties"] = False
        listed, required = out["properties"], out.get("required")
        if isinstance(listed, dict) and isinstance(required, list):
            # required but not described: any value, or closing would refuse them
            names = [n for n in required if isinstance(n, str) and n not in listed]
            out["properties"] = {**listed, **{n: {} for n in names}}
    return out


def json_lark(schema: Mapping[str, Any] | bool) -> str:
    """A Lark grammar item matching JSON valid against ``schema`` (its objects closed:
    :func:`closed_objects`), written like :data:`JSON_OPTIONS` (for grammars that embed
    JSON, e.g. tool calls); :class:`ConstraintError` for a schema :func:`check_schema`
    refuses."""
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    check_schema(schema)
    options = {**JSON_OPTIONS, **schema.get("x-guidance", {})}
    return f"%json {json.dumps({**closed_objects(schema), 'x-guidance': options})}"


class ConstraintError(ValueError):
    """A grammar or schema the library refuses; ``reason`` is the library's own words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class GrammarFailedError(ConstraintError):
    """A sequence's grammar broke while generating (no token can continue it: a ``$ref``
    cycle, a recursion no output ends, a regex past the library's limits). The request's
    grammar is at fault, not the engine: the request fails, the engine goes on. ``where``
    is the grammar's :attr:`CompiledConstraint.description` (the API: its field)."""

    def __init__(self, where: str, reason: str) -> None:
        ValueError.__init__(self, f"{where}: cannot be followed while generating: {reason}")
        self.reason = reason
        self.where = where


# llguidance's stop reasons that end a matcher in error, in words
_STOP_REASONS = {
    "NoExtension": "no token can continue the output",
    "NoExtensionBias": "no token can continue the output",
    "ParserTooComplex": "the grammar is too complex",
    "LexerTooComplex": "a regex of the grammar is too complex",
}


def _one_line(reason: str) -> str:
    """The library's reason in one line: its first, and the ``error:`` lines of a regex
    parser's report; not the listings (of the grammar, which is ours, not the client's,
    and of the regex with a caret under the fault)."""
    lines = reason.strip().splitlines()
    return " ".join([lines[0], *(line for line in lines[1:] if line.startswith("error:"))])


def _matcher_error(matcher: llguidance.LLMatcher) -> str:
    """The first line of the library's error (the rest is a dump of its state)."""
    first = matcher.get_error().strip().split("\n", 1)[0]
    return _STOP_REASONS.get(first, first)


class _VocabularyView:
    """What ``llguidance.TokenizerWrapper`` reads from a tokenizer: every token's bytes,
    which ids are control tokens, and an encoder (used for the grammar's literals)."""

    def __init__(self, tokenizer: Tokenizer, stop_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = stop_ids[0]
        self.bos_token_id = tokenizer.bos_id
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.special_token_ids = [i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)]

    def __call__(self, text: bytes) -> list[int]:
        return self._tokenizer.encode(text.decode("utf-8", errors="replace"))


@dataclass(frozen=True, slots=True, eq=False)
class CompiledConstraint:
    """A grammar compiled for one model's tokenizer. ``description`` names it in errors
    (the API: the request field it came from); :meth:`start` gives each sequence its own
    position in it."""

    description: str
    vocab_size: int
    _initial: llguidance.LLMatcher  # never advanced: each sequence copies it

    def start(self) -> TokenConstraint:
        return TokenConstraint(self._initial.deep_copy(), self.vocab_size, self.description)


class TokenConstraint:
    """One sequence's position in its grammar (engine thread only)."""

    def __init__(
        self, matcher: llguidance.LLMatcher, vocab_size: int, description: str = "grammar"
    ) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self.description = description
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)

    def allowed(self) -> np.ndarray:
        """``bool [vocab]``: the tokens that may come next. Raises
        :class:`GrammarFailedError` if the matcher broke (it then allows nothing)."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        self._check()
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")
        return bits[: self.vocab_size].view(np.bool_)

    def allowed_ids(self) -> np.ndarray:
        """``int64 [n]``: the ids of :meth:`allowed`, ascending."""
        return np.flatnonzero(self.allowed())

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """``logits [vocab]`` with every token the grammar forbids at ``-inf`` (a copy)."""
        out: np.ndarray = np.where(self.allowed(), logits, np.float32(-np.inf))
        return out.astype(np.float32, copy=False)

    def advance(self, token_id: int) -> None:
        """The sampled token joins the output (it was allowed: :meth:`apply` masked)."""
        self._matcher.consume_token(token_id)
        self._check()

    @property
    def is_finished(self) -> bool:
        """The grammar is complete and a stop token has been taken (or nothing but a stop
        token can follow)."""
        return bool(self._matcher.is_stopped())

    @property
    def is_accepting(self) -> bool:
        """The output so far is a whole sentence of the grammar."""
        return bool(self._matcher.is_accepting())

    def _check(self) -> None:
        if self._matcher.is_error():
            raise GrammarFailedError(self.description, _matcher_error(self._matcher))


class ConstraintCompiler:
    """Compiles grammars for one tokenizer and caches them (LRU, :data:`CACHE_SIZE`).

    ``stop_ids`` are the tokens that end a generation (EOS/EOT): the grammar allows them
    once it is complete. Thread-safe: the API compiles on its worker threads.
    """

    def __init__(
        self, tokenizer: Tokenizer, stop_ids: Iterable[int], cache_size: int = CACHE_SIZE
    ) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = sorted(stop_ids)
        if not self.stop_ids:
            raise ValueError("constrained decoding needs at least one stop token")
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[str, CompiledConstraint] = OrderedDict()
        self.compiled = 0  # grammars compiled (cache misses), for tests and metrics

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        """Built on first use (~0.2 s for 128k tokens): a server never asked for
        structured output never pays it."""
        with self._lock:
            if self._ll_tokenizer is None:
                view = _VocabularyView(self.tokenizer, self.stop_ids)
                self._ll_tokenizer = llguidance.LLTokenizer(
                    llguidance.TokenizerWrapper(view), eos_token=self.stop_ids
                )
            return self._ll_tokenizer

    # -- grammar sources --------------------------------------------------------------------

    def json_schema(
        self, schema: Mapping[str, Any] | bool, description: str = "JSON schema"
    ) -> CompiledConstraint:
        """Output valid against the JSON Schema ``schema`` (objects closed:
        :func:`closed_objects`); a schema longer than :data:`MAX_GRAMMAR_CHARS` as compact
        JSON is refused."""
        check_size(len(json.dumps(schema, separators=(",", ":"))), "the schema (as compact JSON)")
        check_schema(schema)
        try:
            source = json.dumps(schema) if isinstance(schema, bool) else closed_objects(schema)
            grammar = llguidance.LLMatcher.grammar_from_json_schema(source, defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as exc:
            raise ConstraintError(_one_line(str(exc))) from exc
        return self.grammar(grammar, description)

    def json_object(self) -> CompiledConstraint:
        """Any JSON object (OpenAI's ``{"type": "json_object"}``)."""
        return self.json_schema({"type": "object"})

    def lark(self, source: str, description: str = "grammar") -> CompiledConstraint:
        """A grammar in llguidance's Lark syntax (may embed ``%json {schema}``)."""
        check_size(len(source), "the grammar")
        return self.grammar(llguidance.LLMatcher.grammar_from_lark(source), description)

    def gbnf(self, source: str, description: str = "GBNF grammar") -> CompiledConstraint:
        """A llama.cpp GBNF grammar (read as llama.cpp reads it: :mod:`.gbnf`)."""
        check_size(len(source), "the grammar")
        try:
            lark = gbnf_to_lark(source)
        except GbnfError as exc:
            raise ConstraintError(f"invalid GBNF grammar: {exc}") from exc
        return self.lark(lark, description)

    def grammar(self, grammar: str, description: str) -> CompiledConstraint:
        """Compile llguidance's grammar text (cached by that text, whatever it is called)."""
        with self._lock:
            hit = self._cache.get(grammar)
            if hit is not None:
                self._cache.move_to_end(grammar)
                same = hit.description == description
                return hit if same else replace(hit, description=description)
        compiled = self._compile(grammar, description)
        with self._lock:
            self._cache[grammar] = compiled
            self.compiled += 1
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, grammar: str, description: str) -> CompiledConstraint:
        tokenizer = self._llg_tokenizer()
        problem = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if problem:
            raise ConstraintError(_one_line(problem))
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(_matcher_error(matcher))
        compiled = CompiledConstraint(description, self.tokenizer.vocab_size, matcher)
        try:  # a grammar no output can even begin (a bare $ref cycle): refused now
            compiled.start().allowed()
        except GrammarFailedError as exc:
            raise ConstraintError(exc.reason) from None
        return compiled
