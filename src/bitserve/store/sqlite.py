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

The schema, its migrations, the row helpers and every method of the interface are shared
with the PostgreSQL store (:mod:`bitserve.store.schema`, :class:`~bitserve.store.sql.SQLStore`):
this module holds only SQLite's connection, transactions and disk-full errors.
"""

from __future__ import annotations

import errno
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bitserve.store.base import StorageFullError, StoreError
from bitserve.store.sql import Connection, SQLStore

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


class SQLiteStore(SQLStore):
    """The default ``ConversationStore``: one SQLite file at ``path`` (``":memory:"`` works
    for tests). Creates the schema on first use; refuses a newer schema version."""

    dialect = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
        except (sqlite3.Error, OSError) as exc:  # a folder, not SQLite, not writable
            raise StoreError(f"cannot open the conversation store {self.path}: {exc}") from exc
        self._migrate()

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
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

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        with self._lock:  # one connection: nothing else runs between the reads
            yield self._db

    def _next_seq(self, conn: Connection) -> int:
        last = conn.execute("SELECT seq FROM sqlite_sequence WHERE name='conversations'")
        row = last.fetchone()
        return (int(row[0]) if row else 0) + 1

    def _migrate(self) -> None:
        """Create the schema or bring an older one up to ``SCHEMA_VERSION``, in one
        transaction (a failed migration leaves the file as it was)."""
        with self._writing() as db:
            exists = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'"
            ).fetchone()
            self._create_or_migrate(db, exists is not None, self.path)

    def close(self) -> None:
        with self._lock:
            self._db.close()
