"""PostgreSQL only: turns from two replicas (two stores on one database) wait for each
other on the conversation's row lock; a database that goes away gives
``StoreUnavailableError`` and half a turn never; the store recovers by itself."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from bitserve.cluster.postgres import PostgresServer, start_postgres
from bitserve.store import (
    NewMessage,
    SQLiteStore,
    StoreUnavailableError,
    open_store,
)
from bitserve.store.postgres import SESSION_SETTINGS, PostgresStore


@pytest.fixture
def replicas(postgres_url: str) -> Iterator[tuple[PostgresStore, PostgresStore]]:
    """Two stores on one database, as two replicas have."""
    a, b = PostgresStore(postgres_url), PostgresStore(postgres_url)
    yield a, b
    a.close()
    b.close()


def turn(text: str) -> list[NewMessage]:
    return [NewMessage("user", text), NewMessage("assistant", f"re: {text}")]


def test_open_store_picks_the_database_by_url(postgres_url: str, tmp_path: object) -> None:
    pg = open_store(postgres_url, max_connections=3)
    assert isinstance(pg, PostgresStore) and pg.pool.max_size == 3
    pg.close()
    lite = open_store(f"{tmp_path}/x.db")
    assert isinstance(lite, SQLiteStore)
    lite.close()


def test_a_second_turn_waits_for_the_first_and_sees_it(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = replicas
    conv = a.create("k")
    first = a.begin_turn("k", conv.id)
    seen: list[list[str]] = []

    def second_replica() -> None:
        t = b.begin_turn("k", conv.id)  # blocks on the row lock until `first` ends
        seen.append([m.content for m in t.messages])
        t.commit(turn("second"))

    thread = threading.Thread(target=second_replica)
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive() and not seen  # waiting, not interleaving
    assert [m.content for m in b.messages("k", conv.id)] == []  # reads never wait
    first.commit(turn("first"))
    thread.join(timeout=10)
    assert seen == [["first", "re: first"]]
    stored = [(m.index, m.content) for m in a.messages("k", conv.id)]
    assert stored == [(0, "first"), (1, "re: first"), (2, "second"), (3, "re: second")]


def test_an_abandoned_turn_stores_nothing_and_lets_the_next_in(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = replicas
    conv = a.create("k", messages=[NewMessage("system", "s")])
    t = a.begin_turn("k", conv.id)
    t.abandon()
    t.abandon()  # idempotent
    started = time.monotonic()
    t2 = b.begin_turn("k", conv.id)
    assert time.monotonic() - started < 2
    assert [m.content for m in t2.messages] == ["s"]
    t2.commit(turn("kept"))
    assert [m.content for m in a.messages("k", conv.id)] == ["s", "kept", "re: kept"]
    assert a.pool.get_stats()["pool_size"] >= 1  # the closed connection was replaced


def test_many_turns_from_two_replicas_are_all_kept_whole(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    conv = replicas[0].create("")

    def worker(n: int) -> None:
        store = replicas[n % 2]
        for i in range(5):
            t = store.begin_turn("", conv.id)
            t.commit(turn(f"{n}-{i}"))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    msgs = replicas[1].messages("", conv.id)
    assert [m.index for m in msgs] == list(range(40))
    for user, reply in zip(msgs[::2], msgs[1::2], strict=True):
        assert reply.content == f"re: {user.content}"


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A server of this test's own: it is stopped and started again."""
    server = start_postgres(durable=False)
    yield server
    server.remove()


def test_a_database_restart_is_unavailable_then_recovers(own_server: PostgresServer) -> None:
    store = PostgresStore(own_server.url, max_connections=4)
    conv = store.create("k")
    store.append_turn("k", conv.id, turn("before"))
    open_turn = store.begin_turn("k", conv.id)
    own_server.stop()
    with pytest.raises(StoreUnavailableError):
        open_turn.commit(turn("lost with the connection"))
    for call in (
        lambda: store.get("k", conv.id),
        lambda: store.messages("k", conv.id),
        lambda: store.create("k"),
        lambda: store.append_turn("k", conv.id, turn("while down")),
        lambda: store.begin_turn("k", conv.id),
    ):
        with pytest.raises(StoreUnavailableError) as caught:
            call()
        assert caught.value.retry_after > 0
    own_server.start()
    deadline = time.monotonic() + 15
    while True:  # the pool reconnects by itself
        try:
            msgs = store.messages("k", conv.id)
            break
        except StoreUnavailableError:
            assert time.monotonic() < deadline, "the store did not recover"
            time.sleep(0.2)
    assert [m.content for m in msgs] == ["before", "re: before"]  # nothing half-written
    store.begin_turn("k", conv.id).commit(turn("after"))
    assert len(store.messages("k", conv.id)) == 4
    store.close()


def test_no_database_at_start_is_unavailable(own_server: PostgresServer) -> None:
    own_server.stop()
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError):
        PostgresStore(own_server.url, connect_timeout_s=1)
    assert time.monotonic() - started < 10


def test_a_turn_ends_once_and_returns_its_connection_once(postgres_url: str) -> None:
    store = PostgresStore(postgres_url, max_connections=2)
    conv = store.create("k")
    committed = store.begin_turn("k", conv.id)
    committed.commit(turn("a"))
    committed.abandon()  # the guard's clean-up after a stored turn: nothing to do
    abandoned = store.begin_turn("k", conv.id)
    abandoned.abandon()
    with pytest.raises(RuntimeError, match="ended"):
        abandoned.commit(turn("b"))
    # both connections are back: two turns can be held at once, then stored
    t1, t2 = store.begin_turn("k", conv.id), store.begin_turn("k", store.create("k").id)
    t2.commit(turn("c"))
    t1.commit(turn("d"))
    assert [m.content for m in store.messages("k", conv.id)] == ["a", "re: a", "d", "re: d"]
    store.close()


def test_connections_let_the_server_drop_a_vanished_replica(postgres_url: str) -> None:
    """A replica that disappears without closing its connection (power cut) must not keep
    its turn's row lock for TCP's two hours: the server probes idle connections."""
    store = PostgresStore(postgres_url)
    with store.pool.connection() as conn:
        shown = [conn.execute(f"SHOW {name}").fetchone() for name in SESSION_SETTINGS]  # type: ignore[call-overload]
    assert [row[0] for row in shown if row] == list(SESSION_SETTINGS.values())
    store.close()


def test_after_a_restart_the_first_request_succeeds(own_server: PostgresServer) -> None:
    """Every pooled connection is broken once the database restarted: each is dropped for
    the next at once, and the first request after the restart already gets a new one."""
    store = PostgresStore(own_server.url, max_connections=4)
    conv = store.create("k")
    held = [store.pool.getconn() for _ in range(3)]
    for conn in held:
        store.pool.putconn(conn)
    own_server.stop()
    own_server.start()
    assert store.get("k", conv.id).id == conv.id
    store.close()


def count_connections(url: str, application: str) -> int:
    with psycopg.connect(url) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE application_name = %s AND datname = current_database()",
            (application,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_the_pool_opens_its_connections_at_start_and_never_more(postgres_url: str) -> None:
    """A replica's footprint on the database is its pool size, known in advance (replicas
    x pool size must fit the server's max_connections), and a burst of turns never waits
    for the pool to grow one connection at a time (it did, and got 503s)."""
    store = PostgresStore(postgres_url, max_connections=3)
    deadline = time.monotonic() + 10
    while count_connections(postgres_url, "bitserve") < 3:
        assert time.monotonic() < deadline, "the pool did not open its connections"
        time.sleep(0.05)
    turns = [store.begin_turn("k", store.create("k").id) for _ in range(3)]
    assert count_connections(postgres_url, "bitserve") == 3
    for t in turns:
        t.abandon()
    store.close()


def test_a_full_pool_is_a_prompt_503_that_says_so(postgres_url: str) -> None:
    store = PostgresStore(postgres_url, max_connections=2)
    held = [store.begin_turn("k", store.create("k").id) for _ in range(2)]
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as caught:
        store.begin_turn("k", store.create("k").id)
    assert time.monotonic() - started < 10
    assert str(caught.value).endswith(": no free database connection (all 2 in use)")
    assert caught.value.retry_after > 0
    held[0].commit(turn("a"))  # a connection is back: the next turn gets it
    store.begin_turn("k", store.create("k").id).abandon()
    held[1].abandon()
    store.close()
