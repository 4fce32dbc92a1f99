"""What the SQLite and PostgreSQL stores share: every method of the interface, written once
over a DB-API connection and the one schema (:mod:`bitserve.store.schema`).

A store supplies only what differs between the databases: its transactions
(:meth:`SQLStore._writing`, one write transaction committed at the end and rolled back on
any exception; :meth:`SQLStore._reading`, reads that see one moment), the next
conversation number (:meth:`SQLStore._next_seq`) and, where several processes write one
database, the conversation's row lock taken before it changes (:meth:`SQLStore._lock_row`).
Statements are written with ``?`` parameters; PostgreSQL gets ``%s``.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Protocol

from bitserve.store.base import (
    Conversation,
    ConversationChangedError,
    ConversationNotFoundError,
    ConversationPage,
    ConversationStore,
    NewMessage,
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

SELECT_CONVERSATION = (
    f"SELECT {CONVERSATION_COLUMNS} FROM conversations c WHERE c.id = ? AND c.owner = ?"
)
SELECT_MESSAGES = f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_seq = ? ORDER BY idx"
INSERT_MESSAGE = (
    f"INSERT INTO messages (conversation_seq, {MESSAGE_COLUMNS}) "
    f"VALUES (?{', ?' * NUM_MESSAGE_COLUMNS})"
)
INSERT_CONVERSATION = (
    "INSERT INTO conversations (seq, id, owner, created_at, metadata) VALUES (?, ?, ?, ?, ?)"
)
INSERT_VERSION = "INSERT INTO schema_version (version) VALUES (?)"


def _check_id(conversation_id: str) -> None:
    """An id no conversation can have (a NUL character, which PostgreSQL's TEXT cannot
    even be asked about) is not found, as any other unknown id."""
    if "\x00" in conversation_id:
        raise ConversationNotFoundError(conversation_id)


class Cursor(Protocol):
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """The part of ``sqlite3.Connection`` and ``psycopg.Connection`` the stores use."""

    def execute(self, query: str, params: Sequence[Any] = ..., /) -> Cursor: ...


class SQLStore(ConversationStore):
    """The conversation logic of an SQL database holding :mod:`bitserve.store.schema`."""

    dialect: ClassVar[str]  # a key of schema.DIALECTS

    @abstractmethod
    def _writing(self) -> AbstractContextManager[Connection]:
        """One write transaction: committed at the end, rolled back on any exception."""

    @abstractmethod
    def _reading(self) -> AbstractContextManager[Connection]:
        """Reads that see one moment (a concurrent write is wholly in them or not at all)."""

    @abstractmethod
    def _next_seq(self, conn: Connection) -> int:
        """The ``seq`` of the conversation about to be created (never reused)."""

    def _lock_row(self, conn: Connection, owner: str, conversation_id: str) -> None:
        """Wait for and take the conversation's row lock before changing it. Nothing here:
        a database one process writes holds its whole write transaction alone."""

    def _sql(self, statement: str) -> str:
        return statement.replace("?", "%s") if self.dialect == "postgresql" else statement

    # -- statements, on a connection in a transaction --------------------------------------

    def _row(self, conn: Connection, owner: str, conversation_id: str) -> Conversation:
        _check_id(conversation_id)
        found = conn.execute(self._sql(SELECT_CONVERSATION), (conversation_id, owner)).fetchone()
        if found is None:
            raise ConversationNotFoundError(conversation_id)
        return conversation_from_row(found)

    def _locked_row(self, conn: Connection, owner: str, conversation_id: str) -> Conversation:
        """The row, read once its lock is held (so it holds every turn committed before)."""
        _check_id(conversation_id)
        self._lock_row(conn, owner, conversation_id)
        return self._row(conn, owner, conversation_id)

    def _messages(self, conn: Connection, seq: int) -> list[StoredMessage]:
        rows = conn.execute(self._sql(SELECT_MESSAGES), (seq,)).fetchall()
        return [message_from_row(r) for r in rows]

    def _insert_messages(
        self, conn: Connection, seq: int, first_index: int, messages: Sequence[NewMessage]
    ) -> list[StoredMessage]:
        created_at = now()
        insert = self._sql(INSERT_MESSAGE)
        for i, m in enumerate(messages, first_index):
            conn.execute(insert, message_values(seq, i, m, created_at, self.dialect))
        return [stored_message(i, m, created_at) for i, m in enumerate(messages, first_index)]

    def _create_or_migrate(self, conn: Connection, exists: bool, where: str) -> None:
        """Create the schema (``exists`` False) or bring an older one up to date, in the
        caller's transaction; refuse a newer one."""
        if not exists:
            for statement in schema_statements(self.dialect):
                conn.execute(statement)
            conn.execute(self._sql(INSERT_VERSION), (1,))
        version = self._version(conn)
        check_version(version, where)
        for target, statements in sorted(migrations(self.dialect).items()):
            if target > version:
                for statement in statements:
                    conn.execute(statement)
                conn.execute(self._sql(INSERT_VERSION), (target,))

    @staticmethod
    def _version(conn: Connection) -> int:
        row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def schema_version(self) -> int:
        with self._reading() as conn:
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
        with self._writing() as conn:
            seq = self._next_seq(conn)
            cid = new_conversation_id(int(created_at * 1000), seq - 1)
            values = (seq, cid, owner, created_at, json.dumps(metadata or {}))
            conn.execute(self._sql(INSERT_CONVERSATION), values)
            self._insert_messages(conn, seq, 0, messages)
            return self._row(conn, owner, cid)

    def get(self, owner: str, conversation_id: str) -> Conversation:
        with self._reading() as conn:
            return self._row(conn, owner, conversation_id)

    def messages(self, owner: str, conversation_id: str) -> list[StoredMessage]:
        return self.read(owner, conversation_id)[1]

    def read(self, owner: str, conversation_id: str) -> tuple[Conversation, list[StoredMessage]]:
        with self._reading() as conn:
            conv = self._row(conn, owner, conversation_id)
            return conv, self._messages(conn, conv.seq)

    def list_conversations(
        self, owner: str, limit: int = 20, after: str | None = None
    ) -> ConversationPage:
        query = f"SELECT {CONVERSATION_COLUMNS} FROM conversations c WHERE c.owner = ?"
        with self._reading() as conn:
            params: list[Any] = [owner]
            if after:
                query += " AND c.seq < ?"
                params.append(self._row(conn, owner, after).seq)
            params.append(limit + 1)
            query += " ORDER BY c.seq DESC LIMIT ?"
            rows = conn.execute(self._sql(query), params).fetchall()
        conversations = [conversation_from_row(r) for r in rows]
        return ConversationPage(conversations[:limit], has_more=len(conversations) > limit)

    def update_metadata(
        self, owner: str, conversation_id: str, metadata: dict[str, str]
    ) -> Conversation:
        check_texts(metadata)
        with self._writing() as conn:
            conv = self._locked_row(conn, owner, conversation_id)
            update = self._sql("UPDATE conversations SET metadata = ? WHERE seq = ?")
            conn.execute(update, (json.dumps(metadata), conv.seq))
            return self._row(conn, owner, conversation_id)

    def delete(self, owner: str, conversation_id: str) -> None:
        with self._writing() as conn:
            conv = self._locked_row(conn, owner, conversation_id)
            conn.execute(self._sql("DELETE FROM messages WHERE conversation_seq = ?"), (conv.seq,))
            conn.execute(self._sql("DELETE FROM conversations WHERE seq = ?"), (conv.seq,))

    def append_turn(
        self,
        owner: str,
        conversation_id: str,
        messages: Sequence[NewMessage],
        at: int | None = None,
    ) -> list[StoredMessage]:
        check_texts(None, messages)
        with self._writing() as conn:
            conv = self._locked_row(conn, owner, conversation_id)
            if at is not None and conv.num_messages != at:
                raise ConversationChangedError(conversation_id)
            return self._insert_messages(conn, conv.seq, conv.num_messages, messages)

    def replace_turn(
        self, owner: str, conversation_id: str, first: int, messages: Sequence[NewMessage]
    ) -> list[StoredMessage]:
        check_texts(None, messages)
        with self._writing() as conn:
            conv = self._locked_row(conn, owner, conversation_id)
            return self._replace_messages(conn, conv.seq, first, messages)

    def _replace_messages(
        self, conn: Connection, seq: int, first: int, messages: Sequence[NewMessage]
    ) -> list[StoredMessage]:
        delete = "DELETE FROM messages WHERE conversation_seq = ? AND idx >= ? AND idx < ?"
        conn.execute(self._sql(delete), (seq, first, first + len(messages)))
        return self._insert_messages(conn, seq, first, messages)
