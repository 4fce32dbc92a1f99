"""The one schema of the conversation store, written once and rendered for each database.

SQLite and PostgreSQL hold the same tables, columns and migrations; only a few type names
and clauses differ, so the statements below use placeholders (``$REAL``, ``$BLOB``, ...)
that :func:`render` fills from :data:`DIALECTS`. A new database gets :data:`SCHEMA_V1`
and then every migration in order, the same path an old one takes, so both end up
identical. Version 2 adds ``messages.token_ids`` (the generated ids of an assistant reply,
little-endian uint32; NULL for messages stored before it and for user/system messages).
Version 3 adds what tools and reasoning need: ``messages.tool_calls`` (an assistant
message's calls, a JSON array of ``{"id", "name", "arguments"}``, ASCII), ``tool_call_id``
(the call a ``role="tool"`` message answers) and ``reasoning_content`` (an assistant's
``<think>`` text); all NULL where they do not apply.

The row helpers here (column lists, :func:`message_from_row`, :func:`message_values`) are
shared too, so both stores read and write a message the same way.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from string import Template
from typing import Any

from bitserve.store.base import (
    Conversation,
    NewMessage,
    StoredMessage,
    StoreError,
    ToolCall,
    repaired_text,
)

SCHEMA_VERSION = 3

_SCHEMA_V1 = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE conversations (
    seq        $SEQ_KEY,
    id         TEXT NOT NULL UNIQUE,
    owner      TEXT NOT NULL,
    created_at $REAL NOT NULL,
    metadata   TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX conversations_by_owner ON conversations (owner, seq);
CREATE TABLE messages (
    conversation_seq  $SEQ NOT NULL REFERENCES conversations (seq) ON DELETE CASCADE,
    idx               INTEGER NOT NULL,
    role              TEXT NOT NULL,
    content           $FREE_TEXT NOT NULL,
    created_at        $REAL NOT NULL,
    tokens            INTEGER NOT NULL,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    finish_reason     TEXT,
    PRIMARY KEY (conversation_seq, idx)
)$WITHOUT_ROWID;
"""

# version → the statements that bring the previous version to it
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: ("ALTER TABLE messages ADD COLUMN token_ids $BLOB",),
    3: (
        "ALTER TABLE messages ADD COLUMN tool_calls TEXT",
        "ALTER TABLE messages ADD COLUMN tool_call_id $FREE_TEXT",
        "ALTER TABLE messages ADD COLUMN reasoning_content $FREE_TEXT",
    ),
}

# What differs between the databases. PostgreSQL's REAL is 4 bytes: unix times need 8.
# FREE_TEXT holds what people and models write: PostgreSQL's TEXT cannot hold a NUL
# character (a model can generate one), so there it is UTF-8 in a BYTEA.
DIALECTS: dict[str, dict[str, str]] = {
    "sqlite": {
        "SEQ_KEY": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "SEQ": "INTEGER",
        "REAL": "REAL",
        "BLOB": "BLOB",
        "FREE_TEXT": "TEXT",
        "WITHOUT_ROWID": " WITHOUT ROWID",
    },
    "postgresql": {
        "SEQ_KEY": "BIGSERIAL PRIMARY KEY",
        "SEQ": "BIGINT",
        "REAL": "DOUBLE PRECISION",
        "BLOB": "BYTEA",
        "FREE_TEXT": "BYTEA",
        "WITHOUT_ROWID": "",
    },
}


def render(statement: str, dialect: str) -> str:
    """``statement`` with its ``$PLACEHOLDERS`` filled for ``dialect``."""
    return Template(statement).substitute(DIALECTS[dialect])


def schema_statements(dialect: str) -> list[str]:
    """The statements creating schema version 1, one per entry."""
    return [s.strip() for s in render(_SCHEMA_V1, dialect).split(";") if s.strip()]


def migrations(dialect: str) -> dict[int, tuple[str, ...]]:
    """version → the statements that bring the previous version to it."""
    return {v: tuple(render(s, dialect) for s in ss) for v, ss in _MIGRATIONS.items()}


def check_version(version: int, where: str) -> None:
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{where}: schema version {version} is newer than this bitserve understands "
            f"({SCHEMA_VERSION})"
        )


# -- rows ---------------------------------------------------------------------------------------

MESSAGE_COLUMNS = (
    "idx, role, content, created_at, tokens, prompt_tokens, completion_tokens, finish_reason, "
    "token_ids, tool_calls, tool_call_id, reasoning_content"
)
NUM_MESSAGE_COLUMNS = MESSAGE_COLUMNS.count(",") + 1
CONVERSATION_COLUMNS = (
    "c.seq, c.id, c.owner, c.created_at, c.metadata, "
    "(SELECT COUNT(*) FROM messages m WHERE m.conversation_seq = c.seq)"
)


def pack_token_ids(ids: tuple[int, ...] | None) -> bytes | None:
    """Token ids → the ``token_ids`` column (little-endian uint32); None stays NULL."""
    return None if ids is None else struct.pack(f"<{len(ids)}I", *ids)


def unpack_token_ids(blob: bytes | None) -> tuple[int, ...] | None:
    if blob is None:
        return None
    blob = bytes(blob)  # PostgreSQL may hand back a memoryview
    if len(blob) % 4:
        raise StoreError(f"corrupt token_ids column ({len(blob)} bytes)")
    return struct.unpack(f"<{len(blob) // 4}I", blob)


def pack_tool_calls(calls: tuple[ToolCall, ...]) -> str | None:
    """Tool calls → the ``tool_calls`` column (a JSON array, ASCII); none stays NULL."""
    if not calls:
        return None
    return json.dumps([{"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls])


def unpack_tool_calls(text: str | None) -> tuple[ToolCall, ...]:
    if text is None:
        return ()
    try:
        return tuple(ToolCall(c["id"], c["name"], c["arguments"]) for c in json.loads(text))
    except (ValueError, TypeError, KeyError) as exc:
        raise StoreError(f"corrupt tool_calls column: {exc}") from exc


def conversation_from_row(row: Sequence[Any]) -> Conversation:
    """A row of :data:`CONVERSATION_COLUMNS` → ``Conversation``."""
    seq, cid, owner, created_at, metadata, count = row
    return Conversation(
        id=str(cid),
        owner=str(owner),
        created_at=float(created_at),
        metadata={repaired_text(k): repaired_text(v) for k, v in json.loads(str(metadata)).items()},
        seq=int(seq),
        num_messages=int(count),
    )


def free_text(value: str | bytes | memoryview) -> str:
    """A ``FREE_TEXT`` column's value as text (PostgreSQL hands back UTF-8 bytes); a lone
    surrogate stored before the stores refused them reads back as U+FFFD."""
    return repaired_text(value if isinstance(value, str) else bytes(value).decode("utf-8"))


def _free_text_or_none(value: str | bytes | memoryview | None) -> str | None:
    return None if value is None else free_text(value)


def message_from_row(row: Sequence[Any]) -> StoredMessage:
    """A row of :data:`MESSAGE_COLUMNS` → ``StoredMessage``."""
    idx, role, content, created_at, tokens, prompt, completion, finish, ids, *rest = row
    calls, call_id, reasoning = rest
    return StoredMessage(
        idx, role, free_text(content), created_at, tokens, prompt, completion, finish,
        unpack_token_ids(ids), unpack_tool_calls(calls), _free_text_or_none(call_id),
        _free_text_or_none(reasoning),
    )  # fmt: skip


def message_values(
    seq: int, index: int, m: NewMessage, created_at: float, dialect: str
) -> tuple[Any, ...]:
    """The values of ``conversation_seq`` and :data:`MESSAGE_COLUMNS` for one new message."""
    as_bytes = DIALECTS[dialect]["FREE_TEXT"] == "BYTEA"

    def free(text: str | None) -> str | bytes | None:
        return text.encode("utf-8") if as_bytes and text is not None else text

    return (seq, index, m.role, free(m.content), created_at, m.tokens, m.prompt_tokens,
            m.completion_tokens, m.finish_reason, pack_token_ids(m.token_ids),
            pack_tool_calls(m.tool_calls), free(m.tool_call_id),
            free(m.reasoning_content))  # fmt: skip


def stored_message(index: int, m: NewMessage, created_at: float) -> StoredMessage:
    """``m`` as it reads back once stored at ``index``."""
    return StoredMessage(
        index, m.role, m.content, created_at, m.tokens, m.prompt_tokens,
        m.completion_tokens, m.finish_reason, m.token_ids, m.tool_calls, m.tool_call_id,
        m.reasoning_content,
    )  # fmt: skip
