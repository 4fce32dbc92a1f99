"""``KVSpill``: prefix-cache entries kept on disk, for idle conversations and restarts.

When the prefix cache evicts an entry for room, :meth:`KVSpill.save` writes its tokens and
the valid keys/values to one file under ``directory/<model_key>/``. A later request whose
prompt shares a prefix with such an entry (:meth:`KVSpill.best`) reads it back
(:meth:`KVSpill.load`) instead of recomputing the history: ~20 ms per 100 MB read against
seconds of prompt processing. A loaded entry's file is deleted (the entry now lives in RAM,
and comes back to the prefix cache, longer, when its request finishes).

File layout (little endian), ``n = length``::

    header   HEADER: magic, format version, dtype code, n_layers, n_kv_heads, head_dim,
             n, crc32 of the payload, crc32 of the header fields + token bytes
    tokens   int64 [n]
    payload  K [n_layers, n_kv_heads, n, head_dim], then V (same shape, the cache's dtype):
             the cache's head-major runs, each written and read without a copy

A file is written to a temporary name, fsync'ed and renamed (``os.replace``), so a crash
leaves either the whole file or a temporary one (deleted at the next start). A folder is
one process's (:func:`take_folder`): a second server on the same ``--cache-dir`` and model
takes ``<model_key>-2``, so neither deletes the other's files. A file whose
size, magic, version, header checksum or payload checksum does not match is logged,
deleted and never loaded. ``model_key`` (:func:`spill_key`) names the model file and the
KV layout, so a restart with the same model rebuilds the index from the files and files of
another model are never read.

Threads: every method is called by the engine thread. Writing ~100 MB (checksum, write,
fsync) takes ~0.1 s, so files are written by one background writer thread; until its file
is complete an entry's cache stays alive (and counted in its ``KVMemory``), and is
released by the engine thread at its next call. :meth:`load` of an entry still being
written waits for that write. The writer never touches a cache's memory counter.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import queue
import struct
import threading
import uuid
import weakref
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from bitserve.engine.prefix_cache import is_prefix, longest_prefix
from bitserve.model.kv_cache import KVCache

log = logging.getLogger(__name__)

MAGIC = b"BSKVSPIL"
FORMAT_VERSION = 2  # 2: head-major payload
HEADER = struct.Struct("<8sIIIIIQII")  # magic, version, dtype, layout x3, n, crc x2
DTYPE_CODES: dict[np.dtype, int] = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}
SUFFIX = ".kv"
TMP_SUFFIX = ".tmp"
LOCK_NAME = ".lock"
MAX_FOLDERS = 16  # servers using one --cache-dir for one model at once


class SpillFileError(ValueError):
    """A spill file that is truncated, foreign or corrupt (it is deleted, never loaded)."""


def spill_key(model_path: str | Path, dtype: np.dtype | str, layout: tuple[int, ...]) -> str:
    """Names a model file and KV layout: sha256 of the resolved path, size, mtime_ns, the
    KV dtype and ``(n_layers, n_kv_heads, head_dim)`` (first 16 hex digits)."""
    path = Path(model_path).resolve()
    st = path.stat()
    text = f"{path}|{st.st_size}|{st.st_mtime_ns}|{np.dtype(dtype).name}|{layout}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(slots=True)
class SpillHeader:
    """What a file's header says; ``nbytes`` is the exact size the file must have."""

    dtype: np.dtype
    layout: tuple[int, int, int]
    length: int
    payload_crc: int

    @property
    def layer_bytes(self) -> int:
        """Bytes of one layer's keys (or values): ``length * n_kv_heads * head_dim``."""
        return self.length * self.layout[1] * self.layout[2] * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return HEADER.size + 8 * self.length + 2 * self.layout[0] * self.layer_bytes


def _pack_header(head: SpillHeader, tokens: np.ndarray) -> bytes:
    fields = (MAGIC, FORMAT_VERSION, DTYPE_CODES[head.dtype], *head.layout, head.length)
    body = HEADER.pack(*fields, head.payload_crc, 0)[: HEADER.size - 4]
    return body + struct.pack("<I", zlib.crc32(tokens.tobytes(), zlib.crc32(body)))


def read_header(f: BinaryIO, file_size: int) -> tuple[SpillHeader, np.ndarray]:
    """The header and tokens of an open spill file; :class:`SpillFileError` unless the
    magic, version, dtype, size and header checksum all match."""
    raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise SpillFileError("shorter than a header")
    magic, version, code, n_layers, n_kv, head_dim, n, payload_crc, crc = HEADER.unpack(raw)
    dtypes = {c: d for d, c in DTYPE_CODES.items()}
    if magic != MAGIC or version != FORMAT_VERSION or code not in dtypes:
        raise SpillFileError("not a bitserve KV spill file of this version")
    head = SpillHeader(dtypes[code], (n_layers, n_kv, head_dim), n, payload_crc)
    if head.nbytes != file_size:
        raise SpillFileError(f"{file_size} bytes, expected {head.nbytes}")
    tokens = np.frombuffer(f.read(8 * n), dtype="<i8").astype(np.int64)
    if zlib.crc32(tokens.tobytes(), zlib.crc32(raw[:-4])) != crc:
        raise SpillFileError("header checksum mismatch")
    return head, tokens


def _head_runs(cache: KVCache, n: int) -> Iterator[np.ndarray]:
    """K of every layer, head by head, then V: contiguous ``[n, head_dim]`` views."""
    for arr in (cache.k, cache.v):
        for layer in range(arr.shape[0]):
            for head in range(arr.shape[2]):
                yield arr[layer, :n, head]


def write_file(path: Path, tokens: np.ndarray, cache: KVCache) -> Path:
    """Write ``tokens [cache.length]`` and the cache's valid K/V to ``path``'s temporary
    name (header last, once the payload checksum is known), fsync'ed. Returns that name."""
    n = cache.length
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
    toks = np.ascontiguousarray(tokens[:n], dtype="<i8")
    with open(tmp, "wb") as f:
        f.seek(HEADER.size)
        f.write(toks.tobytes())
        crc = 0
        for part in _head_runs(cache, n):
            crc = zlib.crc32(part.data, crc)
            f.write(part.data)
        layout = (cache.layout[0], cache.layout[1], cache.layout[2])
        f.seek(0)
        f.write(_pack_header(SpillHeader(cache.dtype, layout, n, crc), toks))
        f.flush()
        os.fsync(f.fileno())
    return tmp


def read_into(path: Path, cache: KVCache, expect_tokens: np.ndarray) -> None:
    """Fill the empty ``cache`` from ``path`` (all its positions, payload checksum
    checked); the file must hold ``expect_tokens`` and the cache's dtype and layout."""
    with open(path, "rb", buffering=0) as f:
        head, tokens = read_header(f, os.fstat(f.fileno()).st_size)
        if head.dtype != cache.dtype or head.layout != cache.layout:
            raise SpillFileError(f"holds {head.dtype} {head.layout}, not the model's KV")
        if not np.array_equal(tokens, expect_tokens):
            raise SpillFileError("tokens changed since the index was read")
        cache.check_room(head.length)
        crc = 0
        for part in _head_runs(cache, head.length):
            view = part.data.cast("B")
            if f.readinto(view) != len(view):
                raise SpillFileError("truncated payload")
            crc = zlib.crc32(view, crc)
        if crc != head.payload_crc:
            raise SpillFileError("payload checksum mismatch")
    cache.advance(head.length)


@dataclass(slots=True, eq=False)
class SpillEntry:
    """``tokens [n]`` (int64) stored in ``path`` (``nbytes`` on disk), reusable by
    requests of ``scope`` only (it is in the file's name: ``<scope>.<id>.kv``, or
    ``<id>.kv`` for the empty scope); ``write`` is set while the background writer has not
    finished the file."""

    tokens: np.ndarray
    path: Path
    nbytes: int
    last_used: int
    write: PendingWrite | None = None
    scope: str = ""


def _scope_of(path: Path) -> str:
    """The scope a spill file's name holds (see :class:`SpillEntry`)."""
    stem = path.name[: -len(SUFFIX)]
    return stem.rsplit(".", 1)[0] if "." in stem else ""


def _scoped_name(scope: str) -> str:
    """A new file name for an entry of ``scope`` (scopes are hex fingerprints or "")."""
    unique = uuid.uuid4().hex
    return f"{scope}.{unique}{SUFFIX}" if scope else f"{unique}{SUFFIX}"


@dataclass(slots=True, eq=False)
class PendingWrite:
    """One file for the writer: ``cache`` stays alive (untouched) until ``done``."""

    entry: SpillEntry
    cache: KVCache
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False  # the entry was evicted before its file was complete
    failed: bool = False


def take_folder(root: Path, model_key: str) -> tuple[Path, int]:
    """``root/model_key``, or while other processes hold it ``root/model_key-2``, ``-3``...,
    made if missing, and the descriptor that holds it: an exclusive ``flock`` on its
    ``.lock``, which ends with the process however it ends, so a restart takes its folder
    (and files) back. Two servers in one folder deleted each other's files: a start
    deletes the temporary files it finds, and each evicts the files its index holds."""
    for i in range(1, MAX_FOLDERS + 1):
        folder = root / (model_key if i == 1 else f"{model_key}-{i}")
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_NAME, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        if i > 1:
            log.info("%s is another server's: spilling KV to %s", root / model_key, folder)
        return folder, fd
    raise OSError(f"{root / model_key}: {MAX_FOLDERS} servers already spill KV there")


class KVSpill:
    """Entries on disk within ``budget_bytes`` (LRU by file), under ``directory/model_key``.

    Invariant: ``nbytes == sum(e.nbytes for e in entries) <= budget_bytes`` after every
    call; ``entries`` mirrors the complete and pending files. Engine thread only, except
    the writer thread (``background=True``), which only writes files of pending entries.
    """

    def __init__(
        self, directory: str | Path, budget_bytes: int, model_key: str, background: bool = True
    ) -> None:
        self.directory, lock = take_folder(Path(directory), model_key)
        self._let_folder_go = weakref.finalize(self, os.close, lock)  # at close() or GC
        self.budget_bytes = budget_bytes
        self.background = background
        self.entries: list[SpillEntry] = []
        self.nbytes = 0  # a plain int: safe to read from other threads (metrics)
        self._clock = 0
        self._lock = threading.Lock()  # orders a write's rename against its cancellation
        self._jobs: queue.Queue[PendingWrite | None] = queue.Queue()
        self._written: deque[PendingWrite] = deque()
        self._thread: threading.Thread | None = None
        # called (writer thread) after each background write: the engine schedules reap()
        # on its thread, so a written cache is released even if the engine is idle
        self.on_written: Callable[[], None] | None = None
        self._scan()

    def __len__(self) -> int:
        return len(self.entries)

    # -- index ------------------------------------------------------------------------------

    def _scan(self) -> None:
        """Rebuild the index from the files (oldest first by mtime); temporary files left
        by a crash and bad files are deleted."""
        for tmp in self.directory.glob(f".*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
        found = []
        for path in self.directory.glob(f"*{SUFFIX}"):
            try:
                with open(path, "rb") as f:
                    st = os.fstat(f.fileno())
                    _, tokens = read_header(f, st.st_size)
            except (OSError, SpillFileError) as exc:
                self._discard(path, exc)
                continue
            found.append((st.st_mtime_ns, path, tokens, st.st_size))
        for _, path, tokens, size in sorted(found, key=lambda t: t[0]):
            self._add(SpillEntry(tokens, path, size, 0, scope=_scope_of(path)))
        self._evict()

    def _add(self, entry: SpillEntry) -> None:
        self._clock += 1
        entry.last_used = self._clock
        self.entries.append(entry)
        self.nbytes += entry.nbytes

    def _remove(self, entry: SpillEntry, delete: bool = True) -> None:
        self.entries.remove(entry)
        self.nbytes -= entry.nbytes
        if delete:
            with self._lock:
                if entry.write is not None:
                    entry.write.cancelled = True
                entry.path.unlink(missing_ok=True)

    @staticmethod
    def _discard(path: Path, exc: Exception) -> None:
        log.warning("ignoring KV spill file %s (%s); deleted", path, exc)
        path.unlink(missing_ok=True)

    def _evict(self) -> None:
        while self.nbytes > self.budget_bytes and self.entries:
            self._remove(min(self.entries, key=lambda e: e.last_used))

    # -- the engine's calls -----------------------------------------------------------------

    def save(self, tokens: np.ndarray, cache: KVCache, scope: str = "") -> bool:
        """Spill ``cache`` (the KV of ``tokens[:cache.length]``, for ``scope``), taking
        ownership: it is released once written (or at once if it cannot be). Entries of
        the scope that are a prefix of it are superseded and deleted; the oldest go until
        the budget holds. False if not saved (empty, or larger than the whole budget)."""
        self.reap()
        ids = np.asarray(tokens, dtype=np.int64)[: cache.length]
        layout = (cache.layout[0], cache.layout[1], cache.layout[2])
        size = SpillHeader(cache.dtype, layout, cache.length, 0).nbytes
        if cache.length == 0 or size > self.budget_bytes:
            cache.release()
            return False
        self.discard_prefixes_of(ids, scope)
        entry = SpillEntry(ids, self.directory / _scoped_name(scope), size, 0, scope=scope)
        self._add(entry)
        entry.write = PendingWrite(entry, cache)
        self._evict()
        if self.background:
            self._start_writer()
            self._jobs.put(entry.write)
        else:
            self._write(entry.write)
            self.reap()
        return True

    def discard_prefixes_of(self, tokens: np.ndarray, scope: str = "") -> None:
        """Delete the entries of ``scope`` whose tokens are a prefix of ``tokens``
        (superseded)."""
        for old in self.entries[:]:
            if old.scope == scope and is_prefix(old.tokens, tokens):
                self._remove(old)

    def best(
        self, tokens: list[int] | np.ndarray, scope: str = ""
    ) -> tuple[SpillEntry | None, int]:
        """The entry of ``scope`` sharing the longest prefix with ``tokens`` and that
        length (``(None, 0)`` if none shares a token)."""
        self.reap()
        return longest_prefix(self.entries, np.asarray(tokens, dtype=np.int64), scope)

    def load(
        self, entry: SpillEntry, n: int, make_cache: Callable[[], KVCache], keep: bool = False
    ) -> KVCache | None:
        """``entry``'s KV in a fresh cache from ``make_cache()``, truncated (and trimmed)
        to ``n``. The entry leaves the index and its
        file is deleted, unless ``keep`` (a copy of a few shared positions: the entry stays
        for its own conversation). None (with a warning) if the file proves unreadable."""
        if entry.write is not None:
            entry.write.done.wait()
            self.reap()
        if entry not in self.entries:  # its write failed
            return None
        cache = make_cache()
        try:
            read_into(entry.path, cache, entry.tokens)
        except (OSError, SpillFileError) as exc:
            cache.release()
            self._remove(entry, delete=False)
            self._discard(entry.path, exc)
            return None
        if not keep:
            self._remove(entry)
        cache.truncate(min(n, cache.length))
        cache.trim()
        return cache

    def flush(self) -> None:
        """Wait until every pending file is written, and release their caches."""
        if self._thread is not None:
            self._jobs.join()
        self.reap()

    def close(self) -> None:
        """Finish the pending writes, stop the writer thread and let the folder go (files
        stay)."""
        self.flush()
        thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            thread.join()
        self._let_folder_go()

    # -- the writer ---------------------------------------------------------------------------

    def _start_writer(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._writer, name="kv-spill", daemon=True)
            self._thread.start()

    def _writer(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._write(job)
            finally:
                self._jobs.task_done()
            if self.on_written is not None:
                self.on_written()
        self._jobs.task_done()

    def _write(self, job: PendingWrite) -> None:
        """Write ``job``'s file unless cancelled; runs on the writer thread."""
        path, tmp = job.entry.path, None
        try:
            if not job.cancelled:
                tmp = write_file(path, job.entry.tokens, job.cache)
            with self._lock:
                if tmp is not None and not job.cancelled:
                    os.replace(tmp, path)
                    tmp = None
        except OSError as exc:
            log.warning("could not write KV spill file %s: %s", path, exc)
            job.failed = True
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            self._written.append(job)
            job.done.set()

    def reap(self) -> None:
        """Release the caches of finished writes (engine thread: the caches' memory
        counter is the engine's); forget entries whose write failed."""
        while self._written:
            job = self._written.popleft()
            job.cache.release()
            job.entry.write = None
            if job.failed and job.entry in self.entries:
                self._remove(job.entry)
