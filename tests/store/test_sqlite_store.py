"""SQLiteStore: ids, ownership, paging, atomic turns, persistence and the schema version."""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bitserve.store import (
    ConversationNotFoundError,
    InvalidTextError,
    NewMessage,
    SQLiteStore,
    StorageFullError,
    StoreError,
)
from bitserve.store.sqlite import SCHEMA_V1, SCHEMA_VERSION


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "conv.db")
    yield s
    s.close()


def test_ids_have_the_guide_form_and_are_unique(store: SQLiteStore) -> None:
    ids = [store.create("").id for _ in range(5)]
    assert all(re.fullmatch(r"conv_\d{13}_\d+", i) for i in ids)
    assert len(set(ids)) == 5
    assert ids[0].endswith("_0")


def test_numbers_are_never_reused_after_delete(store: SQLiteStore) -> None:
    a = store.create("")
    store.delete("", a.id)
    b = store.create("")
    assert a.id.rsplit("_", 1)[1] != b.id.rsplit("_", 1)[1]


def test_initial_messages_and_turns_are_ordered(store: SQLiteStore) -> None:
    conv = store.create("k", {"title": "t"}, [NewMessage("system", "be brief", tokens=3)])
    assert conv.metadata == {"title": "t"} and conv.num_messages == 1
    store.append_turn(
        "k",
        conv.id,
        [NewMessage("user", "hi", 1), NewMessage("assistant", "hello", 2, 10, 2, "stop")],
    )
    msgs = store.messages("k", conv.id)
    assert [(m.index, m.role, m.content) for m in msgs] == [
        (0, "system", "be brief"),
        (1, "user", "hi"),
        (2, "assistant", "hello"),
    ]
    assert msgs[2].prompt_tokens == 10 and msgs[2].finish_reason == "stop"
    assert store.get("k", conv.id).num_messages == 3


def test_read_gives_the_row_and_its_messages(store: SQLiteStore) -> None:
    conv = store.create("k", None, [NewMessage("system", "s")])
    store.append_turn("k", conv.id, [NewMessage("user", "u"), NewMessage("assistant", "a")])
    row, msgs = store.read("k", conv.id)
    assert row.id == conv.id and row.num_messages == 3
    assert (
        [m.content for m in msgs]
        == ["s", "u", "a"]
        == [m.content for m in store.messages("k", conv.id)]
    )


def test_other_owners_see_nothing(store: SQLiteStore) -> None:
    conv = store.create("alice")
    for call in (
        lambda: store.get("bob", conv.id),
        lambda: store.messages("bob", conv.id),
        lambda: store.read("bob", conv.id),
        lambda: store.append_turn("bob", conv.id, [NewMessage("user", "x")]),
        lambda: store.update_metadata("bob", conv.id, {}),
        lambda: store.delete("bob", conv.id),
    ):
        with pytest.raises(ConversationNotFoundError):
            call()
    assert store.list_conversations("bob").conversations == []
    assert store.get("alice", conv.id).id == conv.id


def test_listing_is_newest_first_and_paged(store: SQLiteStore) -> None:
    ids = [store.create("").id for _ in range(5)]
    first = store.list_conversations("", limit=2)
    assert [c.id for c in first.conversations] == ids[::-1][:2] and first.has_more
    rest = store.list_conversations("", limit=10, after=first.conversations[-1].id)
    assert [c.id for c in rest.conversations] == ids[::-1][2:] and not rest.has_more


def test_metadata_update_replaces(store: SQLiteStore) -> None:
    conv = store.create("", {"a": "1"})
    assert store.update_metadata("", conv.id, {"title": "x"}).metadata == {"title": "x"}


def test_delete_removes_messages(store: SQLiteStore, tmp_path: Path) -> None:
    conv = store.create("", None, [NewMessage("user", "hi")])
    store.delete("", conv.id)
    with pytest.raises(ConversationNotFoundError):
        store.get("", conv.id)
    rows = sqlite3.connect(tmp_path / "conv.db").execute("SELECT COUNT(*) FROM messages")
    assert rows.fetchone()[0] == 0


def test_a_failing_turn_writes_nothing(store: SQLiteStore) -> None:
    conv = store.create("")
    bad = NewMessage("user", None)  # type: ignore[arg-type]  # NOT NULL violation
    with pytest.raises(sqlite3.IntegrityError):
        store.append_turn("", conv.id, [NewMessage("user", "kept?"), bad])
    assert store.messages("", conv.id) == []


def test_persists_across_reopen_with_wal_and_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    s = SQLiteStore(path)
    conv = s.create("", {"title": "keep"}, [NewMessage("user", "remember me")])
    s.close()
    s2 = SQLiteStore(path)
    assert s2.get("", conv.id).metadata == {"title": "keep"}
    assert s2.messages("", conv.id)[0].content == "remember me"
    assert s2.schema_version() == SCHEMA_VERSION == 2
    s2.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "n.db"
    SQLiteStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(StoreError, match="newer"):
        SQLiteStore(path)


def test_concurrent_turns_from_threads_are_all_kept(store: SQLiteStore) -> None:
    conv = store.create("")

    def worker(n: int) -> None:
        for i in range(10):
            store.append_turn(
                "", conv.id, [NewMessage("user", f"{n}-{i}"), NewMessage("assistant", "ok")]
            )

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    msgs = store.messages("", conv.id)
    assert len(msgs) == 80
    assert [m.index for m in msgs] == list(range(80))
    # turns never interleave: every user message is followed by its reply
    assert all(msgs[i].role == "user" and msgs[i + 1].role == "assistant" for i in range(0, 80, 2))


def test_reply_token_ids_round_trip(store: SQLiteStore, tmp_path: Path) -> None:
    conv = store.create("", messages=[NewMessage("system", "be brief")])
    ids = (0, 7, 128009, 2**32 - 1)
    appended = store.append_turn(
        "", conv.id, [NewMessage("user", "hi"), NewMessage("assistant", "yo", token_ids=ids)]
    )
    assert [m.token_ids for m in appended] == [None, ids]
    store.append_turn("", conv.id, [NewMessage("assistant", "", token_ids=())])
    assert [m.token_ids for m in store.messages("", conv.id)] == [None, None, ids, ()]


def write_v1_database(path: Path) -> None:
    """A file as bitserve 0.x (schema 1) left it: one conversation with a turn."""
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_V1)
    db.execute("INSERT INTO schema_version (version) VALUES (1)")
    db.execute("INSERT INTO conversations VALUES (1, 'conv_1700000000000_0', 'k', 1.0, '{}')")
    db.execute("INSERT INTO messages VALUES (1, 0, 'user', 'old q', 2.0, 2, NULL, NULL, NULL)")
    db.execute("INSERT INTO messages VALUES (1, 1, 'assistant', 'old a', 3.0, 2, 9, 2, 'stop')")
    db.commit()
    db.close()


def test_migrates_a_version_1_database(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    write_v1_database(path)
    store = SQLiteStore(path)
    assert store.schema_version() == SCHEMA_VERSION
    old = store.messages("k", "conv_1700000000000_0")
    assert [(m.content, m.token_ids, m.finish_reason) for m in old] == [
        ("old q", None, None),
        ("old a", None, "stop"),
    ]
    store.append_turn(
        "k", "conv_1700000000000_0", [NewMessage("assistant", "new", token_ids=(5, 6))]
    )
    store.close()
    reopened = SQLiteStore(path)  # migrating again is a no-op
    assert reopened.schema_version() == SCHEMA_VERSION
    assert [m.token_ids for m in reopened.messages("k", "conv_1700000000000_0")] == [
        None,
        None,
        (5, 6),
    ]
    reopened.close()
    fresh = tmp_path / "fresh.db"
    SQLiteStore(fresh).close()
    assert table_sql(fresh) == table_sql(path)  # a migrated file is a fresh one


def table_sql(path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall()
    return [(str(name), str(sql)) for name, sql in rows]


def fill_to_the_limit(store: SQLiteStore) -> None:
    """Cap the file at its current size (SQLite's own "database or disk is full", the
    error a full disk gives), so the next write that needs a page fails."""
    with store._lock:
        (pages,) = store._db.execute("PRAGMA page_count").fetchone()
        store._db.execute(f"PRAGMA max_page_count = {pages}")


def test_a_full_store_refuses_writes_whole_and_keeps_serving_reads(store: SQLiteStore) -> None:
    conv = store.create("k", {"title": "kept"}, [NewMessage("system", "be brief", 2)])
    store.append_turn("k", conv.id, [NewMessage("user", "hi"), NewMessage("assistant", "hey")])
    fill_to_the_limit(store)
    big = "x" * 200_000
    with pytest.raises(StorageFullError, match="full"):
        store.append_turn("k", conv.id, [NewMessage("user", big), NewMessage("assistant", "a")])
    with pytest.raises(StorageFullError):
        store.create("k", None, [NewMessage("system", big)])
    # nothing half-written, nothing lost, reads work, and the store still writes once
    # there is room again
    assert [m.content for m in store.messages("k", conv.id)] == ["be brief", "hi", "hey"]
    assert [c.id for c in store.list_conversations("k").conversations] == [conv.id]
    with store._lock:
        store._db.execute("PRAGMA max_page_count = 1073741823")
    store.append_turn("k", conv.id, [NewMessage("user", big), NewMessage("assistant", "a")])
    assert store.get("k", conv.id).num_messages == 5


def test_text_that_is_not_unicode_is_refused_and_old_rows_stay_readable(
    store: SQLiteStore,
) -> None:
    for call in (
        lambda: store.create("k", {"title": "\ud800"}),
        lambda: store.create("k", {"\udfff": "v"}),
        lambda: store.create("k", None, [NewMessage("system", "a\ud800b")]),
    ):
        with pytest.raises(InvalidTextError):
            call()
    conv = store.create("k")
    with pytest.raises(InvalidTextError, match=r"messages\[1\]"):
        store.append_turn(
            "k", conv.id, [NewMessage("user", "ok"), NewMessage("assistant", "\udc80")]
        )
    with pytest.raises(InvalidTextError, match="metadata"):
        store.update_metadata("k", conv.id, {"t": "\ud83d"})
    assert store.get("k", conv.id).num_messages == 0
    # a row written before the store refused such text (json.dumps escapes it as \ud800)
    with store._lock:
        store._db.execute(
            "UPDATE conversations SET metadata = ? WHERE id = ?",
            ('{"title": "a\\ud800b"}', conv.id),
        )
    assert store.list_conversations("k").conversations[0].metadata == {"title": "a\ufffdb"}
