"""The conversation API in-process: ids and fields, history reaching the model, atomic
turns, listing, metadata, deletion, key isolation, truncation."""

from __future__ import annotations

import re
from pathlib import Path

from api_helpers import AppFactory, chat_body, sse_events
from fastapi.testclient import TestClient


def new_conversation(client: TestClient, **body: object) -> str:
    r = client.post("/v1/conversations", json=body or None)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["id"] == data["conversation_id"] and data["object"] == "conversation"
    assert re.fullmatch(r"conv_\d{13}_\d+", data["id"])
    return str(data["id"])


def test_create_with_metadata_and_system_prompt(client: TestClient) -> None:
    r = client.post(
        "/v1/conversations",
        json={"metadata": {"title": "t"}, "messages": [{"role": "system", "content": "Be brief."}]},
    )
    data = r.json()
    assert data["metadata"] == {"title": "t"} and isinstance(data["created_at"], int)
    got = client.get(f"/v1/conversations/{data['id']}").json()
    assert [(m["role"], m["content"]) for m in got["messages"]] == [("system", "Be brief.")]
    assert got["messages"][0]["tokens"] > 0


def test_create_with_openai_items(client: TestClient) -> None:
    items = [
        {"type": "message", "role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]},
    ]
    conv = client.post("/v1/conversations", json={"items": items}).json()["id"]
    got = client.get(f"/v1/conversations/{conv}").json()
    assert [(m["role"], m["content"]) for m in got["messages"]] == [
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", "Hello"),
    ]
    both = client.post("/v1/conversations", json={"items": items, "messages": items[:1]})
    assert both.status_code == 400 and both.json()["error"]["param"] == "items"
    call = {"type": "function_call", "name": "f", "arguments": "{}", "call_id": "c"}
    assert client.post("/v1/conversations", json={"items": [call]}).status_code == 422


def test_history_reaches_the_model(client: TestClient) -> None:
    conv = new_conversation(client)
    first = client.post(f"/v1/conversations/{conv}/chat", json=chat_body("Hello, how are you?"))
    assert first.status_code == 200, first.text
    one = first.json()
    assert one["conversation_id"] == conv and one["truncated_messages"] == 0
    reply = one["choices"][0]["message"]["content"]
    second = client.post(
        f"/v1/conversations/{conv}/chat", json=chat_body("What did I just ask you?")
    ).json()
    # the second prompt holds the first turn: its size is the first prompt, the reply and
    # the new message (the stored prompt shows the first turn's text)
    assert second["usage"]["prompt_tokens"] > one["usage"]["prompt_tokens"] + 5
    prompt = client.get(f"/v1/conversations/{conv}/prompt").json()
    assert "Hello, how are you?" in prompt["prompt"] and reply.strip() in prompt["prompt"]
    assert "What did I just ask you?" in prompt["prompt"]
    stored = client.get(f"/v1/conversations/{conv}").json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
    assert stored[1]["content"] == reply
    assert stored[3]["prompt_tokens"] == second["usage"]["prompt_tokens"]
    assert stored[3]["completion_tokens"] == second["usage"]["completion_tokens"]


def test_streaming_chat_stores_what_was_streamed(client: TestClient) -> None:
    conv = new_conversation(client)
    body = chat_body(stream=True, max_tokens=6)
    events = sse_events(client.post(f"/v1/conversations/{conv}/chat", json=body).text)
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    stored = client.get(f"/v1/conversations/{conv}").json()["messages"]
    assert stored[-1]["role"] == "assistant" and stored[-1]["content"] == text


def test_a_failed_turn_stores_nothing(client: TestClient) -> None:
    conv = new_conversation(client)
    r = client.post(f"/v1/conversations/{conv}/chat", json=chat_body(temperature=9))
    assert r.status_code == 400
    assert client.get(f"/v1/conversations/{conv}").json()["messages"] == []


def test_list_is_newest_first_and_paged(client: TestClient) -> None:
    ids = [new_conversation(client) for _ in range(3)]
    page = client.get("/v1/conversations", params={"limit": 2}).json()
    assert page["object"] == "list" and [c["id"] for c in page["data"]] == ids[::-1][:2]
    assert page["has_more"] and page["first_id"] == ids[2] and page["last_id"] == ids[1]
    rest = client.get("/v1/conversations", params={"limit": 2, "after": page["last_id"]}).json()
    assert [c["id"] for c in rest["data"]] == [ids[0]] and not rest["has_more"]
    assert client.get("/v1/conversations", params={"limit": 0}).status_code == 400


def test_update_metadata_and_delete(client: TestClient) -> None:
    conv = new_conversation(client)
    r = client.post(f"/v1/conversations/{conv}", json={"metadata": {"title": "Trip"}})
    assert r.json()["metadata"] == {"title": "Trip"}
    r = client.patch(f"/v1/conversations/{conv}", json={"metadata": {"title": "Trip 2"}})
    assert client.get(f"/v1/conversations/{conv}").json()["metadata"] == {"title": "Trip 2"}
    too_many = {str(i): "x" for i in range(17)}
    r = client.post(f"/v1/conversations/{conv}", json={"metadata": too_many})
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata"
    r = client.delete(f"/v1/conversations/{conv}")
    assert r.json() == {"id": conv, "object": "conversation.deleted", "deleted": True}
    assert client.get(f"/v1/conversations/{conv}").status_code == 404


def test_conversations_belong_to_their_key(make_client: AppFactory) -> None:
    alice = {"Authorization": "Bearer alice-key"}
    bob = {"Authorization": "Bearer bob-key"}
    with make_client(api_keys=("alice-key", "bob-key")) as client:
        conv = client.post("/v1/conversations", headers=alice).json()["id"]
        assert client.get(f"/v1/conversations/{conv}", headers=alice).status_code == 200
        for method, path in [
            ("GET", f"/v1/conversations/{conv}"),
            ("POST", f"/v1/conversations/{conv}/chat"),
            ("DELETE", f"/v1/conversations/{conv}"),
            ("GET", f"/v1/conversations/{conv}/prompt"),
        ]:
            r = client.request(method, path, headers=bob, json=chat_body())
            assert r.status_code == 404, (method, path)
        assert client.get("/v1/conversations", headers=bob).json()["data"] == []
        assert len(client.get("/v1/conversations", headers=alice).json()["data"]) == 1


def test_overlong_history_drops_oldest_turns_but_keeps_the_system_prompt(
    make_client: AppFactory,
) -> None:
    with make_client(ctx_size=160) as client:
        system = {"role": "system", "content": "You are a terse assistant."}
        conv = client.post("/v1/conversations", json={"messages": [system]}).json()["id"]
        truncated = []
        for i in range(8):
            body = chat_body(f"message number {i}: " + "tell me more " * 4, max_tokens=16)
            r = client.post(f"/v1/conversations/{conv}/chat", json=body)
            assert r.status_code == 200, r.text
            truncated.append(r.json()["truncated_messages"])
            assert r.json()["usage"]["prompt_tokens"] + 16 <= 160
        assert truncated[0] == 0 and truncated[-1] > 0
        assert all(n % 2 == 0 for n in truncated)  # whole turns only
        stored = client.get(f"/v1/conversations/{conv}").json()["messages"]
        assert len(stored) == 1 + 2 * 8  # dropped from the prompt, never from the store
        prompt = client.get(f"/v1/conversations/{conv}/prompt").json()
        assert "terse assistant" in prompt["prompt"]


def test_new_message_alone_too_long_is_400(make_client: AppFactory) -> None:
    with make_client(ctx_size=64) as client:
        conv = client.post("/v1/conversations").json()["id"]
        r = client.post(f"/v1/conversations/{conv}/chat", json=chat_body("word " * 200))
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_n_above_one_is_refused_for_conversations(client: TestClient) -> None:
    conv = new_conversation(client)
    r = client.post(f"/v1/conversations/{conv}/chat", json=chat_body(n=2))
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_conversations_survive_a_new_app_on_the_same_file(
    make_client: AppFactory, tmp_path: Path
) -> None:
    db = tmp_path / "persist.db"
    with make_client(db=db) as client:
        conv = new_conversation(client, metadata={"title": "keep"})
        client.post(f"/v1/conversations/{conv}/chat", json=chat_body())
    with make_client(db=db) as client:
        got = client.get(f"/v1/conversations/{conv}").json()
        assert got["metadata"] == {"title": "keep"} and len(got["messages"]) == 2
