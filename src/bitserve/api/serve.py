"""``bitserve serve``: load the model, open the store, run the app under uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from bitserve.api.connections import AcceptErrorThrottle, head_timeout_protocol
from bitserve.api.edge import default_allowed_hosts
from bitserve.api.oracle.config import OracleConfig, OracleConfigError
from bitserve.api.settings import (
    DEFAULT_ALIASES,
    DEFAULT_CACHE_DISK_MB,
    DEFAULT_CACHE_RAM_MB,
    DEFAULT_HEAD_TIMEOUT_S,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BODY_MB,
    DEFAULT_MAX_QUEUE,
    DEFAULT_PORT,
    DEFAULT_SHUTDOWN_GRACE_S,
    ServerSettings,
    default_cache_dir,
    default_db_path,
    read_keys_file,
)

if TYPE_CHECKING:
    from bitserve.engine.loop import EngineLoop

log = logging.getLogger(__name__)

GIL_SWITCH_INTERVAL_S = 0.001


def without_password(db: str) -> str:
    """``postgresql://user:secret@host/db`` → ``postgresql://user:***@host/db`` (for logs)."""
    return re.sub(r"^(\w+://[^:/@]*):[^@/]*@", r"\1:***@", db)


def listen_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (taken, not an address of this machine),
    or None: a bind as uvicorn makes it (``SO_REUSEADDR``), released at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        return "address already in use" if exc.errno == errno.EADDRINUSE else str(exc)
    return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    from bitserve.engine.loader import add_runtime_arguments

    p.add_argument("-m", "--model", help="GGUF model file (default: the built-in demo model)")
    p.add_argument(
        "-hf",
        "--hf-repo",
        metavar="NAME",
        help="model from the Hugging Face Hub: catalog name, owner/repo or owner/repo:VARIANT "
        "(pulled and verified on first use, then served from disk without the network)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on")
    p.add_argument(
        "--no-webui",
        dest="webui",
        action="store_false",
        help="do not serve the web chat page at / (default: served)",
    )
    add_runtime_arguments(p)
    p.add_argument(
        "-c",
        "--ctx-size",
        type=int,
        help="context size in tokens, at most the model's (default: the model's)",
    )
    p.add_argument(
        "--max-queue", type=int, default=DEFAULT_MAX_QUEUE, help="waiting requests before 503"
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=DEFAULT_MAX_BATCH,
        help="sequences generated together (continuous batching)",
    )
    p.add_argument(
        "--cache-ram",
        type=int,
        default=DEFAULT_CACHE_RAM_MB,
        help="MB of KV kept for prefix reuse across requests (0: off)",
    )
    p.add_argument(
        "--cache-disk",
        type=int,
        default=DEFAULT_CACHE_DISK_MB,
        help="MB of prefix KV spilled to disk when evicted from RAM, and kept across "
        "restarts (0: off)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=default_cache_dir(),
        help="folder of the spilled KV files (a subfolder per model file)",
    )
    p.add_argument(
        "--db",
        default=os.environ.get("BITSERVE_DB") or str(default_db_path()),
        help="conversation store: an SQLite file, or a postgresql://user:password@host/dbname "
        "URL that several replicas share (needs bitserve[postgres]; default: $BITSERVE_DB, "
        "else an SQLite file in your data folder)",
    )
    p.add_argument(
        "--db-pool-size",
        type=int,
        default=0,
        help="PostgreSQL connections this replica keeps open; a chat turn holds one while it "
        "runs, and a turn that finds none free gets a 503 (default: --max-batch + 4; "
        "replicas x this must fit the server's max_connections)",
    )
    p.add_argument(
        "--replica-id",
        default=os.environ.get("BITSERVE_REPLICA_ID", ""),
        help="this replica's name in the X-Bitserve-Replica response header and the log "
        "(default: $BITSERVE_REPLICA_ID, else <hostname>:<port>)",
    )
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="accepted API key (repeatable; default: none, no key needed)",
    )
    p.add_argument("--api-keys-file", type=Path, help="file with one API key per line")
    p.add_argument(
        "--alias",
        action="append",
        default=list(DEFAULT_ALIASES),
        help=f"extra model name the model answers to (repeatable; default: "
        f"{', '.join(DEFAULT_ALIASES)}, kept when others are given)",
    )
    p.add_argument("--oracle-config", type=Path, help="oracle route config (JSON)")
    p.add_argument(
        "--max-body-mb",
        type=int,
        default=DEFAULT_MAX_BODY_MB,
        help="largest request body in MB; larger ones are refused unread (413)",
    )
    p.add_argument(
        "--max-input-chars",
        type=int,
        default=0,
        help="most characters of text (messages or prompt) one request may carry, refused "
        "before tokenizing (400; default 0: what the context could hold at most)",
    )
    p.add_argument(
        "--head-timeout",
        type=float,
        default=DEFAULT_HEAD_TIMEOUT_S,
        help="seconds a connection has to send its request head, and the longest pause "
        "while it sends a body, before it is closed",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=DEFAULT_SHUTDOWN_GRACE_S,
        help="seconds the replies in flight get to finish at SIGTERM or Ctrl-C; those still "
        "running then end with the 'server is stopping' error (default: %(default)s)",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        help="a Host name the server answers to besides localhost, IP addresses and "
        "--host (repeatable; '*': any; default: none). Others get 400: DNS rebinding protection",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        help="a browser origin allowed to call the API, e.g. https://app.example "
        "(repeatable; '*': any; default: none, no CORS headers)",
    )


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    from bitserve.engine.loader import runtime_options

    keys = list(args.api_key)
    if args.api_keys_file is not None:
        from_file = read_keys_file(args.api_keys_file)
        if not from_file:  # keys were meant: never start open because a file is empty
            raise ValueError(f"--api-keys-file {args.api_keys_file} holds no keys")
        keys += from_file
    return ServerSettings(
        host=args.host,
        port=args.port,
        webui=args.webui,
        model_path=args.model,
        **runtime_options(args),
        ctx_size=args.ctx_size,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        cache_ram_mb=args.cache_ram,
        cache_disk_mb=args.cache_disk,
        cache_dir=args.cache_dir,
        db_path=args.db,
        db_pool_size=args.db_pool_size,
        api_keys=tuple(keys),
        aliases=tuple(dict.fromkeys(args.alias)),
        oracle=OracleConfig.load(args.oracle_config),
        max_body_mb=args.max_body_mb,
        max_input_chars=args.max_input_chars,
        head_timeout_s=args.head_timeout,
        shutdown_grace_s=args.shutdown_grace,
        allowed_hosts=default_allowed_hosts(args.host, args.allowed_host),
        cors_origins=tuple(args.cors_origin),
        replica=args.replica_id,
    )


def run(args: argparse.Namespace) -> int:

    from bitserve.api.app import create_app
    from bitserve.api.served import ServedModel
    from bitserve.api.system import REPLICA_HEADER
    from bitserve.engine.loader import load_model
    from bitserve.store import StoreError, open_store

    if args.hf_repo is not None:
        from bitserve.hub.commands.pull import pull_for_serve

        if args.model is not None:
            print("bitserve serve: pass -m FILE or -hf NAME, not both", file=sys.stderr)
            return 2
        args.model = pull_for_serve(args.hf_repo)
        if args.model is None:
            return 1
        args.alias = [*args.alias, args.hf_repo]  # requests may name it as it was served
    try:
        settings = settings_from_args(args)
        settings.check()
    except (OSError, ValueError, OracleConfigError) as exc:  # ValueError: a flag's range
        print(f"bitserve serve: {exc}", file=sys.stderr)
        return 2
    problem = listen_problem(settings.host, settings.port)
    if problem is not None:  # before loading the model, and before printing the page's URL
        print(f"bitserve serve: cannot listen on {settings.host}:{settings.port}: {problem}",
              file=sys.stderr)  # fmt: skip
        return 1
    try:  # before the model: a bad --db is said at once, not after a long load
        store = open_store(settings.db_path, settings.db_connections)
    except StoreError as exc:  # no psycopg, a newer schema, no database within 30 s,
        print(f"bitserve serve: {exc}", file=sys.stderr)  # not SQLite, not writable
        return 1
    try:
        loaded = load_model(
            settings.model_path, settings.threads, settings.kernel, settings.head, settings.mmap
        )
    except (OSError, ValueError) as exc:  # a missing or malformed model file (GGUFError)
        store.close()
        print(f"bitserve serve: {exc}", file=sys.stderr)
        return 2
    if loaded.is_demo:
        from bitserve.model.demo import DEMO_NOTICE

        print(f"bitserve serve: {DEMO_NOTICE}", file=sys.stderr)
    try:
        served = ServedModel.create(
            loaded,
            settings.max_queue,
            settings.ctx_size,
            settings.aliases,
            int(time.time()),
            max_batch=settings.max_batch,
            cache_ram_mb=settings.cache_ram_mb,
            cache_disk_mb=settings.cache_disk_mb,
            cache_dir=settings.cache_dir,
            max_input_chars=settings.max_input_chars,
        )
    except OSError as exc:  # --cache-dir cannot be created
        store.close()
        print(f"bitserve serve: {exc}", file=sys.stderr)
        return 1
    app = create_app(settings, served, store)
    print(
        f"bitserve serve: {loaded.name} ({served.ctx_size} ctx) on "
        f"http://{settings.host}:{settings.port} as replica {settings.replica_name}, "
        f"conversations in {without_password(str(settings.db_path))}",
        file=sys.stderr,
    )
    if settings.webui:
        from bitserve.webui import browser_url

        print(
            f"bitserve serve: open {browser_url(settings.host, settings.port)} in a browser",
            file=sys.stderr,
        )
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=level,
        timeout_graceful_shutdown=5,
        http=head_timeout_protocol(
            settings.head_timeout_s,
            app.state.http_metrics.count_unrouted,
            [(REPLICA_HEADER.lower().encode(), settings.replica_name.encode())],
        ),
    )
    server = _Server(config, served.engine, settings.shutdown_grace_s)
    asyncio.run(_serve(server))  # the lifespan writes the prefix cache
    return 0


class _Server(uvicorn.Server):
    """uvicorn's server, whose shutdown (Ctrl-C, SIGTERM) stops taking connections, gives
    the replies in flight ``grace`` seconds to finish, then stops the engine: what still
    runs ends at once with the "server is stopping" error (an SSE error event, or a
    503), so its connection closes. Left to uvicorn, a reply longer than its graceful
    timeout was cancelled with a traceback, its stream cut with no event."""

    def __init__(self, config: uvicorn.Config, engine: EngineLoop[Any], grace: float) -> None:
        super().__init__(config)
        self._engine, self._grace = engine, grace

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # no new connections while the replies finish
        deadline = time.monotonic() + self._grace
        while self._busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(self._engine.stop)  # it joins the engine thread
        await super().shutdown(sockets)

    def _busy(self) -> bool:
        return self._engine.stats.running or self._engine.queue_depth > 0


async def _serve(server: uvicorn.Server) -> None:
    """uvicorn's ``Server.serve`` with accept failures (out of file descriptors) logged
    once per interval instead of once per attempt.

    The GIL switch interval drops from 5 ms to 1 ms: the event loop shares the GIL with
    the engine thread and the workers that tokenize and fit histories, and it should get
    it back within a millisecond to answer ``/health`` or a token; the heavy work (the
    kernels, the tokenizer) releases the GIL anyway."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    AcceptErrorThrottle().install(asyncio.get_running_loop())
    await server.serve()
