"""Conversation storage: SQLite by default, PostgreSQL for several replicas."""

from pathlib import Path

from bitserve.store.base import (
    INTERRUPTED,
    Conversation,
    ConversationChangedError,
    ConversationNotFoundError,
    ConversationPage,
    ConversationStore,
    InvalidTextError,
    NewMessage,
    StorageFullError,
    StoredMessage,
    StoreError,
    StoreUnavailableError,
    ToolCall,
    Turn,
    TurnEndedError,
)
from bitserve.store.sqlite import SQLiteStore

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_store(db: str | Path, max_connections: int | None = None) -> ConversationStore:
    """The store ``db`` names: a ``postgresql://`` (or ``postgres://``) URL opens a
    :class:`~bitserve.store.postgres.PostgresStore` with at most ``max_connections``
    connections (needs the ``postgres`` extra); anything else is an SQLite file."""
    if not str(db).startswith(POSTGRES_SCHEMES):
        return SQLiteStore(db)
    try:
        from bitserve.store.postgres import DEFAULT_MAX_CONNECTIONS, PostgresStore
    except ImportError as exc:
        raise StoreError(
            f"a PostgreSQL store needs psycopg and psycopg_pool ({exc}): "
            "pip install 'bitserve[postgres]' (in a source checkout: pip install -e '.[postgres]')"
        ) from exc
    return PostgresStore(str(db), max_connections or DEFAULT_MAX_CONNECTIONS)


__all__ = [
    "INTERRUPTED",
    "Conversation",
    "ConversationChangedError",
    "ConversationNotFoundError",
    "ConversationPage",
    "ConversationStore",
    "InvalidTextError",
    "NewMessage",
    "SQLiteStore",
    "StorageFullError",
    "StoreError",
    "StoreUnavailableError",
    "StoredMessage",
    "ToolCall",
    "Turn",
    "TurnEndedError",
    "open_store",
]
