"""``bitserve models [--verify]``: the models pulled so far, their size and whether their
bytes were checked; ``--verify`` hashes every file again."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from bitserve.hub.commands import say

if TYPE_CHECKING:
    from bitserve.hub.registry import Registry


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verify",
        action="store_true",
        help="hash every file again and compare with the hub's sha256 (exit 1 on a mismatch)",
    )


def run(args: argparse.Namespace) -> int:
    from bitserve.hub import PullError, Registry

    try:
        return _list(Registry.default(), args.verify)
    except PullError as exc:  # the list cannot be read (said, not shown as empty) or written
        say("models", str(exc))
        return 1


def _list(registry: Registry, verify: bool) -> int:
    from bitserve.hub.commands.pull import print_table
    from bitserve.hub.errors import format_size
    from bitserve.hub.pull import file_problem

    records = list(registry)
    if not records:
        say("models", "no models downloaded yet; `bitserve pull --list` shows the catalog")
        return 0
    failures = 0
    rows = [("NAME", "FAMILY", "SIZE", "VERIFIED", "SOURCE")]
    for record in records:
        status = "yes" if record.verified else "no"
        if not record.exists():
            status, failures = "MISSING", failures + 1
        elif verify:
            problem = file_problem(record.path, record.size, record.sha256)
            registry.put(record.with_verification(problem is None and record.sha256 is not None))
            if problem is not None:
                status, failures = "FAILED", failures + 1
                say(
                    "models",
                    f"{record.name}: {problem}; `bitserve rm {record.name}` then pull it again",
                )
            elif record.sha256 is None:
                status = "no sha256"
        rows.append(
            (
                record.name,
                record.family or "-",
                format_size(record.size),
                status,
                f"{record.repo}/{record.filename}",
            )
        )
    print_table(rows)
    return 1 if failures else 0
