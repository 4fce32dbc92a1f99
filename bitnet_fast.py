#!/usr/bin/env python3
"""The BitNet API guide's launcher: ``python3 bitnet_fast.py -m <model.gguf> --port 8081``.

Exactly ``bitserve serve`` with the same flags (``-m``, ``--port``, ``--host``,
``--threads``, ``--ctx-size``, ``--max-queue``, ``--db``, ``--api-key`` ...).
"""

from __future__ import annotations

import sys

from bitserve.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
