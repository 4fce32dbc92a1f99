"""`bitserve chat`: the interactive terminal client (HTTP only; never imports the engine).

Exit status: 0 on exit/Ctrl-D/end of piped input, 1 when the server cannot be used (down,
wrong URL, bad key, unknown conversation) or, with piped input, after any error; 2 for a
malformed command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from urllib.parse import urlsplit

from bitserve.client.api_client import ConversationAPI, ReplyOptions
from bitserve.client.errors import ChatClientError
from bitserve.client.line_input import LineInput, PipedInput, TerminalInput, history_path
from bitserve.client.session import ChatSession

__all__ = ["DEFAULT_URL", "add_arguments", "main", "run"]

DEFAULT_URL = "http://127.0.0.1:8081"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The chat options. Unset options are left out of ``args`` (``SUPPRESS``) so help shows
    no "(default: None)" and never prints the key from the environment."""
    parser.add_argument(
        "--url",
        default=os.environ.get("BITSERVE_URL", DEFAULT_URL),
        help="server address (env BITSERVE_URL)",
    )
    unset = argparse.SUPPRESS
    parser.add_argument(
        "--api-key", default=unset, help="API key sent as a Bearer token (env BITSERVE_API_KEY)"
    )
    parser.add_argument(
        "--conversation",
        metavar="ID",
        default=unset,
        help="resume this conversation instead of starting one",
    )
    parser.add_argument(
        "--temperature", type=float, default=unset, help="sampling temperature (server default)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=unset, help="longest reply in tokens (server default)"
    )
    parser.add_argument(
        "--system", default=unset, help="system prompt for conversations this client starts"
    )


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a server address, or ``None`` if it can."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"The server URL {url!r} is not valid; it should look like {DEFAULT_URL}."
    try:
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        return f"The server URL {url!r} has an invalid port."
    return None


def _line_input() -> LineInput:
    if sys.stdin.isatty():
        return TerminalInput(history_path())
    return PipedInput(sys.stdin)


def run(args: argparse.Namespace) -> int:
    problem = url_problem(args.url)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    options = ReplyOptions(vars(args).get("temperature"), vars(args).get("max_tokens"))
    api_key = vars(args).get("api_key") or os.environ.get("BITSERVE_API_KEY") or None
    api = ConversationAPI(args.url, api_key=api_key)
    system, conversation = vars(args).get("system"), vars(args).get("conversation")
    lines = _line_input()
    session = ChatSession(api, lines, sys.stdout, sys.stderr, options, system=system)
    try:
        if conversation and system:
            session.info("Note: --system applies only to new conversations, not the resumed one.")
        session.start(conversation)
        return session.run()
    except ChatClientError as error:
        session.error(str(error))
        return 1
    finally:
        lines.close()
        api.close()


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m bitserve.client.cli``, ``chat_client.py``)."""
    parser = argparse.ArgumentParser(
        prog="bitserve chat",
        description="Interactive chat with a running bitserve server.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
