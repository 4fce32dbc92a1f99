"""``SQLiteStore``: conversations in one SQLite file (stdlib ``sqlite3``).

Durability choices:
- WAL journal: readers never block the writer, and a crash leaves the file consistent.
- ``synchronous=FULL``: every commit fsyncs the WAL, so a turn the client has been answered
  for survives even a power cut, not only a killed process (``NORMAL`` would be enough for
  ``kill -9`` but may roll back the last turns on power loss). The cost is one fsync per
  turn, nothing next to the seconds a reply takes to generate.
- One ``BEGIN IMMEDIATE`` transaction per write (a whole turn at once), so a server killed
  mid-generation loses at most the reply in progress.

One connection, guarded by a lock, serves every thread: SQLite serialises writers anyway
and each call is a few small statements.

The schema, its migrations and the row helpers are shared with the PostgreSQL store
(:mod:`bitserve.store.schema`).
"""

from __future__ import annotations

import errno
import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from bitserve.store.base import (
    Conversation,
    ConversationNotFoundError,
    ConversationPage,
    ConversationStore,
    NewMessage,
    StorageFullError,
    StoredMessage,
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

_INSERT_MESSAGE = (
    f"INSERT INTO messages (conversation_seq, {MESSAGE_COLUMNS}) "
    f"VALUES (?{', ?' * NUM_MESSAGE_COLUMNS})"
)

SQLITE_FULL = 13  # "database or disk is full": the disk, or PRAGMA max_page_count


def _is_full(exc: BaseException) -> bool:
    """True for SQLite's "disk full" (by code where Python exposes it, by message before
    3.11) and for an ``OSError`` ENOSPC."""
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (int(code) & 0xFF) == SQLITE_FULL
    return "database or disk is full" in str(exc)


class SQLiteStore(ConversationStore):
    """The default ``ConversationStore``: one SQLite file at ``path`` (``":memory:"`` works
    for tests). Creates the schema on first use; refuses a newer schema version."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._migrate()

    # -- plumbing ---------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` under the lock; rolls back on any exception
        (a failed COMMIT included). A full disk is a ``StorageFullError``."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except (sqlite3.Error, OSError) as exc:
                if _is_full(exc):
                    raise StorageFullError(str(exc)) from exc
                raise

    def _migrate(self) -> None:
        """Create the schema or bring an older one up to ``SCHEMA_VERSION``, in one
        transaction (a failed migration leaves the file as it was)."""
        with self._transaction() as db:
            exists = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'"
            ).fetchone()
            if not exists:
                for statement in schema_statements("sqlite"):
                    db.execute(statement)
                db.execute("INSERT INTO schema_version (version) VALUES (1)")
            (version,) = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
            check_version(version, self.path)
            for target, statements in sorted(migrations("sqlite").items()):
                if target > version:
                    for statement in statements:
                        db.execute(statement)
                    db.execute("INSERT INTO schema_version (version) VALUES (?)", (target,))

    def schema_version(self) -> int:
        with self._lock:
            (version,) = self._db.execute("SELECT MAX(version) FROM schema_version").fetchone()
        return int(version)

    def _row(self, db: sqlite3.Connection, owner: str, conversation_id: str) -> Conversation:
        row = db.execute(
            f"SELECT {CONVERSATION_COLUMNS} FROM conversations c WHERE c.id = ? AND c.owner = ?",
            (conversation_id, owner),
        ).fetchone()
        if row is None:
            raise ConversationNotFoundError(conversation_id)
        return conversation_from_row(row)

    @staticmethod
    def _insert_messages(
        db: sqlite3.Connection, seq: int, first_index: int, messages: Sequence[NewMessage]
    ) -> list[StoredMessage]:
        created_at = now()
        rows = [
            message_values(seq, i, m, created_at, "sqlite")
            for i, m in enumerate(messages, first_index)
        ]
        db.executemany(_INSERT_MESSAGE, rows)
        return [stored_message(i, m, created_at) for i, m in enumerate(messages, first_index)]

    # -- the interface ----------------------------------------------------------------------

    def create(
        self,
        owner: str,
        metadata: dict[str, str] | None = None,
        messages: Sequence[NewMessage] = (),
    ) -> Conversation:
        check_texts(metadata, messages)
        created_at = now()
        with self._transaction() as db:
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name='conversations'")
            last = row.fetchone()
            seq = (int(last[0]) if last else 0) + 1
            cid = new_conversation_id(int(created_at * 1000), seq - 1)
            db.execute(
                "INSERT INTO conversations (seq, id, owner, created_at, metadata) "
                "VALUES (?, ?, ?, ?, ?)",
                (seq, cid, owner, created_at, json.dumps(metadata or {})),
            )
            self._insert_messages(db, seq, 0, messages)
            return self._row(db, owner, cid)

    def get(self, owner: str, conversation_id: str) -> Conversation:
        with self._lock:
            return self._row(self._db, owner, conversation_id)

    def messages(self, owner: str, conversation_id: str) -> list[StoredMessage]:
        return self.read(owner, conversation_id)[1]

    def read(self, owner: str, conversation_id: str) -> tuple[Conversation, list[StoredMessage]]:
        with self._lock:  # one connection: nothing else runs between the two reads
            conv = self._row(self._db, owner, conversation_id)
            rows = self._db.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_seq = ? ORDER BY idx",
                (conv.seq,),
            ).fetchall()
        return conv, [message_from_row(row) for row in rows]

    def list_conversations(
        self, owner: str, limit: int = 20, after: str | None = None
    ) -> ConversationPage:
        with self._lock:
            before_seq = self._row(self._db, owner, after).seq if after else None
            rows = self._db.execute(
                f"SELECT {CONVERSATION_COLUMNS} FROM conversations c WHERE c.owner = ? "
                "AND (? IS NULL OR c.seq < ?) ORDER BY c.seq DESC LIMIT ?",
                (owner, before_seq, before_seq, limit + 1),
            ).fetchall()
        conversations = [conversation_from_row(r) for r in rows]
        return ConversationPage(conversations[:limit], has_more=len(conversations) > limit)

    def update_metadata(
        self, owner: str, conversation_id: str, metadata: dict[str, str]
    ) -> Conversation:
        check_texts(metadata)
        with self._transaction() as db:
            conv = self._row(db, owner, conversation_id)
            db.execute(
                "UPDATE conversations SET metadata = ? WHERE seq = ?",
                (json.dumps(metadata), conv.seq),
            )
            return self._row(db, owner, conversation_id)

    def delete(self, owner: str, conversation_id: str) -> None:
        with self._transaction() as db:
            conv = self._row(db, owner, conversation_id)
            db.execute("DELETE FROM messages WHERE conversation_seq = ?", (conv.seq,))
            db.execute("DELETE FROM conversations WHERE seq = ?", (conv.seq,))

    def append_turn(
        self, owner: str, conversation_id: str, messages: Sequence[NewMessage]
    ) -> list[StoredMessage]:
        check_texts(None, messages)
        with self._transaction() as db:
            conv = self._row(db, owner, conversation_id)
            return self._insert_messages(db, conv.seq, conv.num_messages, messages)

    def close(self) -> None:
        with self._lock:
            self._db.close()
