"""Structured output, tool calls and reasoning through the app (in process, real engine on
the random demo model): every constrained reply parses and fits its schema, streamed or
not, in stateless chats, conversations and the oracle routes."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Literal

import jsonschema
import pydantic
import pytest
from api_helpers import chat_body, sse_events
from fastapi.testclient import TestClient

from bitserve.api.chat.protocol import ChatCompletionChunk


class Point(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    x: int = pydantic.Field(ge=-5, le=5)
    y: float = pydantic.Field(ge=0, le=1)


class Shape(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    kind: Literal["circle", "square"]
    points: list[Point] = pydantic.Field(max_length=2)
    label: str | None = pydantic.Field(default=None, max_length=6)


class Weather(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    city: str = pydantic.Field(max_length=8)
    unit: Literal["c", "f"]


def json_schema_format(model: type[pydantic.BaseModel]) -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {"name": model.__name__, "schema": model.model_json_schema()},
    }


def tool(name: str, model: type[pydantic.BaseModel]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": model.model_json_schema()}}


TOOLS = [tool("get_weather", Weather), tool("draw", Shape)]
ARGUMENTS = {"get_weather": Weather, "draw": Shape}


def post(client: TestClient, path: str = "/v1/chat/completions", **body: Any) -> dict[str, Any]:
    r = client.post(path, json=chat_body(**body))
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def test_json_schema_replies_always_fit(client: TestClient) -> None:
    data = post(client, response_format=json_schema_format(Shape), n=8, temperature=1.0,
                seed=7, max_tokens=80)  # fmt: skip
    for choice in data["choices"]:
        assert choice["finish_reason"] == "stop", choice
        Shape.model_validate_json(choice["message"]["content"])  # raises if invalid
        assert "tool_calls" not in choice["message"]


def test_json_object_and_length(client: TestClient) -> None:
    data = post(client, response_format={"type": "json_object"}, n=4, temperature=1.0,
                seed=1, max_tokens=40)  # fmt: skip
    for choice in data["choices"]:
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(choice["message"]["content"]), dict)
        else:  # ran out of tokens first: said so, as OpenAI does
            assert choice["finish_reason"] == "length"
    short = post(client, response_format=json_schema_format(Shape), max_tokens=2)
    assert short["choices"][0]["finish_reason"] == "length"
    assert short["choices"][0]["message"]["content"].startswith("{")


def test_streamed_json_is_the_same_json(client: TestClient) -> None:
    body = chat_body(response_format=json_schema_format(Shape), temperature=1.0, seed=3,
                     max_tokens=80)  # fmt: skip
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    r = client.post("/v1/chat/completions", json={**body, "stream": True})
    chunks = [e for e in sse_events(r.text) if e != "[DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole["message"]["content"]
    Shape.model_validate_json(text)
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"] == "stop"


def test_required_tool_calls_fit_their_function(client: TestClient) -> None:
    data = post(client, tools=TOOLS, tool_choice="required", n=6, temperature=1.0, seed=11,
                max_tokens=300)  # fmt: skip
    for choice in data["choices"]:
        message = choice["message"]
        assert choice["finish_reason"] == "tool_calls", choice
        assert message["content"] is None and message["tool_calls"]
        for call in message["tool_calls"]:
            assert call["type"] == "function" and call["id"].startswith("call_")
            model = ARGUMENTS[call["function"]["name"]]
            model.model_validate_json(call["function"]["arguments"])


def test_named_tool_without_parallel_calls_is_one_call(client: TestClient) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    data = post(client, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False, n=4,
                temperature=1.0, seed=5, max_tokens=60)  # fmt: skip
    for c in data["choices"]:
        (call,) = c["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        Weather.model_validate_json(call["function"]["arguments"])


def test_tool_choice_none_is_plain_text(client: TestClient) -> None:
    data = post(client, tools=TOOLS, tool_choice="none", max_tokens=8)
    message = data["choices"][0]["message"]
    assert "tool_calls" not in message and isinstance(message["content"], str)
    assert data["choices"][0]["finish_reason"] in ("stop", "length")


def test_auto_is_text_or_calls(client: TestClient) -> None:
    data = post(client, tools=TOOLS, n=8, temperature=1.0, seed=2, max_tokens=60)
    for choice in data["choices"]:
        message = choice["message"]
        if choice["finish_reason"] == "tool_calls":
            assert message["tool_calls"]
        else:
            assert "tool_calls" not in message
            assert not message["content"].startswith("<tool_call>")


def stream_message(client: TestClient, body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Rebuild the message from its chunks the way OpenAI clients do (each chunk checked
    against the documented wire type first)."""
    r = client.post("/v1/chat/completions", json={**body, "stream": True})
    assert r.status_code == 200, r.text
    content, calls, finish = "", {}, ""
    for event in sse_events(r.text):
        if event == "[DONE]":
            continue
        ChatCompletionChunk.model_validate(event)
        if not event["choices"]:
            continue
        choice = event["choices"][0]
        delta = choice["delta"]
        content += delta.get("content") or ""
        for piece in delta.get("tool_calls") or []:
            call = calls.setdefault(piece["index"], {"id": None, "name": "", "arguments": ""})
            call["id"] = piece.get("id") or call["id"]
            call["name"] += piece["function"].get("name") or ""
            call["arguments"] += piece["function"].get("arguments") or ""
        finish = choice["finish_reason"] or finish
    return {"content": content, "calls": [calls[i] for i in sorted(calls)]}, finish


def test_streamed_tool_calls_match_the_whole_reply(client: TestClient) -> None:
    body = chat_body(tools=TOOLS, tool_choice="required", temperature=1.0, seed=13,
                     max_tokens=300)  # fmt: skip
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    streamed, finish = stream_message(client, body)
    assert finish == whole["finish_reason"] == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in streamed["calls"]] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in whole["message"]["tool_calls"]
    ]
    assert all(c["id"].startswith("call_") for c in streamed["calls"])
    assert streamed["content"] == ""


def test_oracle_replies_carry_calls(make_client: Callable[..., Any]) -> None:
    with make_client(api_keys=("k",)) as client:
        headers = {"Authorization": "Bearer k"}
        body = chat_body(model="llama-3", tools=TOOLS, tool_choice="required", max_tokens=300,
                         stream=False)  # fmt: skip
        r = client.post("/oracle/v1/4/chat", json=body, headers=headers)
        assert r.status_code == 200, r.text
        message = r.json()["choices"][0]["message"]
        assert message["tool_calls"] and message["reasoning_content"] is None
        body = chat_body(model="llama-3", response_format=json_schema_format(Weather),
                         max_tokens=300, stream=False)  # fmt: skip
        message = client.post("/oracle/v1/4/chat", json=body, headers=headers).json()
        Weather.model_validate_json(message["choices"][0]["message"]["content"])


def test_conversation_round_trip_with_a_tool(client: TestClient) -> None:
    conv = client.post("/v1/conversations").json()["id"]
    path = f"/v1/conversations/{conv}/chat"
    first = post(client, path, content="Weather in Paris?", tools=TOOLS, tool_choice="required",
                 parallel_tool_calls=False, max_tokens=300)  # fmt: skip
    (call,) = first["choices"][0]["message"]["tool_calls"]
    result = {"role": "tool", "tool_call_id": call["id"], "content": '{"temp": 21}'}
    final = post(client, path, messages=[result], tools=TOOLS, tool_choice="none", max_tokens=8)
    assert final["choices"][0]["message"]["content"]
    stored = client.get(f"/v1/conversations/{conv}").json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant", "tool", "assistant"]
    assert stored[1]["tool_calls"] == [call] and stored[1]["content"] == ""
    assert stored[2]["tool_call_id"] == call["id"]
    prompt = client.get(f"/v1/conversations/{conv}/prompt").json()["prompt"]
    assert "<tool_call>\n" + json.dumps({"name": call["function"]["name"]})[:-1] in prompt
    assert '<tool_response>\n{"temp": 21}\n</tool_response>' in prompt


def test_stateless_history_with_calls_and_results(client: TestClient) -> None:
    call = {
        "id": "call_a",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Rome", "unit": "c"}'},
    }
    messages = [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_a", "content": "18 degrees"},
    ]  # fmt: skip
    data = post(client, messages=messages, tools=TOOLS, max_tokens=8)
    assert data["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")


# ---- families: their own call syntax and reasoning ------------------------------------------

FamilyClient = Callable[[str], AbstractContextManager[TestClient]]


def test_falcon3_calls_are_one_json_array(make_family_client: FamilyClient) -> None:
    with make_family_client("falcon3") as client:
        data = post(client, tools=TOOLS, tool_choice="required", n=3, temperature=1.0, seed=4,
                    max_tokens=300)  # fmt: skip
        for choice in data["choices"]:
            assert choice["finish_reason"] == "tool_calls"
            for call in choice["message"]["tool_calls"]:
                ARGUMENTS[call["function"]["name"]].model_validate_json(
                    call["function"]["arguments"]
                )


def test_qwen3_reasoning_goes_to_reasoning_content(make_family_client: FamilyClient) -> None:
    with make_family_client("qwen3") as client:
        tokenizer = client.app.state.served.loaded.tokenizer  # type: ignore[attr-defined]
        think = tokenizer.encode("<think>")
        assert len(think) == 1
        # the model is pushed to open <think> and never close it: all of it is reasoning
        body = chat_body(temperature=0, max_tokens=6, logit_bias={str(think[0]): 100})
        data = post(client, **body)
        message = data["choices"][0]["message"]
        assert message["content"] == "" and message["reasoning_content"].startswith("<think>")
        assert data["usage"]["completion_tokens_details"]["reasoning_tokens"] == 6
        stream = {"stream": True, "stream_options": {"include_usage": True}}
        events = sse_events(client.post("/v1/chat/completions", json={**body, **stream}).text)
        assert events[-2]["usage"]["completion_tokens_details"]["reasoning_tokens"] == 6
        deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
        assert (
            "".join(d.get("reasoning_content") or "" for d in deltas)
            == (message["reasoning_content"])
        )
        assert not "".join(d.get("content") or "" for d in deltas)


def test_qwen3_enable_thinking_false(make_family_client: FamilyClient) -> None:
    with make_family_client("qwen3") as client:
        kwargs = {"enable_thinking": False}
        conv = client.post("/v1/conversations").json()["id"]
        data = post(client, f"/v1/conversations/{conv}/chat", chat_template_kwargs=kwargs,
                    max_tokens=4)  # fmt: skip
        assert "reasoning_content" not in data["choices"][0]["message"]
        assert data["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0


def test_qwen3_json_after_optional_thinking(make_family_client: FamilyClient) -> None:
    with make_family_client("qwen3") as client:
        data = post(client, response_format=json_schema_format(Weather), n=6, temperature=1.0,
                    seed=9, max_tokens=300)  # fmt: skip
        for choice in data["choices"]:
            if choice["finish_reason"] == "stop":
                Weather.model_validate_json(choice["message"]["content"])


@pytest.mark.parametrize("family", ["qwen3", "llama3"])
def test_family_tool_round_trip(make_family_client: FamilyClient, family: str) -> None:
    with make_family_client(family) as client:
        data = post(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                    chat_template_kwargs={"enable_thinking": False}, max_tokens=300)  # fmt: skip
        (call,) = data["choices"][0]["message"]["tool_calls"]
        messages = [
            {"role": "user", "content": "Hello, how are you?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "ok"},
        ]
        final = post(client, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=4)
        assert "tool_calls" not in final["choices"][0]["message"]


def test_qwen3_conversation_keeps_reasoning_apart(make_family_client: FamilyClient) -> None:
    """Stored reasoning is re-rendered as the template wants: dropped from old turns."""
    with make_family_client("qwen3") as client:
        tokenizer = client.app.state.served.loaded.tokenizer  # type: ignore[attr-defined]
        (think,) = tokenizer.encode("<think>")
        conv = client.post("/v1/conversations").json()["id"]
        path = f"/v1/conversations/{conv}/chat"
        first = post(client, path, temperature=0, max_tokens=4, logit_bias={str(think): 100})
        reasoning = first["choices"][0]["message"]["reasoning_content"]
        assert reasoning == "<think>" * 3
        post(client, path, content="And now?", max_tokens=4,
             chat_template_kwargs={"enable_thinking": False})  # fmt: skip
        stored = client.get(f"/v1/conversations/{conv}").json()["messages"]
        assert stored[1]["reasoning_content"] == reasoning and stored[1]["content"] == ""
        prompt = client.get(f"/v1/conversations/{conv}/prompt").json()["prompt"]
        assert "<think><think>" not in prompt  # an old turn's reasoning is not shown again
        assert "<|im_start|>assistant\n<|im_end|>" in prompt


SMALL_TOOL = {"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"n": {"enum": [1, 2]}}, "required": ["n"]}}}  # fmt: skip


@pytest.mark.parametrize(
    ("arch", "family"), [("qwen3", "qwen3"), ("llama", "falcon3"), ("llama", "llama3")]
)
def test_real_family_layouts(
    arch_models: Callable[[str, str], Any], tmp_path: Any, arch: str, family: str
) -> None:
    """Each family's own fixture file (Ternary-Bonsai's Q2_0 qwen3, Falcon3's and
    Llama3-8B-1.58's llama) with its published template: JSON and tool calls hold."""
    from bitserve.api.app import create_app
    from bitserve.api.served import ServedModel
    from bitserve.api.settings import ServerSettings
    from bitserve.store import SQLiteStore

    settings = ServerSettings(db_path=tmp_path / "db.sqlite")
    served = ServedModel.create(arch_models(arch, family), 16, None, settings.aliases)
    app = create_app(settings, served, SQLiteStore(settings.db_path))
    with TestClient(app, raise_server_exceptions=False) as client:
        kwargs = {"enable_thinking": False}
        data = post(client, response_format=json_schema_format(Weather), max_tokens=150,
                    chat_template_kwargs=kwargs, n=2, temperature=1.0, seed=1)  # fmt: skip
        for choice in data["choices"]:
            Weather.model_validate_json(choice["message"]["content"])
        if family == "falcon3":
            return  # its tool prompt alone nearly fills the fixture's 512 positions; its
            # calls are tested on a longer context: test_falcon3_calls_are_one_json_array
        data = post(client, content="Hi", tools=[SMALL_TOOL], tool_choice="required",
                    max_tokens=60, chat_template_kwargs=kwargs)  # fmt: skip
        assert data["choices"][0]["finish_reason"] == "tool_calls"
        for call in data["choices"][0]["message"]["tool_calls"]:
            assert json.loads(call["function"]["arguments"]) in ({"n": 1}, {"n": 2})


@pytest.mark.parametrize("max_tokens", [2, 5, 15, 25])
def test_a_call_cut_short_is_reported_alike_streamed_or_not(
    client: TestClient, max_tokens: int
) -> None:
    """A reply cut by max_tokens inside its call: never call syntax as content, and the
    partial call (name read) is in the whole reply as streaming has sent it."""
    body = chat_body(tools=TOOLS, tool_choice="required", temperature=0, max_tokens=max_tokens)
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    streamed, finish = stream_message(client, body)
    assert finish == whole["finish_reason"] == "length"
    assert not whole["message"]["content"] and not streamed["content"]
    assert [(c["name"], c["arguments"]) for c in streamed["calls"]] == [
        (c["function"]["name"], c["function"]["arguments"])
        for c in whole["message"].get("tool_calls") or []
    ]


def nested_schema(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


@pytest.mark.parametrize("tools", [False, True])
def test_a_schema_too_deep_or_with_bad_options_is_a_400(client: TestClient, tools: bool) -> None:
    extra: dict[str, Any] = {"tools": TOOLS} if tools else {}
    for schema in (nested_schema(300), {"type": "object", "x-guidance": "foo"}):
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        r = client.post("/v1/chat/completions", json=chat_body(response_format=fmt, **extra))
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "response_format"
    deep = nested_schema(51)  # 103 levels of JSON: short enough for the demo's context
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": deep}}
    r = client.post("/v1/chat/completions", json=chat_body(tools=[bad_tool]))
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text
    r = client.post("/completion", json={"prompt": "hi", "json_schema": nested_schema(300)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "json_schema", r.text
    ok = {"type": "json_schema", "json_schema": {"name": "x", "schema": nested_schema(20)}}
    data = post(client, response_format=ok, max_tokens=200, **extra)
    assert data["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_number_json_cannot_write_is_a_400_that_says_so(client: TestClient) -> None:
    """1e400 reads as infinity, which the library was handed as null: 'got null'."""
    schema = '{"type": "object", "properties": {"n": {"type": "number", "maximum": 1e400}}}'
    body = ('{"model": "bitnet", "messages": [{"role": "user", "content": "hi"}], '
            '"response_format": {"type": "json_schema", "json_schema": {"name": "x", '
            f'"schema": {schema}}}}}}}')  # fmt: skip
    r = client.post("/v1/chat/completions", content=body,
                    headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format" and "too large for JSON" in error["message"]


@pytest.mark.parametrize(
    "fields",
    [
        {"response_format": {"type": "json_object"}},
        {"response_format": json_schema_format(Weather)},
        {"response_format": json_schema_format(Weather), "tools": [SMALL_TOOL]},
    ],
)
def test_stop_strings_with_a_json_reply_are_a_400(
    client: TestClient, fields: dict[str, Any]
) -> None:
    """A stop string cut the JSON anywhere (`"` gave content '{', finish "stop"): the pair
    cannot be honoured."""
    r = client.post("/v1/chat/completions", json=chat_body(stop=['"'], **fields))
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text
    free = post(client, stop=['"'], tools=[SMALL_TOOL], tool_choice="none")
    assert free["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("choice", ["required", "auto"])
def test_stop_strings_never_cut_a_tool_call(client: TestClient, choice: str) -> None:
    """Stop strings apply to the text before the first call: '"' and the call tag's own
    beginning cut a call's arguments to '{' (finish "tool_calls"), or left an empty reply
    for tool_choice "required"; agent frameworks send stop strings with tools."""
    stop = ['"', "<tool", "\n"]
    calls_seen = 0
    for seed in range(8):
        body = chat_body(stop=stop, tools=[SMALL_TOOL], tool_choice=choice, temperature=1.5,
                         seed=seed, max_tokens=60)  # fmt: skip
        whole = client.post("/v1/chat/completions", json=body)
        assert whole.status_code == 200, whole.text
        choice_ = whole.json()["choices"][0]
        message, finish = choice_["message"], choice_["finish_reason"]
        calls = [c["function"] for c in message.get("tool_calls") or []]
        streamed, streamed_finish = stream_message(client, body)
        assert streamed_finish == finish
        assert [(c["name"], c["arguments"]) for c in streamed["calls"]] == [
            (c["name"], c["arguments"]) for c in calls
        ]
        if choice == "required":
            assert calls and finish in ("tool_calls", "length"), choice_
        for call in calls if finish == "tool_calls" else ():
            arguments = json.loads(call["arguments"])
            jsonschema.validate(arguments, SMALL_TOOL["function"]["parameters"])
        if finish == "stop":  # a stop string (or the end) in the text before any call
            assert not calls and not any(s in (message["content"] or "") for s in stop)
        calls_seen += len(calls)
    assert calls_seen or choice == "auto"  # the stop strings let calls through


NODE = {"type": "object", "properties": {"k": {"$ref": "#/$defs/n"}}, "required": ["k"]}
RECURSIVE = {"$defs": {"n": NODE}, "$ref": "#/$defs/n"}  # no output ends: found only late


@pytest.mark.parametrize("stream", [False, True])
def test_a_grammar_that_breaks_while_generating_is_the_requests_400(
    client: TestClient, stream: bool
) -> None:
    """It was a 500 with the library's state dump, counted as an engine failure: three
    such requests in a row turned /health into a 503."""
    tool_ = {"type": "function", "function": {"name": "f", "parameters": RECURSIVE}}
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": RECURSIVE}}
    for fields in [{"response_format": fmt}, {"tools": [tool_], "tool_choice": "required"}] * 2:
        body = chat_body(temperature=0, max_tokens=40, stream=stream, **fields)
        r = client.post("/v1/chat/completions", json=body)
        error = sse_events(r.text)[-1]["error"] if stream else r.json()["error"]
        assert r.status_code == (200 if stream else 400), r.text
        assert error["code"] == "grammar_failed" and "\n" not in error["message"], error
        assert error["param"] == next(iter(fields)), error
    assert client.get("/health").status_code == 200


ANCHORED = {  # "#digit" names a subschema by its $anchor, not by a JSON pointer
    "$defs": {"d": {"$anchor": "digit", "type": "integer", "minimum": 0, "maximum": 9}},
    "type": "object", "properties": {"a": {"$ref": "#digit"}}, "required": ["a"],
}  # fmt: skip
OWN_ID = {  # refs inside a schema with its own $id resolve against that schema
    "$id": "urn:bitserve:params",
    "$defs": {"d": {"enum": [1, 2]}},
    "type": "object", "properties": {"a": {"$ref": "#/$defs/d"}}, "required": ["a"],
}  # fmt: skip


@pytest.mark.parametrize("parameters", [ANCHORED, OWN_ID])
def test_tool_parameters_with_anchors_or_their_own_id(
    client: TestClient, parameters: dict[str, Any]
) -> None:
    """Both worked as a response_format schema, and were a 400 (a pointer into nowhere)
    as a tool's parameters: its refs were moved under the call schema's $defs."""
    tool_ = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    data = post(client, tools=[tool_], tool_choice="required", temperature=1, seed=1, n=3,
                parallel_tool_calls=False, max_tokens=40)  # fmt: skip
    for choice in data["choices"]:
        assert choice["finish_reason"] == "tool_calls", choice
        (call,) = choice["message"]["tool_calls"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), parameters)


@pytest.mark.parametrize("parameters", [{}, {"properties": {"a": {"enum": [1]}}}])
def test_call_arguments_are_an_object_whatever_the_parameters_say(
    client: TestClient, parameters: dict[str, Any]
) -> None:
    """`parameters: {}` (a function without arguments) gave arguments such as
    "-3202112018631", and a schema without a type gave "true": OpenAI's clients read
    arguments as an object."""
    tool_ = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    data = post(client, tools=[tool_], tool_choice="required", temperature=1.5, seed=2, n=4,
                parallel_tool_calls=False, max_tokens=40)  # fmt: skip
    for choice in data["choices"]:
        (call,) = choice["message"]["tool_calls"]
        assert call["function"]["arguments"].startswith("{"), call
    string_tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
    r = client.post("/v1/chat/completions", json=chat_body(tools=[string_tool]))
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text
    assert "tools[0].function.parameters" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/chat/completions", "json_schema", {"type": "object"}),  # llama-server's
        ("/v1/chat/completions", "grammar", 'root ::= "a"'),
        ("/v1/chat/completions", "guided_json", {"type": "object"}),  # vLLM's
        ("/v1/completions", "response_format", {"type": "json_object"}),
        ("/v1/completions", "json_schema", {"type": "object"}),
        ("/v1/completions", "tools", [SMALL_TOOL]),
        ("/v1/completions", "guided_regex", "a+"),
    ],
)
def test_structured_fields_a_route_does_not_take_are_a_400(
    client: TestClient, path: str, field: str, value: Any
) -> None:
    """Each was ignored: the reply was unconstrained text, as if nothing had been asked."""
    body = {"model": "bitnet", "max_tokens": 4, field: value}
    body |= {"prompt": "x"} if path == "/v1/completions" else {"messages": chat_body()["messages"]}
    r = client.post(path, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    body[field] = "" if field == "grammar" else None  # llama.cpp's "no grammar"
    assert client.post(path, json=body).status_code == 200


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("grammar", 'root ::= "a"{2,1}', "the most is fewer than the least"),
        ("json_schema", {"type": "string", "pattern": "[z-a]"}, "invalid character class"),
    ],
)
def test_a_refused_grammar_is_one_line(
    client: TestClient, field: str, value: Any, reason: str
) -> None:
    """The library's reason came with a listing of the converted grammar (which the
    client never wrote) or of the regex, over several lines."""
    r = client.post("/completion", json={"prompt": "x", field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    message = r.json()["error"]["message"]
    assert "\n" not in message and reason in message, message
