"""Start the real ``bitserve serve`` process on the demo model for the acceptance tests,
and run the real chat client against it (as a subprocess or through a pseudo-terminal)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from bitserve.api import process
from bitserve.api.process import ServerProcess
from bitserve.api.process import free_port as free_port  # for test_cancellation

REPO = Path(__file__).resolve().parents[2]
CHAT_CLIENT = REPO / "chat_client.py"
STARTUP_TIMEOUT_S = 180.0


def start_server(workdir: Path, extra_args: Sequence[str] = ()) -> ServerProcess:
    """Run ``python -m bitserve.cli serve --port <free> --db <tmp>`` and wait for /health.

    Fails (never skips) with the server's output if it exits or never becomes healthy.
    """
    env = {"BITSERVE_CACHE": os.environ.get("BITSERVE_CACHE", str(workdir))}
    args = ["--db", str(workdir / "conversations.db"), *extra_args]
    return process.start_server(args, workdir, env=env, timeout_s=STARTUP_TIMEOUT_S)


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
