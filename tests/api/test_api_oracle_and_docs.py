"""Oracle routes (route defaults, aliases, reply keys), /v1/models, /health, /metrics and
the OpenAPI description of every route."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_helpers import AppFactory, chat_body, sse_events
from fastapi.testclient import TestClient

from bitserve.api.oracle.config import OracleConfig, OracleConfigError

NEMOTRON = "nvidia/Llama-3.1-Nemotron-70B-Instruct-HF"
ORACLE_KEY = "oracle-key"


@pytest.fixture
def oracle(make_client: AppFactory) -> Iterator[TestClient]:
    """A client of a server with a key, sending it: the oracle routes always need one."""
    with make_client(api_keys=(ORACLE_KEY,)) as c:
        c.headers["Authorization"] = f"Bearer {ORACLE_KEY}"
        yield c


def test_oracle_routes_need_a_key_even_on_an_open_server(client: TestClient) -> None:
    body = chat_body(model="llama-3", stream=False)
    for path in ("/oracle/v1/1/chat", "/oracle/v1/1/chat/completions"):
        r = client.post(path, json=body)
        assert r.status_code == 401
        assert "--api-key" in r.json()["error"]["message"]
    assert client.post("/v1/chat/completions", json=chat_body(stream=False)).status_code == 200


def test_oracle_routes_refuse_a_wrong_key(oracle: TestClient) -> None:
    body = chat_body(model="llama-3", stream=False)
    r = oracle.post("/oracle/v1/1/chat", json=body, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    r = oracle.post("/oracle/v1/1/chat", json=body, headers={"Authorization": ""})
    assert r.status_code == 401


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        (f"bearer {ORACLE_KEY}", 200),  # the scheme in any case (RFC 7235)
        (f"BEARER  {ORACLE_KEY}", 200),
        (f"Basic {ORACLE_KEY}", 401),
        (ORACLE_KEY, 401),
        ("Bearer", 401),
        (f"Bearer {ORACLE_KEY[:-1]}", 401),  # a prefix of the key
        (f"Bearer {ORACLE_KEY}x", 401),
        (f"Bearer {ORACLE_KEY} {ORACLE_KEY}", 401),
        (f"Bearer\t{ORACLE_KEY}", 401),
        (f"Bearer {ORACLE_KEY}é".encode(), 401),  # raw UTF-8 bytes, as curl sends them
        (b"Bearer \xff\xfe", 401),
    ],
)
def test_oracle_authorization_headers(
    oracle: TestClient, authorization: str | bytes, status: int
) -> None:
    body = chat_body(model="llama-3", stream=False, max_tokens=1)
    r = oracle.post("/oracle/v1/1/chat", json=body, headers={"Authorization": authorization})
    assert r.status_code == status, r.text
    if status == 401:
        assert r.headers["WWW-Authenticate"] == "Bearer"
        assert ORACLE_KEY not in r.text  # nothing sent is echoed back


def test_oracle_route_1_streams_by_default(oracle: TestClient) -> None:
    body = {"model": "llama-3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    r = oracle.post("/oracle/v1/1/chat", json=body)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and events[0]["model"] == "llama-3"
    assert events[0]["choices"][0]["delta"]["reasoning_content"] is None


def test_oracle_reply_keys_and_aliases(oracle: TestClient) -> None:
    for path in ("/oracle/v1/4/chat", "/oracle/v1/4/chat/completions"):
        r = oracle.post(path, json=chat_body(model=NEMOTRON, stream=False))
        assert r.status_code == 200, r.text
        data = r.json()
        message = data["choices"][0]["message"]
        assert message["reasoning_content"] is None and message["tool_calls"] == []
        assert data["usage"]["total_tokens"] > 0 and data["system_fingerprint"]
        assert data["choices"][0]["logprobs"] is None


def test_builtin_routes_have_bitminds_documented_defaults() -> None:
    route_1 = OracleConfig.builtin().routes["1"].defaults
    assert route_1["temperature"] == 0.1 and route_1["top_p"] == 1.0  # not our 0.95
    assert route_1["max_tokens"] == 500 and route_1["stream"] is True


def test_oracle_route_defaults_apply(oracle: TestClient) -> None:
    # route 1's temperature 0.1 is used unless the client sends one: out of range → 400
    body = chat_body(model="llama-3", stream=False)
    del body["temperature"]
    assert oracle.post("/oracle/v1/1/chat", json=body).status_code == 200
    r = oracle.post("/oracle/v1/1/chat", json={**body, "temperature": 7})
    assert r.status_code == 400
    r = oracle.post("/oracle/v1/1/chat", json={**body, "model": "unknown-model"})
    assert r.status_code == 404
    r = oracle.post("/oracle/v1/1/chat", json={"model": "llama-3", "messages": "nope"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "messages"


def test_oracle_config_file(make_client: AppFactory, tmp_path: Path) -> None:
    path = tmp_path / "oracle.json"
    path.write_text(json.dumps({"routes": {"fast": {"defaults": {"max_tokens": 2, "stream": False},
                                                    "aliases": ["tiny"]}}}))  # fmt: skip
    config = OracleConfig.load(path)
    assert config.routes["fast"].defaults == {"max_tokens": 2, "stream": False}
    with make_client(oracle=config, api_keys=(ORACLE_KEY,)) as client:
        client.headers["Authorization"] = f"Bearer {ORACLE_KEY}"
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
        data = client.post("/oracle/v1/fast/chat", json=body).json()
        assert data["usage"]["completion_tokens"] <= 2
        assert client.post("/oracle/v1/1/chat", json=body).status_code == 404
    path.write_text('{"routes": {"x": {"defualts": {}}}}')
    with pytest.raises(OracleConfigError, match="defualts"):
        OracleConfig.load(path)


@pytest.mark.parametrize(
    ("defaults", "says"),
    [
        ({"temperature": 5}, "routes.1.defaults: temperature: must be between 0 and 2"),
        ({"n": 100}, "routes.1.defaults: n: must be between 1 and"),
        ({"max_tokens": 0}, "routes.1.defaults: max_tokens: must be at least 1"),
        ({"bogus": 1}, "routes.1.defaults: ['bogus'] are not chat completion fields"),
        ({"top_p": "high"}, "routes.1.defaults: top_p: Input should be a valid number"),
    ],
)
def test_oracle_defaults_are_checked_when_the_config_loads(
    tmp_path: Path, defaults: dict[str, Any], says: str
) -> None:
    """A bad default made every request on its route a 400 naming a field the client never
    sent; it is refused at start instead."""
    path = tmp_path / "oracle.json"
    path.write_text(json.dumps({"routes": {"1": {"defaults": defaults}}}))
    with pytest.raises(OracleConfigError) as caught:
        OracleConfig.load(path)
    assert says in str(caught.value)


def test_a_model_named_with_slashes_is_retrieved_by_its_name(make_client: AppFactory) -> None:
    with make_client(aliases=("microsoft/bitnet-b1.58-2B-4T",)) as client:
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert "microsoft/bitnet-b1.58-2B-4T" in ids
        for path in ("microsoft/bitnet-b1.58-2B-4T", "microsoft%2Fbitnet-b1.58-2B-4T"):
            got = client.get(f"/v1/models/{path}")
            assert got.status_code == 200 and got.json()["id"] == "microsoft/bitnet-b1.58-2B-4T"
        missing = client.get("/v1/models/microsoft/other")
        assert missing.json()["error"]["code"] == "model_not_found"


def test_models_health_metrics(client: TestClient) -> None:
    models = client.get("/v1/models").json()
    ids = [m["id"] for m in models["data"]]
    assert ids == ["demo-v1", "bitnet"]  # oracle aliases work on oracle routes only
    assert models["data"][0]["meta"]["demo"] is True
    assert "path" not in models["data"][0]["meta"]  # the server's disk is not shown
    for model in ids:  # every listed id works on every route
        assert client.get(f"/v1/models/{model}").json()["id"] == model
        for path, body in (
            ("/v1/chat/completions", chat_body(model=model, max_tokens=2)),
            ("/v1/completions", {"model": model, "prompt": "Hi", "max_tokens": 2}),
            ("/v1/conversations/{conv}/chat", chat_body(model=model, max_tokens=2)),
        ):
            conv = client.post("/v1/conversations").json()["id"]
            assert client.post(path.format(conv=conv), json=body).status_code == 200, path
    missing = client.get("/v1/models/llama-3")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert client.get("/health").json()["status"] == "ok"
    client.post("/v1/chat/completions", json=chat_body(max_tokens=3))
    metrics = client.get("/metrics").text
    assert "bitserve_tokens_generated_total" in metrics
    assert "bitserve_queue_depth" in metrics


def route_paths(routes: list[Any]) -> set[str]:
    """Every path served, walking into included routers."""
    paths = set()
    for route in routes:
        if hasattr(route, "original_router"):
            paths |= route_paths(route.original_router.routes)
        elif getattr(route, "include_in_schema", False):
            paths.add(re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path))  # OpenAPI: no converter
    return paths


def test_openapi_lists_every_route_with_fields_and_defaults(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    app_paths = route_paths(client.app.routes)  # type: ignore[attr-defined]
    assert len(app_paths) == 15 and app_paths == set(spec["paths"])
    for path in (
        "/v1/chat/completions",
        "/v1/conversations/{conversation_id}/chat",
        "/completion",
        "/v1/completions",
        "/oracle/v1/{route}/chat",
        "/health",
    ):
        assert path in spec["paths"]
    props = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert props["temperature"]["default"] == 0.7 and props["top_p"]["default"] == 0.95
    assert props["top_k"]["default"] == 40 and "ignored" in props["threads"]["description"].lower()
    assert client.get("/docs").status_code == 200
