"""Server settings: everything ``bitserve serve`` can be told, as one frozen dataclass."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from bitserve.api.oracle.config import OracleConfig

DEFAULT_PORT = 8081
DEFAULT_MAX_QUEUE = 16
DEFAULT_MAX_BATCH = 16  # sequences decoded together in one step
DEFAULT_CACHE_RAM_MB = 2048  # prefix (KV) cache budget; 0 turns it off
DEFAULT_CACHE_DISK_MB = 0  # prefix cache entries spilled to disk; 0 (the default) turns it off
DEFAULT_ALIASES = ("bitnet",)
DEFAULT_MAX_BODY_MB = 8  # request bodies; a 128k-token prompt is well under 1 MB of JSON
DEFAULT_SHUTDOWN_GRACE_S = 5.0  # replies in flight at SIGTERM get this long to finish
DEFAULT_HEAD_TIMEOUT_S = 10.0  # a connection must send its request head within this
DB_POOL_SPARE = 4  # PostgreSQL connections beyond one per running turn: reads, short writes


def default_db_path() -> Path:
    """``$XDG_DATA_HOME/bitserve/conversations.db`` (``~/.local/share`` by default)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "bitserve" / "conversations.db"


def default_cache_dir() -> Path:
    """``kv`` next to the default conversation store: where spilled KV caches go."""
    return default_db_path().parent / "kv"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """``api_keys`` empty means no authentication. ``ctx_size`` None means the model's
    context length. ``aliases`` are extra ``model`` names the local model answers to.
    ``max_batch`` sequences run together; ``cache_ram_mb`` bounds the prefix KV cache in
    RAM, ``cache_disk_mb`` its entries spilled to files under ``cache_dir`` (0: none).

    Limits: ``max_body_mb`` per request body (413); ``max_input_chars`` of text per
    request (0: what the context could hold); ``head_timeout_s`` for a request head to
    arrive. ``allowed_hosts``: the ``Host`` names answered (``"*"``: any; ``bitserve
    serve`` sets the loopback names, ``--host`` and ``--allowed-host``); ``cors_origins``:
    browser origins allowed to call the API (none: no CORS headers).
    ``db_path`` is an SQLite file or a ``postgresql://`` URL (several replicas share one
    database); ``db_pool_size`` is how many connections a PostgreSQL store keeps open (0:
    ``max_batch`` + 4, see :attr:`db_connections`). ``replica`` names this process in the
    ``X-Bitserve-Replica`` header of every response ("" means ``<hostname>:<port>``)."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    webui: bool = True  # the chat page at / (``--no-webui``: off)
    model_path: str | None = None
    threads: int | None = None
    kernel: str | None = None
    head: str = "f16"  # LM head: "f16" (the file's) or "int8" (made at load)
    mmap: bool = False  # weights: the file's shared map, not a private huge-page copy
    ctx_size: int | None = None
    max_queue: int = DEFAULT_MAX_QUEUE
    max_batch: int = DEFAULT_MAX_BATCH
    cache_ram_mb: int = DEFAULT_CACHE_RAM_MB
    cache_disk_mb: int = DEFAULT_CACHE_DISK_MB
    cache_dir: Path = field(default_factory=default_cache_dir)
    db_path: Path | str = field(default_factory=default_db_path)
    db_pool_size: int = 0
    api_keys: tuple[str, ...] = ()
    aliases: tuple[str, ...] = DEFAULT_ALIASES
    oracle: OracleConfig = field(default_factory=OracleConfig.builtin)
    max_body_mb: int = DEFAULT_MAX_BODY_MB
    max_input_chars: int = 0
    head_timeout_s: float = DEFAULT_HEAD_TIMEOUT_S
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S
    allowed_hosts: tuple[str, ...] = ("*",)
    cors_origins: tuple[str, ...] = ()
    replica: str = ""

    def check(self) -> None:
        """Every limit in its range, or a ``ValueError`` naming the flag and its range."""
        ranges: list[tuple[str, int, int]] = [
            ("--max-queue", self.max_queue, 1),
            ("--max-batch", self.max_batch, 1),
            ("--max-body-mb", self.max_body_mb, 1),
            ("--max-input-chars", self.max_input_chars, 0),
            ("--cache-ram", self.cache_ram_mb, 0),
            ("--cache-disk", self.cache_disk_mb, 0),
            ("--db-pool-size", self.db_pool_size, 0),
        ]
        if self.ctx_size is not None:
            ranges.append(("--ctx-size", self.ctx_size, 1))
        for flag, value, low in ranges:
            if value < low:
                raise ValueError(f"{flag} must be at least {low}, got {value}")
        if not 1 <= self.port <= 65535:  # 0 would print a URL nobody can open
            raise ValueError(f"--port must be from 1 to 65535, got {self.port}")
        if not self.head_timeout_s > 0:  # NaN too
            raise ValueError(f"--head-timeout must be more than 0, got {self.head_timeout_s}")
        if not self.shutdown_grace_s >= 0:
            raise ValueError(f"--shutdown-grace must be 0 or more, got {self.shutdown_grace_s}")
        for n, key in enumerate(self.api_keys, 1):
            if not is_sendable_key(key):  # the key itself is never shown: it may be real
                raise ValueError(
                    f"--api-key / --api-keys-file: key {n} of {len(self.api_keys)} cannot be "
                    "a key: keys must be non-empty printable ASCII with no spaces (a client "
                    "sends 'Authorization: Bearer <key>')"
                )

    @property
    def max_body_bytes(self) -> int:
        return self.max_body_mb * 2**20

    @property
    def db_connections(self) -> int:
        """PostgreSQL connections this replica keeps open: ``db_pool_size``, by default one
        for each turn the engine runs at once and 4 for the short reads and writes. Turns
        queued beyond them get a 503; replicas x this must fit the server's
        ``max_connections`` (100 by default: 3 replicas x 20 do)."""
        return self.db_pool_size or self.max_batch + DB_POOL_SPARE

    @property
    def replica_name(self) -> str:
        return self.replica or f"{socket.gethostname()}:{self.port}"


def is_sendable_key(key: str) -> bool:
    """Whether every client can send ``key`` as ``Bearer <key>``: non-empty printable
    ASCII with no spaces. ``--api-key "$KEY"`` with ``KEY`` unset must not let a bare
    ``Bearer`` in, and a header is not UTF-8 (the server reads it as Latin-1, the
    ``openai`` SDK cannot send anything but ASCII), so a key with ``é`` in it would match
    only some clients' bytes."""
    return bool(key) and key.isascii() and key.isprintable() and " " not in key


def read_keys_file(path: str | Path) -> list[str]:
    """One key per line; blank lines and ``#`` comments ignored (and a byte order mark,
    which would otherwise start the first key)."""
    keys = []
    for line in Path(path).read_text(encoding="utf-8-sig").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(line)
    return keys
