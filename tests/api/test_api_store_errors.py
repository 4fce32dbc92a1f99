"""What the store refuses reaches the client as what it is: a full disk is a 507 that
loses nothing and leaves reads working; text that is not Unicode is a 400."""

from __future__ import annotations

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
