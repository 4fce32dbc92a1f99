"""``bitserve convert SOURCE OUT.gguf``: a Hugging Face ternary checkpoint (a local folder,
or a repository id fetched into the Hugging Face cache) → GGUF."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def say(message: str) -> None:
    print(f"bitserve convert: {message}", file=sys.stderr, flush=True)


def _output_problem(out: Path, source: Path) -> str | None:
    """Why ``out`` must not be written: not a regular file (a device, a link, a folder),
    or a file of the checkpoint being read."""
    if out.is_symlink() or (out.exists() and not out.is_file()):
        return f"{out} exists and is not a regular file: refusing to replace it"
    if out.exists() and source.is_dir() and out.resolve().is_relative_to(source.resolve()):
        return f"{out} is a file of the checkpoint {source}: refusing to overwrite it"
    return None


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
    from safetensors import SafetensorError

    from bitserve.convert import Checkpoint, CheckpointError, convert_checkpoint
    from bitserve.hub import HubOptions, Puller, PullError, Registry
    from bitserve.hub.errors import format_size
    from bitserve.hub.snapshot import fetch_checkpoint
    from bitserve.hub.spec import is_repo_id

    source = Path(args.source).expanduser()
    problem = _output_problem(args.out, source)
    if problem is not None:
        say(problem)
        return 2
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
    except OSError as exc:  # a missing shard as much as a full disk: name the file
        where = exc.filename or args.out
        say(f"cannot {'write' if str(where) == str(args.out) else 'read'} {where}: "
            f"{exc.strerror or exc}")  # fmt: skip
        return 1
    except (SafetensorError, ValueError, TypeError, KeyError, AttributeError) as exc:
        # a checkpoint whose files or config hold what no converter could read (a
        # truncated safetensors file, a config value of the wrong type): one sentence
        say(f"cannot convert {args.source}: {type(exc).__name__}: {exc}")
        return 1
    kinds = f"{report.n_i2s} I2_S" + (f", {report.n_tq2_0} TQ2_0" if report.n_tq2_0 else "")
    say(
        f"wrote {report.path} ({report.arch}, {report.n_tensors} tensors: {kinds}; "
        f"{format_size(report.path.stat().st_size)})"
    )
    return 0
