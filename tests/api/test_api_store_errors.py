"""What the store refuses reaches the client as what it is: a full disk is a 507 that
loses nothing and leaves reads working; text that is not Unicode is a 400, on every
route, before anything is tokenized or stored."""

from __future__ import annotations

import json
from typing import Any

import pytest
from api_helpers import chat_body
from fastapi.testclient import TestClient

from bitserve.store import SQLiteStore


def cap_store_at_its_size(client: TestClient) -> SQLiteStore:
    """SQLite's own "database or disk is full" (what a full disk gives) for the next
    write that needs a page."""
    store: SQLiteStore = client.app.state.store  # type: ignore[attr-defined]
    with store._lock:
        (pages,) = store._db.execute("PRAGMA page_count").fetchone()
        store._db.execute(f"PRAGMA max_page_count = {pages}")
    return store


def test_a_full_disk_is_507_and_nothing_stored_is_lost(client: TestClient) -> None:
    conv = client.post("/v1/conversations", json={"metadata": {"title": "kept"}}).json()["id"]
    assert client.post(f"/v1/conversations/{conv}/chat", json=chat_body("hi")).status_code == 200
    before = client.get(f"/v1/conversations/{conv}").json()
    cap_store_at_its_size(client)

    big = "word " * 1_500  # 7.5 kB: new pages; fits the context (checked at creation)
    created = client.post(
        "/v1/conversations", json={"messages": [{"role": "system", "content": big}]}
    )
    assert created.status_code == 507, created.text
    error = created.json()["error"]
    assert error["code"] == "storage_full" and "full" in error["message"]

    turn = client.post(f"/v1/conversations/{conv}/chat", json=chat_body(big[:2000]))
    assert turn.status_code == 507 and turn.json()["error"]["code"] == "storage_full"
    # reads keep working and show exactly what was stored before
    assert client.get(f"/v1/conversations/{conv}").json() == before
    listed = client.get("/v1/conversations").json()["data"]
    assert [c["id"] for c in listed] == [conv]
    assert client.get("/health").status_code == 200


BAD = "a\ud800b"  # a lone surrogate: legal JSON ("a\\ud800b"), not encodable as UTF-8


def post_escaped(client: TestClient, path: str, body: dict[str, Any]) -> Any:
    """POST ``body`` as JSON with every non-ASCII character escaped (as ``json.dumps``
    does by default), which is how a lone surrogate travels."""
    content = json.dumps(body).encode("ascii")
    return client.post(path, content=content, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", chat_body(BAD), "messages[0].content"),
        ("/v1/chat/completions", {**chat_body(), "model": BAD}, "model"),
        ("/v1/chat/completions", chat_body(stop=[BAD]), "stop[0]"),
        ("/v1/chat/completions", chat_body(logit_bias={BAD: 1}), "logit_bias"),
        ("/v1/completions", {"model": "bitnet", "prompt": BAD}, "prompt"),
        ("/completion", {"prompt": BAD}, "prompt"),
        ("/tokenize", {"content": BAD}, "content"),
        ("/v1/conversations", {"messages": [{"role": "system", "content": BAD}]},
         "messages[0].content"),
        ("/v1/conversations", {"metadata": {"title": BAD}}, "metadata.title"),
        ("/v1/conversations", {"metadata": {BAD: "x"}}, "metadata"),
    ],
)  # fmt: skip
def test_text_that_is_not_unicode_is_400_where_it_is(
    client: TestClient, path: str, body: dict[str, Any], param: str
) -> None:
    answer = post_escaped(client, path, body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and "Unicode" in error["message"]


def test_no_surrogate_reaches_a_conversation(client: TestClient) -> None:
    conv = client.post("/v1/conversations", json={"metadata": {"title": "ok"}}).json()["id"]
    for path, body in (
        (f"/v1/conversations/{conv}", {"metadata": {"title": BAD}}),
        (f"/v1/conversations/{conv}/chat", chat_body(BAD)),
    ):
        assert post_escaped(client, path, body).status_code == 400, path
    # listings keep working: nothing unencodable was stored
    assert client.get("/v1/conversations").status_code == 200
    listed = client.get(f"/v1/conversations/{conv}").json()
    assert listed["metadata"] == {"title": "ok"} and listed["messages"] == []
