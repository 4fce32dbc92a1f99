"""Start the real ``bitserve serve`` process on the demo model for the acceptance tests,
and run the real chat client against it (as a subprocess or through a pseudo-terminal)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
CHAT_CLIENT = REPO / "chat_client.py"
STARTUP_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class ServerProcess:
    """A running server: ``url``, its process, and the file its output goes to."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(workdir: Path, extra_args: Sequence[str] = ()) -> ServerProcess:
    """Run ``python -m bitserve.cli serve --port <free> --db <tmp>`` and wait for /health.

    Fails (never skips) with the server's output if it exits or never becomes healthy.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / "server.log"
    args = [sys.executable, "-m", "bitserve.cli", "serve", "--port", str(port)]
    args += ["--db", str(workdir / "conversations.db"), *extra_args]
    env = {**os.environ, "BITSERVE_CACHE": os.environ.get("BITSERVE_CACHE", str(workdir))}
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    server = ServerProcess(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            code = process.returncode
            raise AssertionError(f"the server exited with {code}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise AssertionError(f"the server did not become healthy:\n{server.log_tail()}")


def client_env(home: Path) -> dict[str, str]:
    """The environment for a client process: its readline history under ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BITSERVE_")}
    env.update(HOME=str(home), XDG_STATE_HOME=str(home / "state"), TERM="dumb")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def client_args(url: str, *extra: str) -> list[str]:
    return [str(CHAT_CLIENT), "--url", url, *extra]


def run_piped(
    url: str, stdin: str, home: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python chat_client.py`` with ``stdin`` piped in; captures stdout and stderr.
    ``env`` adds variables to the client's environment."""
    return subprocess.run(
        [sys.executable, *client_args(url, *extra)],
        input=stdin,
        capture_output=True,
        text=True,
        env={**client_env(home), **(env or {})},
        timeout=120,
        check=False,
    )
