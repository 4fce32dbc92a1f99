"""`bitserve serve | chat | generate | bench | pull | models | rm | convert`: the command line.

Each command lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``. Only the chosen command's module is imported, so ``bitserve chat``
never loads numpy or the engine, and ``bitserve generate`` never loads the web stack.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

# command → (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("bitserve.api.serve", "run the HTTP server (OpenAI, llama.cpp and conversation API)"),
    "chat": ("bitserve.client.cli", "interactive chat with a running bitserve server"),
    "generate": ("bitserve.engine.generate_cli", "generate text from a prompt, streamed"),
    "bench": ("bitserve.bench", "measure prompt/generation speed against memory bandwidth"),
    "pull": ("bitserve.hub.commands.pull", "download a model from the Hugging Face Hub, verified"),
    "models": ("bitserve.hub.commands.models", "list the downloaded models (--verify: re-hash)"),
    "rm": ("bitserve.hub.commands.rm", "delete a downloaded model"),
    "convert": ("bitserve.convert.cli", "convert a Hugging Face ternary checkpoint to GGUF"),
}


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to every option's help unless the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if "default" in help_text.lower() or action.default in (None, argparse.SUPPRESS):
            return help_text
        return super()._get_help_string(action)


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitserve",
        description="A fast, CPU-first chat server for BitNet b1.58 (ternary) models.",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        help="logging level (default: WARNING)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            formatter_class=_DefaultsFormatter,
        )
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def _command_name(argv: list[str]) -> str | None:
    """The first word that is neither an option nor the value of ``--log-level``."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--log-level":
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def main(argv: Sequence[str] | None = None) -> int:
    try:  # Ctrl-C while a command's modules load (numpy, the kernels) is no traceback either
        return _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `bitserve models | head`: the reader left early, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # quiet the final flush
        return 0


def _main(argv: list[str]) -> int:
    command = _command_name(argv)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    # bitserve's own kernels (with their own thread pool) do the heavy maths; BLAS threads
    # would only spin beside them on the same cores. Must be set before numpy is imported.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
