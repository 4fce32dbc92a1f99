"""``bitserve rm NAME``: delete a pulled model's file from the Hugging Face cache (unless
another pulled name still uses the same file) and forget it; a process that still has the
file open or mapped (a running ``bitserve serve``) is named, as its space returns only
when that process exits."""

from __future__ import annotations

import argparse

from bitserve.hub.commands import say


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the name `bitserve models` lists (or its repository or file)")


def run(args: argparse.Namespace) -> int:
    from bitserve.hub import PullError, Registry
    from bitserve.hub.errors import format_size
    from bitserve.hub.holders import holders_of
    from bitserve.hub.pull import remove_cached_file

    try:
        registry = Registry.default()
        record = registry.find(args.name)
        others = [r.name for r in registry.users_of(record.path) if r.name != record.name]
        existed = record.exists()
        holders = holders_of(record.path) if existed and not others else []
        if not others and existed:  # first: a file bitserve will not delete keeps its record
            remove_cached_file(record.path)
        registry.remove(record.name)
    except PullError as exc:  # unknown or ambiguous name, an unreadable list
        say("rm", str(exc))
        return 1
    except OSError as exc:  # the cache or the list not writable
        say("rm", f"cannot remove {args.name}: {exc}")
        return 1
    if others:
        say("rm", f"forgot {record.name}; its file stays, as {', '.join(others)} uses it too")
    elif not existed:
        say("rm", f"forgot {record.name}; its file was already gone")
    elif holders:
        held = ", ".join(f"{h.pid} ({h.command})" for h in holders)
        who = f"process {held} exits" if len(holders) == 1 else f"processes {held} exit"
        say(
            "rm",
            f"removed {record.name}; its {format_size(record.size)} return to the disk only "
            f"when {who}, as the file is still open there",
        )
    else:
        say("rm", f"removed {record.name} ({format_size(record.size)} freed)")
    return 0
