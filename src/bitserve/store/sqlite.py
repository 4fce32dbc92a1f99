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

import contextlib
import errno
import resource
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bitserve.store.base import StorageFullError, StoreError, StoreUnavailableError
from bitserve.store.sql import Connection, SQLStore

SQLITE_BUSY = 5  # "database is locked": another process holds a write lock
SQLITE_LOCKED = 6
SQLITE_READONLY = 8  # "attempt to write a readonly database"
SQLITE_IOERR = 10  # "disk I/O error"
SQLITE_FULL = 13  # "database or disk is full": the disk, or PRAGMA max_page_count
SQLITE_CANTOPEN = 14
RETRY_AFTER_S = 2
# before Python 3.11 exposed the code, the messages say it
_MESSAGES = {
    "database is locked": SQLITE_BUSY,
    "readonly database": SQLITE_READONLY,
    "disk I/O error": SQLITE_IOERR,
    "database or disk is full": SQLITE_FULL,
    "unable to open database file": SQLITE_CANTOPEN,
}


def _code(exc: sqlite3.Error) -> int | None:
    """SQLite's primary result code of ``exc``."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return int(code) & 0xFF
    return next((c for text, c in _MESSAGES.items() if text in str(exc)), None)


def _file_size_limited() -> bool:
    """True when this process may not grow a file past a limit (``ulimit -f``): SQLite
    reports a write past it (EFBIG) as a disk I/O error, not as a full disk."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return soft != resource.RLIM_INFINITY


def _store_error(exc: sqlite3.Error | OSError, path: str) -> StoreError | None:
    """The store error a failed write or read is, or None for one that is a bug (SQL, a
    constraint): a full disk is ``StorageFullError``; a database another process holds
    locked, a file or disk made read-only and a failing disk are ``StoreUnavailableError``
    (503: retry once storage is back)."""
    if isinstance(exc, OSError):
        return StorageFullError(str(exc)) if exc.errno == errno.ENOSPC else None
    code = _code(exc)
    if code == SQLITE_FULL:
        return StorageFullError(str(exc))
    if code == SQLITE_IOERR and _file_size_limited():
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        return StorageFullError(f"{exc} at this process's file size limit ({limit} bytes)")
    reasons = {
        SQLITE_BUSY: f"{path} is locked by another process",
        SQLITE_LOCKED: f"{path} is locked by another process",
        SQLITE_READONLY: f"{path} cannot be written (a read-only file or disk)",
        SQLITE_IOERR: f"{path}: {exc}",
        SQLITE_CANTOPEN: f"{path} cannot be opened",
    }
    if code in reasons:
        return StoreUnavailableError(reasons[code], RETRY_AFTER_S)
    return None


class SQLiteStore(SQLStore):
    """The default ``ConversationStore``: one SQLite file at ``path`` (``":memory:"`` works
    for tests). Creates the schema on first use; refuses a newer schema version."""

    dialect = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self._renew = False  # storage trouble may have spoiled the connection
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._db = self._connect()
        except (sqlite3.Error, OSError) as exc:  # a folder, not SQLite, not writable
            raise StoreError(f"cannot open the conversation store {self.path}: {exc}") from exc
        self._migrate()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=5000")
        except BaseException:
            db.close()
            raise
        return db

    def _renewed(self) -> sqlite3.Connection:
        """(under the lock) The connection, a fresh one if storage trouble may have spoiled
        the last: SQLite opens a file it cannot write read-only and keeps it so, and a
        transaction whose ROLLBACK failed stays open. Only a write renews it (a read
        works read-only, and would leave a read-only connection in place of the next
        write's fresh one); if the file cannot be opened, the old one serves."""
        if self._renew and self.path != ":memory:":
            with contextlib.suppress(sqlite3.Error, OSError):
                fresh = self._connect()
                self._db.close()
                self._db, self._renew = fresh, False
        return self._db

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` under the lock; rolls back on any exception
        (a failed COMMIT included). Storage trouble is a store error (:func:`_store_error`):
        ``StorageFullError`` for a full disk, ``StoreUnavailableError`` for a database
        locked by another process, read-only or failing; the connection is then renewed,
        so the store works again once the storage does."""
        with self._lock, self._storage_errors():
            db = self._renewed()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        with self._lock, self._storage_errors():  # one connection: nothing runs between reads
            yield self._db

    @contextmanager
    def _storage_errors(self) -> Iterator[None]:
        """(under the lock) SQLite's storage errors → store errors, see :meth:`_writing`."""
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            error = _store_error(exc, self.path)
            locked = isinstance(exc, sqlite3.Error) and _code(exc) in (SQLITE_BUSY, SQLITE_LOCKED)
            if (isinstance(error, StoreUnavailableError) and not locked) or self._db.in_transaction:
                self._renew = True
            if error is None:
                raise
            raise error from exc

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
