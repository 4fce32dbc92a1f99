"""Acceptance for structured output and tool calls (issue 19): the real server process on
the random demo model, driven by the official ``openai`` SDK and by LangChain.

Each schema is sampled 56 times at temperature 1 (7 concurrent requests with n=8, batched
together) and every reply must parse into its pydantic model: with random weights only
the constraint can make that happen. Strings and arrays carry bounds so that a random
model reaches the end of the JSON within ``max_tokens``.
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

import httpx
import jsonschema
import openai
import pydantic
import pytest
from api_server import Server, start
from openai.types.chat import ChatCompletion

T = TypeVar("T")
SAMPLES, N = 56, 8
MAX_TOKENS = 320


class Address(pydantic.BaseModel):
    street: str = pydantic.Field(max_length=10)
    city: str = pydantic.Field(max_length=8)


class Person(pydantic.BaseModel):  # nested objects
    name: str = pydantic.Field(max_length=8)
    address: Address


class Item(pydantic.BaseModel):
    sku: str = pydantic.Field(max_length=6)
    qty: int = pydantic.Field(ge=1, le=9)


class Basket(pydantic.BaseModel):  # arrays
    items: list[Item] = pydantic.Field(max_length=3)
    tags: list[Literal["a", "b", "c"]] = pydantic.Field(max_length=3)


class Priority(str, enum.Enum):
    low = "low"
    high = "high"


class Ticket(pydantic.BaseModel):  # enums
    priority: Priority
    status: Literal["open", "closed", "stale"]


class Reading(pydantic.BaseModel):  # numbers with bounds
    celsius: float = pydantic.Field(ge=-40, le=60)
    count: int = pydantic.Field(ge=0, le=100)


class Profile(pydantic.BaseModel):  # optional fields
    nickname: str | None = pydantic.Field(default=None, max_length=8)
    age: int | None = pydantic.Field(default=None, ge=0, le=120)
    verified: bool | None = None


class GetWeather(pydantic.BaseModel):
    """The weather in a city."""

    city: str = pydantic.Field(max_length=8)
    unit: Literal["c", "f"]


MESSAGES: list[Any] = [{"role": "user", "content": "Fill in the form."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start(tmp_path_factory.mktemp("structured"), "--max-batch", "32", "--max-queue", "64")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def sdk(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def concurrently(make: Callable[[int], list[T]], requests: int) -> list[T]:
    """``make(seed)`` for ``requests`` seeds at once (their choices share the batch)."""
    with ThreadPoolExecutor(requests) as pool:
        return [x for batch in pool.map(make, [i * 1000 for i in range(requests)]) for x in batch]


@pytest.mark.parametrize("model", [Person, Basket, Ticket, Reading, Profile])
def test_parse_gives_a_valid_object_every_time(
    sdk: openai.OpenAI, model: type[pydantic.BaseModel]
) -> None:
    def sample(seed: int) -> list[pydantic.BaseModel]:
        reply = sdk.chat.completions.parse(
            model="bitnet", messages=MESSAGES, response_format=model, n=N, temperature=1.0,
            seed=seed, max_tokens=MAX_TOKENS,
        )  # fmt: skip
        return [c.message.parsed for c in reply.choices if c.message.parsed is not None]

    parsed = concurrently(sample, SAMPLES // N)
    assert len(parsed) == SAMPLES  # parse() raises for an invalid or cut-off reply
    assert all(isinstance(p, model) for p in parsed)


def test_json_object_mode(sdk: openai.OpenAI) -> None:
    """Any JSON object: nothing bounds its strings or depth, so a random model at
    temperature 1 may run out of tokens first, which the reply says ("length"); every
    reply that ends is a JSON object."""

    def sample(seed: int) -> list[tuple[str, str]]:
        reply = sdk.chat.completions.create(
            model="bitnet", messages=MESSAGES, response_format={"type": "json_object"}, n=N,
            temperature=1.0, seed=seed, max_tokens=MAX_TOKENS,
        )  # fmt: skip
        return [(c.finish_reason, c.message.content or "") for c in reply.choices]

    replies = concurrently(sample, 2)
    ended = [text for reason, text in replies if reason == "stop"]
    assert len(ended) >= len(replies) // 3, replies
    assert all(isinstance(json.loads(text), dict) for text in ended)
    assert all(reason == "length" and text.startswith("{") for reason, text in replies
               if reason != "stop")  # fmt: skip


def test_required_tool_call_arguments_validate(sdk: openai.OpenAI) -> None:
    tools = [openai.pydantic_function_tool(GetWeather), openai.pydantic_function_tool(Reading)]
    models = {"GetWeather": GetWeather, "Reading": Reading}

    def sample(seed: int) -> list[Any]:
        reply = sdk.chat.completions.create(
            model="bitnet", messages=MESSAGES, tools=tools, tool_choice="required", n=N,
            temperature=1.0, seed=seed, max_tokens=MAX_TOKENS,
        )  # fmt: skip
        return list(reply.choices)

    choices = concurrently(sample, 2)
    for choice in choices:
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for call in choice.message.tool_calls:
            models[call.function.name].model_validate_json(call.function.arguments)
    # parse() reads strict function tools' arguments into the models too
    reply = sdk.chat.completions.parse(
        model="bitnet", messages=MESSAGES, tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice="required", parallel_tool_calls=False, max_tokens=MAX_TOKENS,
    )  # fmt: skip
    (call,) = reply.choices[0].message.tool_calls or []
    assert isinstance(call.function.parsed_arguments, GetWeather)


def test_tool_choice_none_gives_a_plain_answer(sdk: openai.OpenAI) -> None:
    reply = sdk.chat.completions.create(
        model="bitnet", messages=MESSAGES, tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice="none", max_tokens=12,
    )  # fmt: skip
    choice = reply.choices[0]
    assert choice.message.tool_calls is None and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")


def test_streamed_tool_calls_through_the_sdk(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model="bitnet", messages=MESSAGES, tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice="required", parallel_tool_calls=False, max_tokens=MAX_TOKENS, stream=True,
    )  # fmt: skip
    arguments, names, finish = "", "", None
    for chunk in stream:
        delta = chunk.choices[0].delta
        for piece in delta.tool_calls or []:
            names += (piece.function.name if piece.function else None) or ""
            arguments += (piece.function.arguments if piece.function else None) or ""
        finish = chunk.choices[0].finish_reason or finish
    assert names == "GetWeather" and finish == "tool_calls"
    GetWeather.model_validate_json(arguments)


def test_tool_round_trip_in_a_stored_conversation(sdk: openai.OpenAI) -> None:
    tools = [openai.pydantic_function_tool(GetWeather)]
    conv = sdk.conversations.create(metadata={"title": "weather"})
    path = f"/conversations/{conv.id}/chat"
    ask = {
        "messages": [{"role": "user", "content": "Weather in Oslo?"}],
        "tools": tools,
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_tokens": MAX_TOKENS,
    }
    first = sdk.post(path, cast_to=ChatCompletion, body=ask)  # fmt: skip
    assert first.choices[0].finish_reason == "tool_calls"
    (call,) = first.choices[0].message.tool_calls or []
    GetWeather.model_validate_json(call.function.arguments)
    result = {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 4}'}
    final = sdk.post(path, cast_to=ChatCompletion,
                     body={"messages": [result], "tools": tools, "max_tokens": 12,
                           "tool_choice": "none"})  # fmt: skip
    assert isinstance(final.choices[0].message.content, str)
    stored = sdk.get(f"/conversations/{conv.id}", cast_to=dict[str, Any])["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant", "tool", "assistant"]
    assert stored[1]["tool_calls"][0]["id"] == call.id
    assert stored[1]["tool_calls"][0]["function"]["arguments"] == call.function.arguments
    assert stored[2]["tool_call_id"] == call.id


# ---- LangChain -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(server: Server) -> Any:
    os.environ.setdefault("LANGSMITH_TRACING", "false")  # never reach the network
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model="bitnet", base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
        temperature=1.0, max_tokens=MAX_TOKENS, seed=3,
    )  # fmt: skip


def test_langchain_bind_tools(chat_model: Any) -> None:
    bound = chat_model.bind_tools([GetWeather], tool_choice="required")
    message = bound.invoke("What is the weather in Oslo?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "GetWeather"
    GetWeather.model_validate(message.tool_calls[0]["args"])


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output(chat_model: Any, method: str) -> None:
    structured = chat_model.with_structured_output(Ticket, method=method)
    assert isinstance(structured.invoke("File a ticket."), Ticket)


# ---- every schema feature, checked with jsonschema ------------------------------------------

BOUNDED = [0, 9]  # integer bounds: a random model writes digits forever otherwise
SCHEMAS: dict[str, dict[str, Any]] = {
    "nested": {"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "object", "properties": {"c": {"type": "boolean"}}, "required": ["c"]}},
        "required": ["b"]}}, "required": ["a"]},
    "array_bounds": {"type": "array", "items": {"enum": [1, 2]}, "minItems": 2, "maxItems": 4},
    "enum_mixed": {"enum": ["x", 1, None, True, {"k": [1]}]},
    "const": {"type": "object", "properties": {"k": {"const": "fixed"}, "n": {"const": 42}},
              "required": ["k", "n"]},
    "any_of": {"anyOf": [{"type": "integer", "minimum": 5, "maximum": 7},
                         {"type": "string", "maxLength": 3}, {"type": "null"}]},
    "one_of_types": {"oneOf": [{"type": "boolean"}, {"type": "string", "maxLength": 2}]},
    "all_of": {"allOf": [{"type": "object", "properties": {"a": {"type": "boolean"}},
                          "required": ["a"]},
                         {"type": "object", "properties": {"b": {"type": "null"}},
                          "required": ["b"]}], "maxProperties": 2},  # parts stay open
    "pattern": {"type": "string", "pattern": "^[a-c]{2,4}-[0-9]{1,3}$"},
    "formats": {"type": "object", "properties": {"d": {"type": "string", "format": "date"},
        "u": {"type": "string", "format": "uuid"}, "ip": {"type": "string", "format": "ipv4"}},
        "required": ["d", "u", "ip"]},
    "numbers": {"type": "object", "properties": {
        "i": {"type": "integer", "exclusiveMinimum": 3, "exclusiveMaximum": 9},
        "m": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 50},
        "h": {"type": "number", "multipleOf": 0.5, "minimum": -2, "maximum": 2}},
        "required": ["i", "m", "h"]},
    "optional": {"type": "object", "properties": {"a": {"type": "boolean"},
        "b": {"type": "string", "maxLength": 2}, "c": {"type": "null"}}, "required": ["a"]},
    "pattern_properties": {"type": "object", "patternProperties": {"^x[0-9]$": {"type": "boolean"}},
                           "additionalProperties": False, "maxProperties": 2},
    "refs": {"$defs": {"d": {"type": "integer", "minimum": 0, "maximum": 9},
                       "p": {"type": "object", "properties": {"x": {"$ref": "#/$defs/d"}},
                             "required": ["x"]}},
             "type": "object", "properties": {"p": {"$ref": "#/$defs/p"},
                                              "q": {"items": {"$ref": "#/$defs/d"},
                                                    "maxItems": 2}}, "required": ["p", "q"]},
    "anchor": {"$defs": {"d": {"$anchor": "digit", "enum": [7, 8]}},
               "type": "object", "properties": {"a": {"$ref": "#digit"}}, "required": ["a"]},
    "unicode": {"type": "object", "properties": {
        "ключ": {"enum": ["значение", "日本語", "😀", "tab\t\"quote\""]},
        "名前": {"type": "string", "maxLength": 3}}, "required": ["ключ", "名前"]},
    "empty_object": {"type": "object", "properties": {}},
    "prefix_items": {"type": "array", "prefixItems": [{"type": "boolean"},
                                                      {"type": "string", "maxLength": 2}],
                     "items": False, "minItems": 2},
    "required_unlisted": {"type": "object", "properties": {"a": {"type": "boolean"}},
                          "required": ["a", "b"], "additionalProperties": {"type": "null"}},
}  # fmt: skip


def check(schema: dict[str, Any], text: str) -> None:
    """``text`` parses and is valid against ``schema`` (formats checked too)."""
    validator = jsonschema.Draft202012Validator(schema, format_checker=FORMATS)
    validator.validate(json.loads(text))


FORMATS = jsonschema.Draft202012Validator.FORMAT_CHECKER


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_schema_feature_validates(server: Server, name: str) -> None:
    """Greedy, and sampled hot with top-k/top-p (random weights: adversarial token
    choices); bounded schemas, so every reply ends; streamed deltas join to the reply."""
    schema = SCHEMAS[name]
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    url = f"{server.url}/v1/chat/completions"
    for sampling in ({"temperature": 0}, {"temperature": 2, "top_k": 50, "top_p": 0.95}):
        body = {"model": "bitnet", "messages": MESSAGES, "response_format": fmt, "n": 4,
                "seed": 11, "max_tokens": 200, **sampling}  # fmt: skip
        reply = httpx.post(url, json=body, timeout=120).json()
        for choice in reply["choices"]:
            assert choice["finish_reason"] == "stop", choice
            check(schema, choice["message"]["content"])
        streamed = [""] * 4
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    for c in json.loads(line[6:])["choices"]:
                        streamed[c["index"]] += c["delta"].get("content") or ""
        assert streamed == [c["message"]["content"] for c in reply["choices"]]


def test_every_schema_as_tool_parameters(server: Server) -> None:
    """One tool per object schema, calls required: each call's arguments validate against
    its own tool's parameters."""
    objects = {n: s for n, s in SCHEMAS.items() if s.get("type") == "object"}
    tools = [{"type": "function", "function": {"name": n, "parameters": s}}
             for n, s in objects.items()]  # fmt: skip
    body = {"model": "bitnet", "messages": MESSAGES, "tools": tools, "tool_choice": "required",
            "n": 8, "seed": 5, "temperature": 1.5, "max_tokens": 300}  # fmt: skip
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120).json()
    for choice in reply["choices"]:
        assert choice["finish_reason"] == "tool_calls", choice
        for call in choice["message"]["tool_calls"]:
            check(objects[call["function"]["name"]], call["function"]["arguments"])
