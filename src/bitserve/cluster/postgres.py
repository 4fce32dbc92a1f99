"""A throwaway PostgreSQL server on 127.0.0.1: ``initdb`` into a fresh folder, then
``postgres`` as a child process, for the local cluster, its benchmark and the tests.

PostgreSQL refuses to run as root. Run by root (as CI is), both programs run as the
unprivileged ``postgres`` user that Debian's package creates (``setpriv`` switches to it
and then *is* the server, so its pid is ours to signal); the data folder lives in a
temporary folder of its own under the system's temporary directory, owned by that user.
Anyone else runs them as themselves.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bitserve.api.process import free_port, stop_process

DATABASE = "bitserve"
USER = "bitserve"  # the superuser initdb creates (trust authentication on loopback only)
SERVICE_USER = "postgres"  # whom root runs the server as
START_TIMEOUT_S = 30.0


class PostgresError(RuntimeError):
    """PostgreSQL is missing, or did not start; the message says which and why."""


def find_bindir() -> Path:
    """The folder of ``initdb`` and ``postgres``: on ``PATH``, else Debian's newest
    ``/usr/lib/postgresql/<version>/bin``."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent  # Debian links them from elsewhere
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3])
    )
    if not versions:
        raise PostgresError(
            "PostgreSQL is not installed (no initdb): install the 'postgresql' package "
            "(scripts/system-deps does)"
        )
    return versions[-1].parent


def _run_as() -> list[str]:
    """The command prefix that drops root to :data:`SERVICE_USER` (nothing for others)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise PostgresError(
            f"running as root, PostgreSQL needs the unprivileged user {SERVICE_USER!r} "
            "(Debian's postgresql package creates it)"
        ) from None
    return ["setpriv", f"--reuid={SERVICE_USER}", f"--regid={SERVICE_USER}", "--init-groups"]


@dataclass
class PostgresServer:
    """A PostgreSQL server over ``directory`` (data in ``directory/data``, its log in
    ``directory/postgres.log``) on ``127.0.0.1:port``. :meth:`start` and :meth:`stop` may
    be called again and again (the tests stop it under load and start it again)."""

    directory: Path
    port: int
    durable: bool = True  # False: no fsync (tests: a stop is always a clean shutdown)
    bindir: Path = field(default_factory=find_bindir)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def log_path(self) -> Path:
        return self.directory / "postgres.log"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def init(self) -> None:
        """``initdb`` (trust authentication; the server listens on loopback only)."""
        data = self.directory / "data"
        self._run([str(self.bindir / "initdb"), "-D", str(data), "-U", USER, "-A", "trust",
                   "-E", "UTF8", "--no-sync"])  # fmt: skip

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the server and wait until it accepts connections."""
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.directory),
        }
        if not self.durable:
            settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        command = [*_run_as(), str(self.bindir / "postgres"), "-D", str(self.directory / "data")]
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while self._run([str(self.bindir / "pg_isready"), "-q", *self._where()], check=False):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise PostgresError(f"PostgreSQL did not start:\n{self.log_tail()}")
            time.sleep(0.1)

    def create_database(self) -> None:
        self._run([str(self.bindir / "createdb"), *self._where(), DATABASE])

    def stop(self) -> None:
        """Fast shutdown (SIGINT: sessions are cut, open transactions roll back)."""
        process, self.process = self.process, None
        if process is not None:
            stop_process(process, signal.SIGINT, timeout_s=30)

    def remove(self) -> None:
        """Stop, then delete the data folder."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _where(self) -> list[str]:
        return ["-h", "127.0.0.1", "-p", str(self.port), "-U", USER]

    def _run(self, command: list[str], check: bool = True) -> int:
        done = subprocess.run(
            [*_run_as(), *command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False
        )
        if check and done.returncode:
            raise PostgresError(f"{Path(command[0]).name} failed:\n{done.stdout.decode()}")
        return done.returncode

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def start_postgres(port: int | None = None, durable: bool = True) -> PostgresServer:
    """A new, running server with an empty ``bitserve`` database; :meth:`~PostgresServer.
    remove` (or ``with``) stops it and deletes its files."""
    bindir = find_bindir()
    run_as = _run_as()
    parent = Path(tempfile.gettempdir())
    if run_as and not parent.stat().st_mode & 0o001:
        parent = Path("/tmp")  # $TMPDIR is root's alone: the server user could not enter it
    directory = Path(tempfile.mkdtemp(prefix="bitserve-postgres-", dir=parent))
    if run_as:
        user = pwd.getpwnam(SERVICE_USER)
        os.chown(directory, user.pw_uid, user.pw_gid)
    server = PostgresServer(directory, port or free_port(), durable, bindir)
    try:
        server.init()
        server.start()
        server.create_database()
    except BaseException:
        server.remove()
        raise
    return server
