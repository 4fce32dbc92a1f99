"""Start the real server process (``python -m bitserve.cli serve`` or ``bitnet_fast.py``)
for the end-to-end tests; always stopped by the caller's fixture."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(
    workdir: Path, *args: str, db: Path | None = None, launcher: Sequence[str] | None = None
) -> Server:
    """Run the server on a free port with ``--db`` (default ``workdir/conversations.db``)
    and wait for ``/health``; fails with the server's output if it never gets there."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / f"server-{port}.log"
    command = list(launcher or [sys.executable, "-m", "bitserve.cli", "serve"])
    command += ["--port", str(port), "--db", str(db or workdir / "conversations.db"), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # BITSERVE_CACHE: the session's tmp dir
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop()
    raise AssertionError(f"server never became healthy:\n{server.log()}")


def metric(url: str, name: str, headers: dict[str, str] | None = None) -> float:
    """One unlabelled value from ``/metrics``."""
    for line in httpx.get(f"{url}/metrics", headers=headers, timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")
