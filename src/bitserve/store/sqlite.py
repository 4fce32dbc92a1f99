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

Schema versions: a new file gets :data:`SCHEMA_V1` and then every migration in order, the
same path an old file takes, so both end up identical. Version 2 adds
``messages.token_ids`` (the generated ids of an assistant reply, little-endian uint32;
NULL for messages stored before it and for user/system messages).
"""

from __future__ import annotations

import errno
import json
import sqlite3
import struct
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bitserve.store.base import (
    Conversation,
    ConversationNotFoundError,
    ConversationPage,
    ConversationStore,
    NewMessage,
    StorageFullError,
    StoredMessage,
    StoreError,
    check_texts,
    new_conversation_id,
    now,
    repaired_text,
)

SCHEMA_VERSION = 2

SCHEMA_V1 = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE conversations (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL UNIQUE,
    owner      TEXT NOT NULL,
    created_at REAL NOT NULL,
    metadata   TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX conversations_by_owner ON conversations (owner, seq);
CREATE TABLE messages (
    conversation_seq  INTEGER NOT NULL REFERENCES conversations (seq) ON DELETE CASCADE,
    idx               INTEGER NOT NULL,
    role              TEXT NOT NULL,
    content           TEXT NOT NULL,
    created_at        REAL NOT NULL,
    tokens            INTEGER NOT NULL,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    finish_reason     TEXT,
    PRIMARY KEY (conversation_seq, idx)
) WITHOUT ROWID;
"""

# version → the statements that bring the previous version to it
MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: ("ALTER TABLE messages ADD COLUMN token_ids BLOB",),
}

_MESSAGE_COLUMNS = (
    "idx, role, content, created_at, tokens, prompt_tokens, completion_tokens, finish_reason, "
    "token_ids"
)


def pack_token_ids(ids: tuple[int, ...] | None) -> bytes | None:
    """Token ids → the ``token_ids`` column (little-endian uint32); None stays NULL."""
    return None if ids is None else struct.pack(f"<{len(ids)}I", *ids)


def unpack_token_ids(blob: bytes | None) -> tuple[int, ...] | None:
    if blob is None:
        return None
    if len(blob) % 4:
        raise StoreError(f"corrupt token_ids column ({len(blob)} bytes)")
    return struct.unpack(f"<{len(blob) // 4}I", blob)


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


_CONVERSATION_COLUMNS = (
    "c.seq, c.id, c.owner, c.created_at, c.metadata, "
    "(SELECT COUNT(*) FROM messages m WHERE m.conversation_seq = c.seq)"
)


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
        """Create the schema or bring an older one up to :data:`SCHEMA_VERSION`, in one
        transaction (a failed migration leaves the file as it was)."""
        with self._transaction() as db:
            exists = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'"
            ).fetchone()
            if not exists:
                for statement in SCHEMA_V1.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("INSERT INTO schema_version (version) VALUES (1)")
            (version,) = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: schema version {version} is newer than this bitserve "
                    f"understands ({SCHEMA_VERSION})"
                )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target]:
                    db.execute(statement)
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (target,))

    def schema_version(self) -> int:
        with self._lock:
            (version,) = self._db.execute("SELECT MAX(version) FROM schema_version").fetchone()
        return int(version)

    @staticmethod
    def _conversation(row: tuple[object, ...]) -> Conversation:
        seq, cid, owner, created_at, metadata, count = row
        return Conversation(
            id=str(cid),
            owner=str(owner),
            created_at=float(created_at),  # type: ignore[arg-type]
            metadata={
                repaired_text(k): repaired_text(v) for k, v in json.loads(str(metadata)).items()
            },
            seq=int(seq),  # type: ignore[call-overload]
            num_messages=int(count),  # type: ignore[call-overload]
        )

    @staticmethod
    def _message(row: tuple[Any, ...]) -> StoredMessage:
        """A row of ``_MESSAGE_COLUMNS`` → ``StoredMessage``."""
        idx, role, content, created_at, tokens, prompt, completion, finish, ids = row
        return StoredMessage(
            idx, role, repaired_text(content), created_at, tokens, prompt, completion, finish,
            unpack_token_ids(ids),
        )  # fmt: skip

    def _row(self, db: sqlite3.Connection, owner: str, conversation_id: str) -> Conversation:
        row = db.execute(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations c WHERE c.id = ? AND c.owner = ?",
            (conversation_id, owner),
        ).fetchone()
        if row is None:
            raise ConversationNotFoundError(conversation_id)
        return self._conversation(row)

    @staticmethod
    def _insert_messages(
        db: sqlite3.Connection, seq: int, first_index: int, messages: Sequence[NewMessage]
    ) -> list[StoredMessage]:
        stored = []
        created_at = now()
        for i, m in enumerate(messages, start=first_index):
            db.execute(
                f"INSERT INTO messages (conversation_seq, {_MESSAGE_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, i, m.role, m.content, created_at, m.tokens, m.prompt_tokens,
                 m.completion_tokens, m.finish_reason, pack_token_ids(m.token_ids)),
            )  # fmt: skip
            stored.append(
                StoredMessage(
                    i, m.role, m.content, created_at, m.tokens, m.prompt_tokens,
                    m.completion_tokens, m.finish_reason, m.token_ids,
                )
            )  # fmt: skip
        return stored

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
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_seq = ? ORDER BY idx",
                (conv.seq,),
            ).fetchall()
        return conv, [self._message(row) for row in rows]

    def list_conversations(
        self, owner: str, limit: int = 20, after: str | None = None
    ) -> ConversationPage:
        with self._lock:
            before_seq = self._row(self._db, owner, after).seq if after else None
            rows = self._db.execute(
                f"SELECT {_CONVERSATION_COLUMNS} FROM conversations c WHERE c.owner = ? "
                "AND (? IS NULL OR c.seq < ?) ORDER BY c.seq DESC LIMIT ?",
                (owner, before_seq, before_seq, limit + 1),
            ).fetchall()
        conversations = [self._conversation(r) for r in rows]
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
