"""``PostgresStore``: conversations in PostgreSQL, shared by several replicas.

The same tables, migrations and row helpers as SQLite (:mod:`bitserve.store.schema`),
created or migrated on start under an advisory lock, so replicas starting together do it
once. Connections come from a ``psycopg_pool`` pool and are checked before each use, so those
a database restart cut are replaced instead of failing requests.

Transactions: every method is one transaction. A chat turn is one too, from reading the
history to committing the reply (:meth:`PostgresStore.begin_turn`): it starts with
``SELECT … FOR UPDATE`` on the conversation's row, so a second turn into the same
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
import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from bitserve.store.base import (
    Conversation,
    ConversationNotFoundError,
    ConversationPage,
    ConversationStore,
    NewMessage,
    StorageFullError,
    StoredMessage,
    StoreUnavailableError,
    Turn,
    check_texts,
    new_conversation_id,
    now,
)
from bitserve.store.schema import (
    CONVERSATION_COLUMNS,
    MESSAGE_COLUMNS,
    NUM_MESSAGE_COLUMNS,
    check_version,
    conversation_from_row,
    message_from_row,
    message_values,
    migrations,
    schema_statements,
    stored_message,
)

DEFAULT_MAX_CONNECTIONS = 16
# The pool holds a connection per turn in flight, so a request waits for one only while the
# database is unreachable: then it gets its 503 after POOL_TIMEOUT_S, and each new request
# starts a fresh connection attempt once the previous one gave up (RECONNECT_TIMEOUT_S),
# so the pool's exponential backoff never keeps a database that is back waiting.
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

_INSERT_MESSAGE = (
    f"INSERT INTO messages (conversation_seq, {MESSAGE_COLUMNS}) "
    f"VALUES (%s{', %s' * NUM_MESSAGE_COLUMNS})"
)
_SELECT_CONVERSATION = (
    f"SELECT {CONVERSATION_COLUMNS} FROM conversations c WHERE c.id = %s AND c.owner = %s"
)
_SELECT_MESSAGES = (
    f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_seq = %s ORDER BY idx"
)


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


def _row(conn: psycopg.Connection[Any], owner: str, cid: str, lock: bool = False) -> Conversation:
    """The conversation row; with ``lock``, first wait for and take its row lock (in a
    statement of its own: under READ COMMITTED the read that follows then sees whatever
    the previous holder committed, its messages included)."""
    if lock:
        locked = conn.execute(
            "SELECT 1 FROM conversations WHERE id = %s AND owner = %s FOR UPDATE", (cid, owner)
        )
        if locked.fetchone() is None:
            raise ConversationNotFoundError(cid)
    found = conn.execute(_SELECT_CONVERSATION, (cid, owner)).fetchone()
    if found is None:
        raise ConversationNotFoundError(cid)
    return conversation_from_row(found)


def _messages(conn: psycopg.Connection[Any], seq: int) -> list[StoredMessage]:
    return [message_from_row(r) for r in conn.execute(_SELECT_MESSAGES, (seq,)).fetchall()]


def _insert_messages(
    conn: psycopg.Connection[Any], seq: int, first_index: int, messages: Sequence[NewMessage]
) -> list[StoredMessage]:
    created_at = now()
    rows = [
        message_values(seq, i, m, created_at, "postgresql")
        for i, m in enumerate(messages, first_index)
    ]
    if rows:
        with conn.cursor() as cur:
            cur.executemany(_INSERT_MESSAGE, rows)
    return [stored_message(i, m, created_at) for i, m in enumerate(messages, first_index)]


class PostgresTurn(Turn):
    """A turn holding its own connection, inside a transaction that holds the row lock.
    Whoever ends the turn first (``commit`` on a worker thread, ``abandon`` on the event
    loop when the client leaves) takes the connection; the other finds none."""

    def __init__(self, store: PostgresStore, owner: str, conversation_id: str) -> None:
        self._pool = store.pool
        self._lock = threading.Lock()
        with _available():
            conn = store.getconn()
            try:
                conn.execute(f"SET LOCAL lock_timeout = '{TURN_LOCK_TIMEOUT}'")
                self.conversation = _row(conn, owner, conversation_id, lock=True)
                self.messages = _messages(conn, self.conversation.seq)
            except BaseException:
                self._close(conn)
                raise
        self._conn: psycopg.Connection[Any] | None = conn

    def commit(self, messages: Sequence[NewMessage]) -> list[StoredMessage]:
        """Append and commit; any failure ends the turn (nothing stored)."""
        conn = self._take()
        if conn is None:
            raise RuntimeError("this turn has already ended")
        try:
            check_texts(None, messages)
            with _available():
                first = self.conversation.num_messages
                stored = _insert_messages(conn, self.conversation.seq, first, messages)
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


class PostgresStore(ConversationStore):
    """Conversations in the PostgreSQL database at ``url`` (a libpq URL:
    ``postgresql://user:password@host:port/dbname?sslmode=...``), at most
    ``max_connections`` connections at once. Waits up to ``connect_timeout_s`` for the
    database at start (``StoreUnavailableError`` past that), then creates or migrates the
    schema; refuses a newer schema version."""

    def __init__(
        self,
        url: str,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        self.url = url
        self.pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url,
            min_size=1,
            max_size=max(1, max_connections),
            open=False,
            timeout=POOL_TIMEOUT_S,
            reconnect_timeout=RECONNECT_TIMEOUT_S,
            configure=_configure,
            # the replica notices a database host that vanished the same way
            kwargs={
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
                with self._transaction():
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
        second after the second broken connection, and after a restart they all are."""
        deadline = time.monotonic() + POOL_TIMEOUT_S
        while True:
            conn = self.pool.getconn(max(0.0, deadline - time.monotonic()))
            try:
                ConnectionPool.check_connection(conn)
            except psycopg.Error:
                self.pool.putconn(conn)  # broken: the pool replaces it
                continue
            return conn

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection[Any]]:
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

    def _migrate(self) -> None:
        with self._transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            if conn.execute("SELECT to_regclass('schema_version')").fetchone() == (None,):
                for statement in schema_statements("postgresql"):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version) VALUES (1)")
            version = self._version(conn)
            check_version(version, self.where)
            for target, statements in sorted(migrations("postgresql").items()):
                if target > version:
                    for statement in statements:
                        conn.execute(statement)
                    conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (target,))

    @staticmethod
    def _version(conn: psycopg.Connection[Any]) -> int:
        row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        return int(row[0]) if row else 0

    def schema_version(self) -> int:
        with self._transaction() as conn:
            return self._version(conn)

    # -- the interface ----------------------------------------------------------------------

    def create(
        self,
        owner: str,
        metadata: dict[str, str] | None = None,
        messages: Sequence[NewMessage] = (),
    ) -> Conversation:
        check_texts(metadata, messages)
        created_at = now()
        with self._transaction() as conn:
            next_seq = "SELECT nextval(pg_get_serial_sequence('conversations', 'seq'))"
            (seq,) = conn.execute(next_seq).fetchone() or (0,)
            cid = new_conversation_id(int(created_at * 1000), int(seq) - 1)
            conn.execute(
                "INSERT INTO conversations (seq, id, owner, created_at, metadata) "
                "VALUES (%s, %s, %s, %s, %s)",
                (seq, cid, owner, created_at, json.dumps(metadata or {})),
            )
            _insert_messages(conn, seq, 0, messages)
            return _row(conn, owner, cid)

    def get(self, owner: str, conversation_id: str) -> Conversation:
        with self._transaction() as conn:
            return _row(conn, owner, conversation_id)

    def messages(self, owner: str, conversation_id: str) -> list[StoredMessage]:
        return self.read(owner, conversation_id)[1]

    def read(self, owner: str, conversation_id: str) -> tuple[Conversation, list[StoredMessage]]:
        with self._transaction() as conn:
            # one snapshot for both statements: a turn committed between them is not half in
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            conv = _row(conn, owner, conversation_id)
            return conv, _messages(conn, conv.seq)

    def list_conversations(
        self, owner: str, limit: int = 20, after: str | None = None
    ) -> ConversationPage:
        with self._transaction() as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            query = f"SELECT {CONVERSATION_COLUMNS} FROM conversations c WHERE c.owner = %s"
            params: list[Any] = [owner]
            if after:
                query += " AND c.seq < %s"
                params.append(_row(conn, owner, after).seq)
            params.append(limit + 1)
            rows = conn.execute(query + " ORDER BY c.seq DESC LIMIT %s", params).fetchall()
        conversations = [conversation_from_row(r) for r in rows]
        return ConversationPage(conversations[:limit], has_more=len(conversations) > limit)

    def update_metadata(
        self, owner: str, conversation_id: str, metadata: dict[str, str]
    ) -> Conversation:
        check_texts(metadata)
        with self._transaction() as conn:
            conv = _row(conn, owner, conversation_id, lock=True)
            conn.execute(
                "UPDATE conversations SET metadata = %s WHERE seq = %s",
                (json.dumps(metadata), conv.seq),
            )
            return _row(conn, owner, conversation_id)

    def delete(self, owner: str, conversation_id: str) -> None:
        with self._transaction() as conn:
            conv = _row(conn, owner, conversation_id, lock=True)
            conn.execute("DELETE FROM messages WHERE conversation_seq = %s", (conv.seq,))
            conn.execute("DELETE FROM conversations WHERE seq = %s", (conv.seq,))

    def append_turn(
        self, owner: str, conversation_id: str, messages: Sequence[NewMessage]
    ) -> list[StoredMessage]:
        check_texts(None, messages)
        with self._transaction() as conn:
            conv = _row(conn, owner, conversation_id, lock=True)
            return _insert_messages(conn, conv.seq, conv.num_messages, messages)

    def begin_turn(self, owner: str, conversation_id: str) -> Turn:
        return PostgresTurn(self, owner, conversation_id)

    def close(self) -> None:
        self.pool.close()
