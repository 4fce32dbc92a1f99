"""``bitserve rm NAME``: delete a pulled model's file from the Hugging Face cache (unless
another pulled name still uses the same file) and forget it."""

from __future__ import annotations

import argparse

from bitserve.hub.commands import say


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the name `bitserve models` lists (or its repository or file)")


def run(args: argparse.Namespace) -> int:
    from bitserve.hub import Registry
    from bitserve.hub.errors import UnknownModelError, format_size
    from bitserve.hub.pull import remove_cached_file

    registry = Registry.default()
    record = registry.find(args.name)
    if record is None:
        say("rm", str(UnknownModelError(args.name)))
        return 1
    others = [r.name for r in registry.users_of(record.path) if r.name != record.name]
    registry.remove(record.name)
    if others:
        say("rm", f"forgot {record.name}; its file stays, as {', '.join(others)} uses it too")
        return 0
    remove_cached_file(record.path)
    say("rm", f"removed {record.name} ({format_size(record.size)} freed)")
    return 0
