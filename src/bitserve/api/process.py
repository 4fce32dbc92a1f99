"""``bitserve serve`` as a child process on a free loopback port, ready once it answers
``/health``. The serving benchmarks and the end-to-end tests drive the real server this
way; whoever starts one stops it (``with`` or :meth:`ServerProcess.stop`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

SERVE_COMMAND = (sys.executable, "-m", "bitserve.cli", "serve")
STARTUP_TIMEOUT_S = 120.0


class ServerStartError(RuntimeError):
    """The server exited, or never answered ``/health``; the message ends with its log."""


def stop_process(
    process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout_s: float = 15.0
) -> None:
    """Send ``sig`` (the program's own way to stop) unless it already exited; kill it if
    it is still running ``timeout_s`` later. Returns once it is reaped."""
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """A running server: its base ``url``, the process, and the file its output goes to."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log()[-chars:]

    def kill9(self) -> None:
        """Kill without warning (a crash), and reap the process."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """Terminate (then kill after 15 s) unless it already exited."""
        stop_process(self.process)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    args: Sequence[str],
    workdir: Path,
    *,
    launcher: Sequence[str] = SERVE_COMMAND,
    env: Mapping[str, str] | None = None,
    timeout_s: float = STARTUP_TIMEOUT_S,
) -> ServerProcess:
    """Run ``launcher --port <free> *args`` in ``workdir`` (output to
    ``workdir/server-<port>.log``) and return once ``/health`` answers 200. Raises
    :class:`ServerStartError` (with the log) if it exits or times out; it is stopped then."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / f"server-{port}.log"
    command = [*launcher, "--port", str(port), *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=workdir
        )
    server = ServerProcess(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerStartError(f"the server exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop()
    raise ServerStartError(
        f"the server did not answer /health in {timeout_s:.0f} s:\n{server.log()}"
    )
