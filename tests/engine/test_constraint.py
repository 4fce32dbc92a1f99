"""Constrained decoding in the engine: compiling and caching grammars, masking each step,
and how a constrained sequence ends (grammar complete → "stop", out of tokens → "length")."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pydantic
import pytest

from bitserve.engine.constraint import (
    MAX_GRAMMAR_CHARS,
    ConstraintCompiler,
    ConstraintError,
    closed_objects,
)
from bitserve.engine.generate import Generator
from bitserve.engine.sampling import Sampler, SamplingParamError
from bitserve.engine.types import GenerationRequest, SamplingParams
from bitserve.tokenizer import Tokenizer

# fixtures from conftest: `scripted(script)` builds a ScriptedModel, `ids` the TokenIds table
ScriptedModel = Any
TokenIds = Any


class Item(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str = pydantic.Field(max_length=8)
    qty: int = pydantic.Field(ge=1, le=9)


class Order(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    kind: Literal["a", "b"]
    items: list[Item] = pydantic.Field(max_length=2)
    note: str | None = pydantic.Field(default=None, max_length=8)


@dataclass
class Config:
    vocab_size: int
    context_length: int


@dataclass
class Cache:
    max_seq: int
    length: int = 0


@dataclass
class RandomModel:
    """Stand-in model whose logits are random every step (a fixed seed): sampling at
    temperature 1 then wanders over whatever the grammar allows."""

    vocab_size: int
    seed: int = 0
    context_length: int = 512
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    @property
    def config(self) -> Config:
        return Config(self.vocab_size, self.context_length)

    def new_cache(self, max_seq: int | None = None) -> Cache:
        return Cache(self.context_length if max_seq is None else max_seq)

    def forward(self, tokens: Sequence[int], cache: Cache, all_logits: bool = False) -> np.ndarray:
        cache.length += len(tokens)
        return self.rng.normal(0, 3, self.vocab_size).astype(np.float32)


@pytest.fixture
def compiler(tokenizer: Tokenizer, ids: TokenIds) -> ConstraintCompiler:
    return ConstraintCompiler(tokenizer, {ids.eot})


def request(
    compiler: ConstraintCompiler, ids: TokenIds, schema: dict, **kw: object
) -> GenerationRequest:
    params = SamplingParams(
        temperature=1.0, top_k=0, top_p=1.0, seed=kw.pop("seed", 1),  # type: ignore[arg-type]
        constraint=compiler.json_schema(schema),
    )  # fmt: skip
    return GenerationRequest([ids.word("Hello")], params, stop_token_ids={ids.eot}, **kw)  # type: ignore[arg-type]


def test_compiles_once_per_schema(compiler: ConstraintCompiler) -> None:
    schema = Order.model_json_schema()
    first = compiler.json_schema(schema)
    assert compiler.json_schema(json.loads(json.dumps(schema))) is first
    assert compiler.compiled == 1
    assert compiler.json_object() is not first
    assert compiler.compiled == 2


def test_cache_evicts_least_recently_used(tokenizer: Tokenizer, ids: TokenIds) -> None:
    compiler = ConstraintCompiler(tokenizer, {ids.eot}, cache_size=2)
    a = compiler.json_schema({"const": "a"})
    compiler.json_schema({"const": "b"})
    assert compiler.json_schema({"const": "a"}) is a  # a is now the most recent
    compiler.json_schema({"const": "c"})  # evicts b
    assert compiler.compiled == 3
    compiler.json_schema({"const": "b"})
    assert compiler.compiled == 4


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        ({"type": "objekt"}, "objekt"),
        ({"$ref": "#/$defs/missing"}, "missing"),
        # a $ref cycle no output can begin: it failed in the engine, a 500 (and /health)
        ({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "no token can continue"),
        # 1e400 in a request reads as infinity: the library was handed null ("got null")
        ({"type": "number", "maximum": float("inf")}, "too large for JSON"),
        ({"enum": [1.5, [float("-inf")]]}, "too large for JSON"),
    ],
)
def test_refused_schemas_say_why(compiler: ConstraintCompiler, schema: dict, reason: str) -> None:
    with pytest.raises(ConstraintError, match=reason) as info:
        compiler.json_schema(schema)
    assert info.value.reason


def test_one_grammar_compiled_once_whatever_its_callers_call_it(
    compiler: ConstraintCompiler,
) -> None:
    first = compiler.json_schema({"type": "object"}, "response_format")
    again = compiler.json_schema({"type": "object"}, "json_schema")
    assert again.description == "json_schema" and compiler.compiled == 1
    assert compiler.json_schema({"type": "object"}, "response_format") is first


def test_gbnf_and_lark(compiler: ConstraintCompiler, tokenizer: Tokenizer) -> None:
    gbnf = compiler.gbnf('root ::= "yes" | "no"')
    state = gbnf.start()
    allowed = {tokenizer.decode([int(t)]) for t in np.flatnonzero(state.allowed())}
    assert allowed == {"y", "n"}
    with pytest.raises(ConstraintError, match="GBNF"):
        compiler.gbnf("root ::= (")
    with pytest.raises(ConstraintError):
        compiler.lark("start: undefined_rule")


def test_random_logits_always_give_valid_json(
    compiler: ConstraintCompiler, tokenizer: Tokenizer, ids: TokenIds
) -> None:
    gen = Generator(RandomModel(tokenizer.vocab_size), tokenizer)  # type: ignore[arg-type]
    schema = Order.model_json_schema()
    for seed in range(12):
        result = gen.complete(request(compiler, ids, schema, seed=seed, max_tokens=200))
        assert result.finish_reason == "stop", result.text
        Order.model_validate_json(result.text)  # raises if invalid
        # the grammar's last token is the reply's last: no stop token was needed
        assert result.token_ids[-1] != ids.eot
        assert result.text.endswith("}")


def test_out_of_tokens_is_length(
    compiler: ConstraintCompiler, tokenizer: Tokenizer, ids: TokenIds
) -> None:
    gen = Generator(RandomModel(tokenizer.vocab_size), tokenizer)  # type: ignore[arg-type]
    result = gen.complete(request(compiler, ids, Order.model_json_schema(), max_tokens=3))
    assert result.finish_reason == "length"
    assert result.completion_tokens == 3
    assert result.text.startswith("{")


def test_greedy_follows_the_grammar_not_the_model(
    compiler: ConstraintCompiler,
    tokenizer: Tokenizer,
    ids: TokenIds,
    scripted: Callable[..., ScriptedModel],
) -> None:
    """The model wants "Hello world"; the grammar allows only true/false."""
    model = scripted([ids.word("Hello"), ids.word(" world")])
    params = SamplingParams(temperature=0, constraint=compiler.json_schema({"type": "boolean"}))
    req = GenerationRequest([ids.word("Hello")], params, stop_token_ids={ids.eot})
    result = Generator(model, tokenizer).complete(req)  # type: ignore[arg-type]
    assert result.text in ("true", "false")
    assert result.finish_reason == "stop"


def test_logprobs_stay_the_models(compiler: ConstraintCompiler, tokenizer: Tokenizer) -> None:
    """The mask decides what is picked; logprobs still report the unmasked distribution."""
    params = SamplingParams(temperature=0, constraint=compiler.json_schema({"type": "boolean"}))
    sampler = Sampler.create(params, tokenizer.vocab_size)
    logits = np.zeros(tokenizer.vocab_size, dtype=np.float32)
    logits[ord("x")] = 5.0
    step = sampler.step(logits, [], want_logprobs=True)
    assert tokenizer.decode([step.token_id]) in ("t", "f")
    assert step.logprobs is not None
    assert int(np.argmax(step.logprobs)) == ord("x")
    assert np.isfinite(step.logprobs).all()


def test_a_constraint_for_another_vocabulary_is_refused(compiler: ConstraintCompiler) -> None:
    params = SamplingParams(constraint=compiler.json_object())
    with pytest.raises(SamplingParamError, match="vocabulary"):
        Sampler.create(params, vocab_size=compiler.tokenizer.vocab_size + 1)


def test_needs_a_stop_token(tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="stop token"):
        ConstraintCompiler(tokenizer, set())


def test_objects_with_listed_properties_are_closed() -> None:
    schema = {
        "type": "object",
        "properties": {
            "properties": {"type": "object", "properties": {"a": {"type": "integer"}}},
            "free": {"type": "object"},
            "open": {"type": "object", "properties": {}, "additionalProperties": True},
            "list": {"type": "array", "items": {"properties": {"b": {}}}},
        },
        "$defs": {"D": {"anyOf": [{"properties": {"c": {}}}, {"type": "null"}]}},
    }
    closed = closed_objects(schema)
    props = closed["properties"]
    assert closed["additionalProperties"] is False
    assert props["properties"]["additionalProperties"] is False  # a property named so
    assert "additionalProperties" not in props["properties"]["properties"]  # the name map
    assert "additionalProperties" not in props["free"]  # any object stays any object
    assert props["open"]["additionalProperties"] is True
    assert props["list"]["items"]["additionalProperties"] is False
    assert closed["$defs"]["D"]["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the input is left as it was


def test_required_names_that_properties_do_not_list_stay_possible(
    compiler: ConstraintCompiler, tokenizer: Tokenizer, ids: TokenIds
) -> None:
    """Valid JSON Schema ("b" may be anything); closing the object left "b" nowhere to
    go, and the schema was refused as unsatisfiable."""
    schema = {"type": "object", "properties": {"a": {"enum": [1]}}, "required": ["a", "b"]}
    assert closed_objects(schema)["properties"] == {"a": {"enum": [1]}, "b": {}}
    gen = Generator(RandomModel(tokenizer.vocab_size), tokenizer)  # type: ignore[arg-type]
    for seed in range(4):
        result = gen.complete(request(compiler, ids, schema, seed=seed, max_tokens=60))
        if result.finish_reason == "stop":  # b's value is unbounded: it may run out first
            assert set(json.loads(result.text)) == {"a", "b"}
        assert result.text.startswith('{"a": 1, "b": ')


def test_closed_objects_end(compiler: ConstraintCompiler, tokenizer: Tokenizer) -> None:
    state = compiler.json_schema({"type": "object", "properties": {"a": {"const": 1}}}).start()
    for token in tokenizer.encode('{"a": 1'):
        state.advance(token)
    allowed = {
        tokenizer.decode([int(t)], skip_special=False) for t in np.flatnonzero(state.allowed())
    }
    assert allowed == {"}"}


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_picking_among_allowed_ids_is_sampling_the_masked_logits(
    compiler: ConstraintCompiler, tokenizer: Tokenizer, temperature: float
) -> None:
    """The sampler's shortcut draws exactly what the standard pipeline draws from the
    masked vector, with the same RNG."""
    compiled = compiler.json_schema(Order.model_json_schema())
    rng = np.random.default_rng(4)
    for top_k, top_p in ((0, 1.0), (40, 0.95), (0, 0.9)):
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=9,
                                constraint=compiled)  # fmt: skip
        fast = Sampler.create(params, tokenizer.vocab_size)
        slow = Sampler.create(params, tokenizer.vocab_size)
        assert slow.constraint is not None
        for _ in range(40):
            logits = rng.normal(0, 3, tokenizer.vocab_size).astype(np.float32)
            if slow.constraint.is_finished:
                break
            expected = slow.pick(slow.constraint.apply(slow.adjust(logits, [])))
            slow.constraint.advance(expected)
            assert fast.step(logits, [], want_logprobs=False).token_id == expected


def test_all_of_branches_stay_open(compiler: ConstraintCompiler, tokenizer: Tokenizer) -> None:
    """Each branch lists a property the other adds: closing them would allow nothing."""
    schema = {
        "allOf": [
            {"type": "object", "properties": {"a": {"const": 1}}, "required": ["a"]},
            {"type": "object", "properties": {"b": {"const": 2}}, "required": ["b"]},
        ]
    }
    assert "additionalProperties" not in closed_objects(schema)["allOf"][0]
    state = compiler.json_schema(schema).start()
    for token in tokenizer.encode('{"a": 1, "b": 2}'):
        assert state.allowed()[token]
        state.advance(token)
    assert state.is_accepting


def test_a_ref_with_sibling_properties_stays_open(
    compiler: ConstraintCompiler, tokenizer: Tokenizer
) -> None:
    """``$ref`` beside ``properties`` combines the two like ``allOf`` (JSON Schema 2019+):
    closing either side would forbid what the other requires."""
    base = {"type": "object", "properties": {"a": {"const": 1}}, "required": ["a"]}
    schema = {"$defs": {"Base": base}, "$ref": "#/$defs/Base",
              "properties": {"b": {"const": 2}}, "required": ["b"]}  # fmt: skip
    closed = closed_objects(schema)
    assert (
        "additionalProperties" not in closed
        and "additionalProperties" not in closed["$defs"]["Base"]
    )
    state = compiler.json_schema(schema).start()
    for token in tokenizer.encode('{"a": 1, "b": 2}'):
        assert state.allowed()[token]
        state.advance(token)
    assert state.is_accepting
    # a definition only referenced on its own is still closed
    alone = closed_objects({"$defs": {"Base": base}, "properties": {"x": {"$ref": "#/$defs/Base"}}})
    assert alone["$defs"]["Base"]["additionalProperties"] is False


def test_grammars_and_schemas_past_the_size_limit_are_refused_before_any_work(
    compiler: ConstraintCompiler,
) -> None:
    """Compiling costs more than linearly in size (5000 optional properties took seconds
    of CPU); the limit counts characters, so text the library ignores counts too."""
    room = MAX_GRAMMAR_CHARS - len('{"type":"string","description":""}')
    compiler.json_schema({"type": "string", "description": "x" * room})
    with pytest.raises(ConstraintError, match=f"above the limit of {MAX_GRAMMAR_CHARS}"):
        compiler.json_schema({"type": "string", "description": "x" * (room + 1)})
    comment = "#" * (MAX_GRAMMAR_CHARS - len('\nroot ::= "a"'))
    compiler.gbnf(comment + '\nroot ::= "a"')
    with pytest.raises(ConstraintError, match="the grammar is 65537 characters long"):
        compiler.gbnf("#" + comment + '\nroot ::= "a"')
    lark = '\nstart: "a"'
    with pytest.raises(ConstraintError, match="the grammar is 65537 characters long"):
        compiler.lark("/" * (MAX_GRAMMAR_CHARS + 1 - len(lark)) + lark)
    assert compiler.compiled == 2
