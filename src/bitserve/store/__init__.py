"""Conversation storage: SQLite by default, PostgreSQL for several replicas."""

from bitserve.store.base import (
    Conversation,
    ConversationNotFoundError,
    ConversationPage,
    ConversationStore,
    InvalidTextError,
    NewMessage,
    StorageFullError,
    StoredMessage,
    StoreError,
)
from bitserve.store.sqlite import SQLiteStore

__all__ = [
    "Conversation",
    "ConversationNotFoundError",
    "ConversationPage",
    "ConversationStore",
    "InvalidTextError",
    "NewMessage",
    "SQLiteStore",
    "StorageFullError",
    "StoreError",
    "StoredMessage",
]
