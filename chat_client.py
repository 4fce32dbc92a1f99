#!/usr/bin/env python3
"""Seed-compatible launcher for the chat client: ``python3 chat_client.py [--url ...]``.

Same as ``bitserve chat``; works from a source checkout without installing bitserve (it
puts ``src/`` on the path when ``bitserve`` is not importable), given ``httpx``, the one
package the client needs.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import bitserve  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from bitserve.client.cli import main

if __name__ == "__main__":
    sys.exit(main())
