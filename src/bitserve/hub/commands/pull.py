"""``bitserve pull NAME``: download a model (catalog name, ``owner/repo`` or
``owner/repo:VARIANT``) into the Hugging Face cache, verify it, print its path."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

from bitserve.hub.commands import say

if TYPE_CHECKING:
    from bitserve.hub.catalog import Catalog


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "name", nargs="?", help="catalog name (see --list), owner/repo or owner/repo:VARIANT"
    )
    p.add_argument(
        "--offline",
        action="store_true",
        help="never touch the network: use the copy already downloaded (as HF_HUB_OFFLINE=1)",
    )
    p.add_argument("--list", action="store_true", help="print the catalog and exit")


def run(args: argparse.Namespace) -> int:
    from bitserve.hub import Catalog, HubOptions, Puller, PullError, Registry, resolve
    from bitserve.hub.errors import format_size

    catalog = Catalog.load()
    if args.list:
        print_catalog(catalog)
        return 0
    if not args.name:
        say("pull", "name a model: a catalog name (bitserve pull --list), owner/repo[:VARIANT]")
        return 2
    try:
        puller = Puller(
            HubOptions.from_env(args.offline), Registry.default(), lambda m: say("pull", m)
        )
        record = puller.pull(resolve(args.name, catalog))
    except PullError as exc:
        say("pull", str(exc))
        return 1
    check = "sha256 verified" if record.verified else "not verified (no sha256 known)"
    say(
        "pull",
        f"{record.name}: {record.repo}/{record.filename}, {format_size(record.size)}, {check}",
    )
    print(record.path)
    return 0


def pull_for_serve(name: str) -> str | None:
    """The path of ``name`` for ``bitserve serve -hf``: the verified copy on disk without
    touching the network, else a pull; None (the reason printed) if it fails."""
    from bitserve.hub import Catalog, HubOptions, Puller, PullError, Registry, resolve
    from bitserve.hub.errors import NoNetworkError

    try:
        puller = Puller(HubOptions.from_env(), Registry.default(), lambda m: say("serve", m))
        return puller.ensure(resolve(name, Catalog.load())).path
    except NoNetworkError as exc:  # serve has no --offline, and the model is not on disk
        say(
            "serve",
            f"cannot reach the model hub at {exc.endpoint} ({exc.reason}); check the network "
            f"or proxy: {name} is not downloaded yet, and serve -hf downloads it before it "
            "starts",
        )
        return None
    except PullError as exc:
        say("serve", str(exc))
        return None


def print_catalog(catalog: Catalog) -> None:
    from bitserve.hub.errors import format_size

    rows = [("NAME", "FAMILY", "SIZE", "LICENCE", "REPOSITORY")]
    for e in catalog:
        size = format_size(e.size_bytes) if e.size_bytes else "?"
        rows.append((e.name, e.family, size, e.licence, f"{e.repo}/{e.file}"))
    print_table(rows)


def print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        print("  ".join(cells).rstrip())
