"""Start the real server process (``python -m bitserve.cli serve`` or ``bitnet_fast.py``)
for the end-to-end tests; always stopped by the caller's fixture."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import httpx

from bitserve.api.process import SERVE_COMMAND, ServerProcess, start_server

REPO = Path(__file__).resolve().parents[2]
Server = ServerProcess


def start(
    workdir: Path, *args: str, db: Path | None = None, launcher: Sequence[str] | None = None
) -> Server:
    """Run the server on a free port with ``--db`` (default ``workdir/conversations.db``)
    and wait for ``/health``; fails with the server's output if it never gets there.
    ``BITSERVE_CACHE`` is inherited: the session's temporary cache."""
    db_args = ["--db", str(db or workdir / "conversations.db")]
    return start_server([*db_args, *args], workdir, launcher=launcher or SERVE_COMMAND)


def metric(url: str, name: str, headers: dict[str, str] | None = None) -> float:
    """One unlabelled value from ``/metrics``."""
    for line in httpx.get(f"{url}/metrics", headers=headers, timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")
