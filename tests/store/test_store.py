"""Every store, SQLite and PostgreSQL alike: ids, ownership, paging, atomic turns,
persistence and the schema version (each test runs once per database; a few at the end
are about one of them)."""

from __future__ import annotations

import itertools
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from bitserve.cluster.postgres import PostgresServer
from bitserve.store import (
    INTERRUPTED,
    ConversationChangedError,
    ConversationNotFoundError,
    ConversationStore,
    InvalidTextError,
    NewMessage,
    SQLiteStore,
    StorageFullError,
    StoreError,
    ToolCall,
)
from bitserve.store.postgres import PostgresStore
from bitserve.store.schema import SCHEMA_VERSION, schema_statements
from postgres_databases import new_postgres_database

Opener = Callable[[], ConversationStore]


@pytest.fixture(params=["sqlite", "postgresql"])
def new_database(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], str]:
    """Makes a new place for a store: an SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        names = (str(tmp_path / f"conv{i}.db") for i in itertools.count())
        return lambda: next(names)
    postgres: PostgresServer = request.getfixturevalue("postgres")
    return lambda: new_postgres_database(postgres)


@pytest.fixture
def database(new_database: Callable[[], str]) -> str:
    return new_database()


@pytest.fixture
def open_store(database: str) -> Iterator[Opener]:
    """Opens a store on ``database`` (again and again: a reopen is a restart); closes
    every one it opened."""
    opened: list[ConversationStore] = []

    def opener() -> ConversationStore:
        opened.append(open_at(database))
        return opened[-1]

    yield opener
    for s in opened:
        s.close()


@pytest.fixture
def store(open_store: Opener) -> ConversationStore:
    return open_store()


def open_at(database: str) -> ConversationStore:
    return PostgresStore(database) if database.startswith("postgresql") else SQLiteStore(database)


def count_rows(database: str, table: str) -> int:
    query = f"SELECT COUNT(*) FROM {table}"
    if database.startswith("postgresql"):
        with psycopg.connect(database) as db:
            row = db.execute(query).fetchone()  # type: ignore[call-overload]
    else:
        with sqlite3.connect(database) as lite:
            row = lite.execute(query).fetchone()
    return int(row[0]) if row else -1


def test_ids_have_the_guide_form_and_are_unique(store: ConversationStore) -> None:
    ids = [store.create("").id for _ in range(5)]
    assert all(re.fullmatch(r"conv_\d{13}_\d+", i) for i in ids)
    assert len(set(ids)) == 5
    assert ids[0].endswith("_0")


def test_numbers_are_never_reused_after_delete(store: ConversationStore) -> None:
    a = store.create("")
    store.delete("", a.id)
    b = store.create("")
    assert a.id.rsplit("_", 1)[1] != b.id.rsplit("_", 1)[1]


def test_initial_messages_and_turns_are_ordered(store: ConversationStore) -> None:
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


def test_read_gives_the_row_and_its_messages(store: ConversationStore) -> None:
    conv = store.create("k", None, [NewMessage("system", "s")])
    store.append_turn("k", conv.id, [NewMessage("user", "u"), NewMessage("assistant", "a")])
    row, msgs = store.read("k", conv.id)
    assert row.id == conv.id and row.num_messages == 3
    assert (
        [m.content for m in msgs]
        == ["s", "u", "a"]
        == [m.content for m in store.messages("k", conv.id)]
    )


def test_other_owners_see_nothing(store: ConversationStore) -> None:
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


def test_listing_is_newest_first_and_paged(store: ConversationStore) -> None:
    ids = [store.create("").id for _ in range(5)]
    first = store.list_conversations("", limit=2)
    assert [c.id for c in first.conversations] == ids[::-1][:2] and first.has_more
    rest = store.list_conversations("", limit=10, after=first.conversations[-1].id)
    assert [c.id for c in rest.conversations] == ids[::-1][2:] and not rest.has_more


def test_metadata_update_replaces(store: ConversationStore) -> None:
    conv = store.create("", {"a": "1"})
    assert store.update_metadata("", conv.id, {"title": "x"}).metadata == {"title": "x"}


def test_delete_removes_messages(store: ConversationStore, database: str) -> None:
    conv = store.create("", None, [NewMessage("user", "hi")])
    store.delete("", conv.id)
    with pytest.raises(ConversationNotFoundError):
        store.get("", conv.id)
    assert count_rows(database, "messages") == 0


def test_a_failing_turn_writes_nothing(store: ConversationStore) -> None:
    conv = store.create("")
    bad = NewMessage("user", None)  # type: ignore[arg-type]  # NOT NULL violation
    with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)):
        store.append_turn("", conv.id, [NewMessage("user", "kept?"), bad])
    assert store.messages("", conv.id) == []


def test_a_started_turn_is_stored_at_once_and_its_commit_replaces_it(open_store: Opener) -> None:
    """What a chat turn stores as its reply begins (the user's message and the reply's
    stand-in) is committed at once, readable by another store on the database (a restart
    after a crash) while the turn still holds the conversation; the commit replaces it."""
    store, other = open_store(), open_store()
    conv = store.create("k")
    turn = store.begin_turn("k", conv.id)
    started = threading.Thread(
        target=turn.start,
        args=([NewMessage("user", "question"), NewMessage("assistant", "", 0, 5, 0, INTERRUPTED)],),
        daemon=True,
    )
    started.start()
    started.join(20)
    assert not started.is_alive(), "start waited on the turn's own lock"
    seen = [(m.role, m.content, m.finish_reason) for m in other.messages("k", conv.id)]
    assert seen == [("user", "question", None), ("assistant", "", INTERRUPTED)]
    turn.commit(
        [NewMessage("user", "question"), NewMessage("assistant", "answer", 1, 5, 1, "stop")]
    )
    seen = [(m.index, m.content, m.finish_reason) for m in other.messages("k", conv.id)]
    assert seen == [(0, "question", None), (1, "answer", "stop")]


def test_an_abandoned_started_turn_keeps_its_message_and_the_next_turn_follows(
    store: ConversationStore,
) -> None:
    conv = store.create("k")
    turn = store.begin_turn("k", conv.id)
    turn.start(
        [NewMessage("user", "lost reply"), NewMessage("assistant", "", 0, 5, 0, INTERRUPTED)]
    )
    turn.abandon()
    nxt = store.begin_turn("k", conv.id)
    assert [m.content for m in nxt.messages] == ["lost reply", ""]
    nxt.commit([NewMessage("user", "again"), NewMessage("assistant", "yes")])
    assert [m.content for m in store.messages("k", conv.id)] == ["lost reply", "", "again", "yes"]


def test_two_processes_on_one_sqlite_file_never_interleave_or_lose_a_turn(tmp_path: Path) -> None:
    """Two servers on one SQLite file (two stores here), each turn reading the same
    history: the second to start is refused, and the first one's commit replaces only its
    own messages. A started turn's commit replaced every message after its start, the
    other server's turn included, and a turn appended after a history it never read."""
    a, b = SQLiteStore(tmp_path / "shared.db"), SQLiteStore(tmp_path / "shared.db")
    conv = a.create("")
    first, second = a.begin_turn("", conv.id), b.begin_turn("", conv.id)
    stand_in = NewMessage("assistant", "", 0, 5, 0, INTERRUPTED)
    first.start([NewMessage("user", "from a"), stand_in])
    with pytest.raises(ConversationChangedError, match="another server process"):
        second.start([NewMessage("user", "from b"), stand_in])
    first.commit([NewMessage("user", "from a"), NewMessage("assistant", "reply a")])
    b.append_turn("", conv.id, [NewMessage("user", "b again"), NewMessage("assistant", "b")])
    assert [m.content for m in b.messages("", conv.id)] == ["from a", "reply a", "b again", "b"]
    a.close()
    b.close()


@pytest.mark.parametrize(
    "odd_id", ["a\x00b", "../../etc/passwd", "x' OR '1'='1", "conv_1_0; DROP TABLE messages",
               "\u2603\U0001f600", "\ufffd", "a" * 5000],
)  # fmt: skip
def test_ids_that_are_not_ids_are_not_found(store: ConversationStore, odd_id: str) -> None:
    """PostgreSQL cannot compare TEXT with a NUL character: such an id was a DataError
    (a 500 with a traceback) on every route that takes an id, not a 404."""
    conv = store.create("", messages=[NewMessage("user", "kept")])
    calls = [
        lambda: store.get("", odd_id),
        lambda: store.read("", odd_id),
        lambda: store.update_metadata("", odd_id, {}),
        lambda: store.delete("", odd_id),
        lambda: store.append_turn("", odd_id, [NewMessage("user", "x")]),
        lambda: store.begin_turn("", odd_id),
        lambda: store.list_conversations("", after=odd_id),
    ]
    for call in calls:
        with pytest.raises(ConversationNotFoundError):
            call()
    assert [m.content for m in store.messages("", conv.id)] == ["kept"]


def test_persists_across_reopen_with_the_schema_version(open_store: Opener) -> None:
    s = open_store()
    conv = s.create("", {"title": "keep"}, [NewMessage("user", "remember me")])
    s.close()
    s2 = open_store()
    assert s2.get("", conv.id).metadata == {"title": "keep"}
    assert s2.messages("", conv.id)[0].content == "remember me"
    assert s2.schema_version() == SCHEMA_VERSION == 3  # type: ignore[attr-defined]


def test_sqlite_files_use_wal_and_stay_intact(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    s = SQLiteStore(path)
    s.create("", None, [NewMessage("user", "hi")])
    s.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_refuses_a_newer_schema(open_store: Opener, database: str) -> None:
    open_store().close()
    execute(database, "UPDATE schema_version SET version = 99")
    with pytest.raises(StoreError, match="newer"):
        open_store()


def test_concurrent_turns_from_threads_are_all_kept(store: ConversationStore) -> None:
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


def test_reply_token_ids_round_trip(store: ConversationStore, tmp_path: Path) -> None:
    conv = store.create("", messages=[NewMessage("system", "be brief")])
    ids = (0, 7, 128009, 2**32 - 1)
    appended = store.append_turn(
        "", conv.id, [NewMessage("user", "hi"), NewMessage("assistant", "yo", token_ids=ids)]
    )
    assert [m.token_ids for m in appended] == [None, ids]
    store.append_turn("", conv.id, [NewMessage("assistant", "", token_ids=())])
    assert [m.token_ids for m in store.messages("", conv.id)] == [None, None, ids, ()]


def test_tool_calls_and_reasoning_round_trip(store: ConversationStore) -> None:
    calls = (ToolCall("call_1", "get_weather", '{"city": "Paris"}'), ToolCall("call_2", "f", "{}"))
    conv = store.create("", messages=[NewMessage("user", "weather?")])
    turn = [
        NewMessage("assistant", "", tool_calls=calls, reasoning_content="look\x00 it up"),
        NewMessage("tool", '{"temp": 21}', tool_call_id="call_1"),
        NewMessage("assistant", "21 degrees"),
    ]
    appended = store.append_turn("", conv.id, turn)
    stored = store.messages("", conv.id)
    assert stored[1:] == appended
    assert [(m.tool_calls, m.tool_call_id, m.reasoning_content) for m in stored] == [
        ((), None, None),
        (calls, None, "look\x00 it up"),  # model text: a NUL is possible
        ((), "call_1", None),
        ((), None, None),
    ]
    with pytest.raises(InvalidTextError):
        store.append_turn("", conv.id, [NewMessage("assistant", "", reasoning_content="\ud800")])


def test_any_text_round_trips(store: ConversationStore) -> None:
    """What people and models write, NUL included (a model can generate one; PostgreSQL's
    TEXT cannot hold it)."""
    texts = ["a\x00b", "\x00", "", "naïve 日本語 🙂", "back\\slash \\x00 '; DROP TABLE x; --"]
    conv = store.create("", None, [NewMessage("system", texts[0])])
    store.append_turn("", conv.id, [NewMessage("user", t) for t in texts[1:]])
    assert [m.content for m in store.messages("", conv.id)] == texts


def fill_to_the_limit(store: SQLiteStore) -> None:
    """Cap the file at its current size (SQLite's own "database or disk is full", the
    error a full disk gives), so the next write that needs a page fails."""
    with store._lock:
        (pages,) = store._db.execute("PRAGMA page_count").fetchone()
        store._db.execute(f"PRAGMA max_page_count = {pages}")


def test_a_full_sqlite_store_refuses_writes_whole_and_keeps_serving_reads(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "full.db")
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
    store.close()


def test_text_that_is_not_unicode_is_refused_and_old_rows_stay_readable(
    store: ConversationStore, database: str
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
    with pytest.raises(InvalidTextError, match=r"messages\[0\]"):
        store.begin_turn("k", conv.id).commit([NewMessage("user", "\ud800")])
    with pytest.raises(InvalidTextError, match="metadata"):
        store.update_metadata("k", conv.id, {"t": "\ud83d"})
    assert store.get("k", conv.id).num_messages == 0
    # a row written before the stores refused such text (json.dumps escapes it as \ud800)
    old = '{"title": "a\\ud800b"}'
    execute(database, f"UPDATE conversations SET metadata = '{old}' WHERE id = '{conv.id}'")
    assert store.list_conversations("k").conversations[0].metadata == {"title": "a\ufffdb"}


def execute(database: str, *statements: str) -> None:
    """Run ``statements`` in one transaction, behind the store's back."""
    if database.startswith("postgresql"):
        with psycopg.connect(database) as db:
            for statement in statements:
                db.execute(statement)  # type: ignore[call-overload]
    else:
        with sqlite3.connect(database) as lite:
            for statement in statements:
                lite.execute(statement)
        lite.close()


def write_v1_database(database: str) -> None:
    """A database as schema 1 left it: one conversation with a turn."""
    dialect = "postgresql" if database.startswith("postgresql") else "sqlite"
    execute(
        database,
        *schema_statements(dialect),
        "INSERT INTO schema_version (version) VALUES (1)",
        "INSERT INTO conversations VALUES (1, 'conv_1700000000000_0', 'k', 1.0, '{}')",
        "INSERT INTO messages VALUES (1, 0, 'user', 'old q', 2.0, 2, NULL, NULL, NULL)",
        "INSERT INTO messages VALUES (1, 1, 'assistant', 'old a', 3.0, 2, 9, 2, 'stop')",
        # SQLite's AUTOINCREMENT counts explicit keys; a PostgreSQL sequence must be told
        *(["SELECT setval('conversations_seq_seq', 1)"] if dialect == "postgresql" else []),
    )


def test_migrates_a_version_1_database(
    open_store: Opener, database: str, new_database: Callable[[], str]
) -> None:
    write_v1_database(database)
    store = open_store()
    assert store.schema_version() == SCHEMA_VERSION  # type: ignore[attr-defined]
    old = store.messages("k", "conv_1700000000000_0")
    assert [(m.content, m.token_ids, m.finish_reason, m.tool_calls) for m in old] == [
        ("old q", None, None, ()),
        ("old a", None, "stop", ()),
    ]
    store.append_turn(
        "k", "conv_1700000000000_0", [NewMessage("assistant", "new", token_ids=(5, 6))]
    )
    assert store.create("k").id.endswith("_1")  # the next number, never a reused one
    store.close()
    reopened = open_store()  # migrating again is a no-op
    assert reopened.schema_version() == SCHEMA_VERSION  # type: ignore[attr-defined]
    assert [m.token_ids for m in reopened.messages("k", "conv_1700000000000_0")] == [
        None,
        None,
        (5, 6),
    ]
    reopened.close()
    fresh = new_database()
    open_at(fresh).close()
    assert table_shape(database) == table_shape(fresh)  # a migrated database is a new one


def table_shape(database: str) -> list[tuple[object, ...]]:
    """Every table's columns (types, defaults, nullability) and indexes."""
    if database.startswith("postgresql"):
        with psycopg.connect(database) as db:
            columns = db.execute(
                "SELECT table_name, column_name, data_type, is_nullable, column_default "
                "FROM information_schema.columns WHERE table_schema = 'public' "
                "ORDER BY table_name, column_name"
            ).fetchall()
            indexes = db.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' "
                "ORDER BY indexname"
            ).fetchall()
        return [*columns, *indexes]
    with sqlite3.connect(database) as lite:
        rows = lite.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall()
    lite.close()
    return [(str(name), str(sql)) for name, sql in rows]
