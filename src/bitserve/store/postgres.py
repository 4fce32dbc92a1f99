"""``PostgresStore``: conversations in PostgreSQL, shared by several replicas.

The same tables, migrations, row helpers and queries as SQLite (:mod:`bitserve.store.schema`,
:class:`~bitserve.store.sql.SQLStore`; this module holds PostgreSQL's connections,
transactions, row locks and turns), created or migrated on start under an advisory lock,
so replicas starting together do it once. Connections come from a ``psycopg_pool`` pool
and are checked before each use, so those a database restart cut are replaced instead of
failing requests.

Transactions: every method is one transaction. A chat turn is one too, from reading the
history to committing the reply (:meth:`PostgresStore.begin_turn`): it starts with
``SELECT … FOR NO KEY UPDATE`` on the conversation's row, so a second turn into the same
conversation, from any replica, waits until the first one is stored (or abandoned) and
then reads a history that holds it. Turns never interleave and none is lost. Reads never
wait: they see the last committed turn.

Failures: text that is not valid Unicode is refused before any write (``check_texts``, as
SQLite does); a full disk is ``StorageFullError``. A lost connection, a database that is
down or restarting, or a pool with no free connection within :data:`POOL_TIMEOUT_S`
raise ``StoreUnavailableError`` (the API's 503 + ``Retry-After``). PostgreSQL rolls back
whatever the broken transaction held, so nothing half-written remains, and the pool
reconnects by itself once the database is back.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from bitserve.store.base import (
    ConversationNotFoundError,
    NewMessage,
    StorageFullError,
    StoredMessage,
    StoreUnavailableError,
    Turn,
    TurnEndedError,
    check_texts,
)
from bitserve.store.sql import Connection, SQLStore

DEFAULT_MAX_CONNECTIONS = 16
APPLICATION_NAME = "bitserve"  # how our connections show in pg_stat_activity
# The pool has a fixed size: it opens its connections at start, so a replica's footprint on
# the database is known in advance (replicas x pool size must fit max_connections) and a
# burst of turns never waits for it to grow one connection at a time. A turn in flight
# holds a connection; a request waits for one at most POOL_TIMEOUT_S, then gets its 503:
# every connection is busy, or the database is unreachable. Each new request starts a
# fresh connection attempt once the previous one gave up (RECONNECT_TIMEOUT_S), so the
# pool's exponential backoff never keeps a database that is back waiting.
POOL_TIMEOUT_S = 1.0
RECONNECT_TIMEOUT_S = 1.0
CONNECT_TIMEOUT_S = 30.0  # at start: how long to wait for the database to come up
TURN_LOCK_TIMEOUT = "300s"  # a turn waits at most this long for the one before it
# A replica that vanishes without closing its connections (power cut, network split) would
# keep the row lock of its turn in flight until TCP noticed, two hours by default: the
# server probes our idle connections after 30 s and drops them after 3 missed probes.
SESSION_SETTINGS = {"tcp_keepalives_idle": "30", "tcp_keepalives_interval": "10",
                    "tcp_keepalives_count": "3"}  # fmt: skip
MIGRATION_LOCK = 0x62697473  # pg_advisory_xact_lock key of schema changes ("bits")
RETRY_AFTER_S = 2


@contextmanager
def _available() -> Iterator[None]:
    """Connection trouble (``OperationalError`` covers a lost connection, a refused one, a
    lock timeout and a database shutting down) → ``StoreUnavailableError``."""
    try:
        yield
    except psycopg.errors.DiskFull as exc:
        raise StorageFullError(str(exc).strip()) from exc
    except PoolTimeout as exc:
        raise StoreUnavailableError("no database connection", RETRY_AFTER_S) from exc
    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreUnavailableError(reason, RETRY_AFTER_S) from exc


def _configure(conn: psycopg.Connection[Any]) -> None:
    """Each new pooled connection: :data:`SESSION_SETTINGS`, left idle (the pool's rule)."""
    for name, value in SESSION_SETTINGS.items():
        conn.execute("SELECT set_config(%s, %s, false)", (name, value))
    conn.commit()


class PostgresTurn(Turn):
    """A turn holding its own connection, inside a transaction that holds the row lock.
    Whoever ends the turn first (``commit`` on a worker thread, ``abandon`` on the event
    loop when the client leaves) takes the connection; the other finds none."""

    def __init__(self, store: PostgresStore, owner: str, conversation_id: str) -> None:
        self._store = store
        self._pool = store.pool
        self._lock = threading.Lock()
        with _available():
            conn = store.getconn()
            try:
                conn.execute(f"SET LOCAL lock_timeout = '{TURN_LOCK_TIMEOUT}'")
                self.conversation = store._locked_row(conn, owner, conversation_id)
                self.messages = store._messages(conn, self.conversation.seq)
            except BaseException:
                self._close(conn)
                raise
        self._conn: psycopg.Connection[Any] | None = conn
        self._started = False

    def start(self, messages: Sequence[NewMessage]) -> None:
        """Append ``messages`` on another connection, committed at once, while this one
        keeps the row lock (its ``FOR NO KEY UPDATE`` lets their foreign key check in)."""
        check_texts(None, messages)
        first = self.conversation.num_messages
        with self._store._writing() as other:
            self._store._insert_messages(other, self.conversation.seq, first, messages)
        self._started = True

    def commit(self, messages: Sequence[NewMessage]) -> list[StoredMessage]:
        """Append (or replace what :meth:`start` stored) and commit; any failure ends the
        turn (nothing more stored)."""
        conn = self._take()
        if conn is None:
            raise TurnEndedError()
        try:
            check_texts(None, messages)
            with _available():
                first, seq = self.conversation.num_messages, self.conversation.seq
                if self._started:
                    stored = self._store._replace_messages(conn, seq, first, messages)
                else:
                    stored = self._store._insert_messages(conn, seq, first, messages)
                conn.commit()
        except BaseException:
            self._close(conn)
            raise
        self._pool.putconn(conn)
        return stored

    def abandon(self) -> None:
        conn = self._take()
        if conn is not None:
            self._close(conn)

    def _take(self) -> psycopg.Connection[Any] | None:
        with self._lock:
            conn, self._conn = self._conn, None
        return conn

    def _close(self, conn: psycopg.Connection[Any]) -> None:
        """Close the connection (the server rolls back and unlocks at once) rather than
        send a ROLLBACK and wait for it: this may run on the event loop."""
        conn.close()
        self._pool.putconn(conn)  # a closed connection is replaced


class PostgresStore(SQLStore):
    """Conversations in the PostgreSQL database at ``url`` (a libpq URL:
    ``postgresql://user:password@host:port/dbname?sslmode=...``), through a pool of
    ``max_connections`` connections opened at start and kept open. Waits up to
    ``connect_timeout_s`` for the database at start (``StoreUnavailableError`` past that),
    then creates or migrates the schema; refuses a newer schema version."""

    dialect = "postgresql"

    def __init__(
        self,
        url: str,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        self.url = url
        self.pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url,
            min_size=max(1, max_connections),
            open=False,
            timeout=POOL_TIMEOUT_S,
            reconnect_timeout=RECONNECT_TIMEOUT_S,
            configure=_configure,
            # the replica notices a database host that vanished the same way
            kwargs={
                "application_name": APPLICATION_NAME,
                "keepalives": 1,
                "keepalives_idle": 30,
                "keepalives_interval": 10,
                "keepalives_count": 3,
            },
            name="bitserve-store",
        )
        self.pool.open()
        try:
            self._wait_for_database(connect_timeout_s)
            self._migrate()
        except BaseException:
            self.pool.close()
            raise

    def _wait_for_database(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with self._writing():
                    return
            except StoreUnavailableError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(min(POOL_TIMEOUT_S, max(0.0, deadline - time.monotonic())))

    @property
    def where(self) -> str:
        """The database, without the password (for logs)."""
        info = psycopg.conninfo.conninfo_to_dict(self.url)
        return (
            f"postgresql://{info.get('host', '')}:{info.get('port', 5432)}/{info.get('dbname', '')}"
        )

    def getconn(self) -> psycopg.Connection[Any]:
        """A pooled connection that works, within :data:`POOL_TIMEOUT_S` (``PoolTimeout``
        past it). Each is checked first, and a broken one (the database restarted since it
        was last used) is dropped for the next at once: the pool's own check would wait a
        second after the second broken connection, and after a restart they all are. A
        timeout with every connection checked out says so: the pool is too small for the
        load, not the database gone."""
        deadline = time.monotonic() + POOL_TIMEOUT_S
        while True:
            try:
                conn = self.pool.getconn(max(0.0, deadline - time.monotonic()))
            except PoolTimeout:
                stats = self.pool.get_stats()
                if stats["pool_available"] == 0 and stats["pool_size"] >= self.pool.max_size:
                    busy = f"no free database connection (all {self.pool.max_size} in use)"
                    raise StoreUnavailableError(busy, RETRY_AFTER_S) from None
                raise
            try:
                ConnectionPool.check_connection(conn)
            except psycopg.Error:
                self.pool.putconn(conn)  # broken: the pool replaces it
                continue
            return conn

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        """A pooled connection inside a transaction: committed at the end, rolled back on
        any exception."""
        with _available():
            conn = self.getconn()
            try:
                yield conn
                conn.commit()
            except BaseException:
                with contextlib.suppress(psycopg.Error):
                    conn.rollback()  # a broken connection cannot; the server already did
                raise
            finally:
                self.pool.putconn(conn)

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        with self._writing() as conn:
            # one snapshot for every statement: a turn committed between them is not half in
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            yield conn

    def _next_seq(self, conn: Connection) -> int:
        row = conn.execute("SELECT nextval(pg_get_serial_sequence('conversations', 'seq'))")
        return int(row.fetchone()[0])

    def _lock_row(self, conn: Connection, owner: str, conversation_id: str) -> None:
        """``SELECT … FOR NO KEY UPDATE`` in a statement of its own: under READ COMMITTED
        the read that follows then sees whatever the previous holder committed, its
        messages included. (Not ``FOR UPDATE``: that would also keep out the foreign key
        check of a message a started turn stores on another connection.)"""
        locked = conn.execute(
            "SELECT 1 FROM conversations WHERE id = %s AND owner = %s FOR NO KEY UPDATE",
            (conversation_id, owner),
        )
        if locked.fetchone() is None:
            raise ConversationNotFoundError(conversation_id)

    def _migrate(self) -> None:
        with self._writing() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            found = conn.execute("SELECT to_regclass('schema_version')").fetchone()
            self._create_or_migrate(conn, found != (None,), self.where)

    # -- the interface (the rest is SQLStore's) ------------------------------------------

    def begin_turn(self, owner: str, conversation_id: str) -> Turn:
        return PostgresTurn(self, owner, conversation_id)

    def close(self) -> None:
        self.pool.close()
