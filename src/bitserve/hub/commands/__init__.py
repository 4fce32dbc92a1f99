"""``bitserve pull | models | rm``: one module per command (``add_arguments`` + ``run``)."""

from __future__ import annotations

import sys


def say(command: str, message: str) -> None:
    """A progress or error sentence on stderr, prefixed like every bitserve command's."""
    print(f"bitserve {command}: {message}", file=sys.stderr, flush=True)
