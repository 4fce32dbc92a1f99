"""Every error case of issue 4 point 7, in-process: OpenAI's error shape, 422 for malformed
or ill-typed input naming the field, 400 + param for out-of-range values, 404, 401."""

from __future__ import annotations

from typing import Any

import pytest
from api_helpers import AppFactory, chat_body
from fastapi.testclient import TestClient


def error_of(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return err  # type: ignore[no-any-return]


def test_malformed_json_is_422(client: TestClient) -> None:
    r = client.post(
        "/v1/chat/completions",
        content=b'{"model": "bitnet", "messages": [',
        headers={"content-type": "application/json"},
    )
    err = error_of(r, 422)
    assert "JSON" in err["message"]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"model": "bitnet", "messages": [{"role": "user", "content": "\xff"}]}', "utf-8"),
        (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/conversations", "/completion"])
def test_a_body_json_cannot_decode_is_the_same_422(
    client: TestClient, body: bytes, says: str, path: str
) -> None:
    """Not UTF-8, or nested past Python's limit: FastAPI's bare 400 "There was an error
    parsing the body" (code null) became the documented malformed-JSON 422."""
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    err = error_of(r, 422)
    assert err["code"] == "invalid_value" and says in err["message"]


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"messages": None}, "messages"),
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"stream": "perhaps"}, "stream"),
    ],
)
def test_missing_or_ill_typed_fields_are_422_naming_the_field(
    client: TestClient, patch: dict[str, Any], param: str
) -> None:
    body = {k: v for k, v in {**chat_body(), **patch}.items() if v is not None}
    err = error_of(client.post("/v1/chat/completions", json=body), 422)
    assert err["param"] == param and param in err["message"]


def test_missing_model_is_422(client: TestClient) -> None:
    body = chat_body()
    del body["model"]
    assert error_of(client.post("/v1/chat/completions", json=body), 422)["param"] == "model"


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repeat_penalty": 0}, "repeat_penalty"),
        ({"min_p": 2}, "min_p"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 500}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"messages": []}, "messages"),
    ],
)
def test_out_of_range_values_are_400_with_param(
    client: TestClient, patch: dict[str, Any], param: str
) -> None:
    err = error_of(client.post("/v1/chat/completions", json=chat_body(**patch)), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_prompt_longer_than_context_is_400_with_numbers(make_client: AppFactory) -> None:
    with make_client(ctx_size=64) as client:
        body = chat_body("word " * 200)
        err = error_of(client.post("/v1/chat/completions", json=body), 400)
        assert err["code"] == "context_length_exceeded"
        assert "64" in err["message"]
        r = client.post("/completion", json={"prompt": "word " * 200})
        assert error_of(r, 400)["code"] == "context_length_exceeded"
        r = client.post("/v1/completions", json={"model": "bitnet", "prompt": "word " * 200})
        assert error_of(r, 400)["code"] == "context_length_exceeded"


def test_unknown_model_and_conversation_and_route_are_404(client: TestClient) -> None:
    err = error_of(client.post("/v1/chat/completions", json=chat_body(model="gpt-9")), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    err = error_of(client.get("/v1/conversations/conv_1_999"), 404)
    assert err["code"] == "conversation_not_found"
    error_of(client.post("/v1/conversations/conv_1_999/chat", json=chat_body()), 404)
    error_of(client.get("/no/such/route"), 404)


def test_unknown_oracle_route_is_404(make_client: AppFactory) -> None:
    with make_client(api_keys=("k",)) as client:
        headers = {"Authorization": "Bearer k"}
        err = error_of(client.post("/oracle/v1/99/chat", json=chat_body(), headers=headers), 404)
        assert err["code"] == "route_not_found"


def test_missing_or_bad_key_is_401_everywhere_but_health(make_client: AppFactory) -> None:
    with make_client(api_keys=("secret",)) as client:
        assert client.get("/health").status_code == 200
        for method, path in [
            ("POST", "/v1/chat/completions"),
            ("GET", "/v1/models"),
            ("POST", "/v1/conversations"),
            ("GET", "/v1/conversations"),
            ("POST", "/completion"),
            ("POST", "/v1/completions"),
            ("POST", "/tokenize"),
            ("POST", "/oracle/v1/1/chat"),
            ("GET", "/metrics"),
        ]:
            err = error_of(client.request(method, path, json=chat_body()), 401)
            assert err["code"] == "invalid_api_key"
            bad = {"Authorization": "Bearer wrong"}
            error_of(client.request(method, path, json=chat_body(), headers=bad), 401)
        ok = {"Authorization": "Bearer secret"}
        assert client.get("/v1/models", headers=ok).status_code == 200
        assert (
            client.get("/v1/models", headers={"Authorization": "Basic secret"}).status_code == 401
        )


def test_wrong_method_is_an_openai_shaped_405(client: TestClient) -> None:
    error_of(client.get("/v1/chat/completions"), 405)


TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
BAD_SCHEMA = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}


@pytest.mark.parametrize(
    ("patch", "param", "says"),
    [
        ({"response_format": {"type": "yaml"}}, "response_format", "type must be one of"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format",
         "needs"),
        ({"response_format": BAD_SCHEMA}, "response_format", "objekt"),
        ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools",
         "letters"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"$ref": "#/missing"}}}}}]}, "tools",
         "missing"),
        ({"functions": [TOOL["function"]]}, "functions", "not supported"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "x"}}},
         "tool_choice", "no tool named 'x'"),
        ({"function_call": {"name": "weather"}}, "function_call", "not supported"),
        ({"modalities": ["text", "audio"]}, "modalities", "only text"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "not supported"),
        ({"web_search_options": {}}, "web_search_options", "not supported"),
    ],
)  # fmt: skip
def test_invalid_structured_output_and_tools_are_400s(
    client: TestClient, patch: dict[str, Any], param: str, says: str
) -> None:
    """A request the server cannot honour is refused, never answered with plain text."""
    err = error_of(client.post("/v1/chat/completions", json=chat_body(**patch)), 400)
    assert err["param"] == param and says in err["message"]
    conv = client.post("/v1/conversations").json()["id"]
    err = error_of(client.post(f"/v1/conversations/{conv}/chat", json=chat_body(**patch)), 400)
    assert err["param"] == param
    assert client.get(f"/v1/conversations/{conv}").json()["messages"] == []  # nothing stored


@pytest.mark.parametrize(
    "patch",
    [
        {"response_format": {"type": "text"}},
        {"tools": []},
        {"tool_choice": "none"},
        {"tool_choice": "auto"},
        {"function_call": "none"},
        {"modalities": ["text"]},
        {"audio": None, "web_search_options": None},
    ],
)
def test_what_asks_for_nothing_unsupported_is_answered(
    client: TestClient, patch: dict[str, Any]
) -> None:
    r = client.post("/v1/chat/completions", json=chat_body(**patch))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None


def test_cors_headers_only_for_configured_origins(make_client: AppFactory) -> None:
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    with make_client(cors_origins=("https://app.example",), api_keys=("k",)) as client:
        answer = client.options("/v1/chat/completions", headers=preflight)
        assert answer.status_code == 200  # the preflight needs no key
        assert answer.headers["access-control-allow-origin"] == "https://app.example"
        got = client.get(
            "/v1/models", headers={"Origin": "https://app.example", "Authorization": "Bearer k"}
        )
        assert got.headers["access-control-allow-origin"] == "https://app.example"
        other = client.get(
            "/v1/models", headers={"Origin": "https://evil.example", "Authorization": "Bearer k"}
        )
        assert "access-control-allow-origin" not in other.headers
        refused = client.options(
            "/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"}
        )  # the API's error shape, as every error (it was plain text)
        err = error_of(refused, 400)
        assert err["message"] == "CORS preflight refused: Disallowed CORS origin"
    with make_client() as client:
        answer = client.options("/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in answer.headers


NULLABLE_BY_OPENAI = ("temperature", "top_p", "n", "stream", "logprobs", "presence_penalty",
                      "frequency_penalty", "top_logprobs", "stop", "seed", "max_tokens",
                      "stream_options", "user")  # fmt: skip


def test_explicit_null_means_the_default_on_every_route(make_client: AppFactory) -> None:
    nulls = dict.fromkeys(NULLABLE_BY_OPENAI)
    with make_client(api_keys=("k",)) as client:
        auth = {"Authorization": "Bearer k"}
        for path, body in (
            ("/v1/chat/completions", {**chat_body(), **nulls}),
            ("/oracle/v1/1/chat", {**chat_body(), **nulls}),
            ("/v1/completions", {"model": "bitnet", "prompt": "Hi", **nulls, "echo": None}),
            ("/completion", {"prompt": "Hi", "n_predict": 4, **nulls, "n_probs": None}),
            ("/tokenize", {"content": "Hi", "add_special": None, "with_pieces": None}),
        ):
            answer = client.post(path, json=body, headers=auth)
            assert answer.status_code == 200, (path, answer.text)
        conv = client.post("/v1/conversations", json={"metadata": None}, headers=auth).json()
        answer = client.post(
            f"/v1/conversations/{conv['id']}/chat", json={**chat_body(), **nulls}, headers=auth
        )
        assert answer.status_code == 200, answer.text
        # required fields stay required
        answer = client.post("/v1/chat/completions", json={**chat_body(), "messages": None},
                             headers=auth)  # fmt: skip
        assert answer.status_code == 422


def test_token_ids_are_integers_not_booleans(client: TestClient) -> None:
    for path, body in (
        ("/detokenize", {"tokens": [False]}),
        ("/detokenize", {"tokens": ["5"]}),
        ("/v1/completions", {"model": "bitnet", "prompt": [True, 5]}),
        ("/completion", {"prompt": [True]}),
    ):
        answer = client.post(path, json=body)
        assert answer.status_code == 422, (path, answer.text)
    assert client.post("/detokenize", json={"tokens": [5]}).status_code == 200


def test_the_prefix_cache_is_never_shared_between_keys(make_client: AppFactory) -> None:
    system = {"role": "system", "content": "You are the assistant of a secret project. " * 8}

    def cached(key: str, question: str) -> int:
        body = {
            **chat_body(question, max_tokens=2),
            "messages": [system, {"role": "user", "content": question}],
        }
        answer = client.post(
            "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        )
        assert answer.status_code == 200, answer.text
        return int(answer.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

    with make_client(api_keys=("key-a", "key-b")) as client:
        assert cached("key-a", "first") == 0
        assert cached("key-a", "second") > 50  # a key reuses its own system prompt
        assert cached("key-b", "third") == 0  # and never another key's
        assert cached("key-b", "fourth") > 50
        for path, body, field in (
            ("/completion", {"prompt": "One. " + system["content"], "n_predict": 1},
             "tokens_cached"),
            ("/v1/completions", {"model": "bitnet", "prompt": "Two. " + system["content"],
                                 "max_tokens": 1}, "usage"),
        ):  # fmt: skip
            answers = [
                client.post(path, json=body, headers={"Authorization": f"Bearer {key}"}).json()
                for key in ("key-a", "key-a", "key-b")
            ]
            hits = [
                a[field]
                if field == "tokens_cached"
                else a[field]["prompt_tokens_details"]["cached_tokens"]
                for a in answers
            ]
            # key-a's second request reuses its first; key-b finds at most the BOS of its
            # own chats, never key-a's prompt
            assert hits[1] > 50 and hits[2] <= 1, (path, hits)


def test_a_405_lists_every_method_of_the_path(client: TestClient) -> None:
    conv = client.post("/v1/conversations").json()["id"]
    answer = client.put(f"/v1/conversations/{conv}")
    assert answer.status_code == 405
    allowed = {m.strip() for m in answer.headers["allow"].split(",")}
    assert allowed == {"GET", "HEAD", "POST", "PATCH", "DELETE"}
    assert client.get("/v1/chat/completions").headers["allow"] == "POST"
