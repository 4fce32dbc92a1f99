"""``bitserve convert SOURCE OUT.gguf``: a Hugging Face ternary checkpoint (a local folder,
or a repository id fetched into the Hugging Face cache) → GGUF."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def say(message: str) -> None:
    print(f"bitserve convert: {message}", file=sys.stderr, flush=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="checkpoint folder, or a Hugging Face repository (owner/name)")
    p.add_argument("out", type=Path, help="the GGUF file to write")
    p.add_argument("--revision", help="repository revision (branch, tag or commit; default main)")
    p.add_argument("--name", help="general.name of the model (default: the source's name)")
    p.add_argument(
        "--offline",
        action="store_true",
        help="use only files already downloaded (as HF_HUB_OFFLINE=1)",
    )


def run(args: argparse.Namespace) -> int:
    from bitserve.convert import Checkpoint, CheckpointError, convert_checkpoint
    from bitserve.hub import HubOptions, Puller, PullError, Registry
    from bitserve.hub.errors import format_size
    from bitserve.hub.snapshot import fetch_checkpoint
    from bitserve.hub.spec import is_repo_id

    source = Path(args.source).expanduser()
    try:
        if not source.is_dir():
            if not is_repo_id(args.source) or source.exists():
                say(f"{args.source} is neither a checkpoint folder nor a repository (owner/name)")
                return 2
            puller = Puller(HubOptions.from_env(args.offline), Registry.default(), say)
            source = fetch_checkpoint(puller, args.source, args.revision)
        checkpoint = Checkpoint(source)
        name = args.name or (args.source if not Path(args.source).is_dir() else None)
        report = convert_checkpoint(checkpoint, args.out, name=name)
    except (PullError, CheckpointError) as exc:
        say(str(exc))
        return 1
    except OSError as exc:
        say(f"cannot write {args.out}: {exc.strerror or exc}")
        return 1
    kinds = f"{report.n_i2s} I2_S" + (f", {report.n_tq2_0} TQ2_0" if report.n_tq2_0 else "")
    say(
        f"wrote {report.path} ({report.arch}, {report.n_tensors} tensors: {kinds}; "
        f"{format_size(report.path.stat().st_size)})"
    )
    return 0
