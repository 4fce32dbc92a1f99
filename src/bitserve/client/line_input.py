"""Where the user's lines come from: a terminal with readline, or a pipe.

On a terminal, :class:`TerminalInput` uses the stdlib ``readline`` (arrow keys, line
editing, history kept across sessions in the user's state directory). On a pipe,
:class:`PipedInput` reads one message per line and shows no prompt at all.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Protocol, TextIO

__all__ = ["LineInput", "PipedInput", "TerminalInput", "history_path"]

HISTORY_LENGTH = 1000


class LineInput(Protocol):
    """A source of lines. ``read()`` returns a line without its newline, or ``None`` at end
    of input (Ctrl-D / end of the pipe). On a terminal it may raise ``KeyboardInterrupt``
    (Ctrl-C at the prompt)."""

    interactive: bool

    def read(self, prompt: str) -> str | None: ...

    def close(self) -> None: ...


def history_path() -> Path:
    """The readline history file: ``$BITSERVE_CHAT_HISTORY``, else under the XDG state
    directory (``$XDG_STATE_HOME`` or ``~/.local/state``) as ``bitserve/chat_history``."""
    explicit = os.environ.get("BITSERVE_CHAT_HISTORY")
    if explicit:
        return Path(explicit)
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(state) / "bitserve" / "chat_history"


class TerminalInput:
    """Prompted input with line editing; history loaded at start and saved on close."""

    interactive = True

    def __init__(self, history_file: Path | None = None) -> None:
        self.history_file = history_file
        try:
            import readline
        except ImportError:  # no readline on this platform: plain input() still works
            self._readline = None
            return
        self._readline = readline
        readline.set_history_length(HISTORY_LENGTH)
        if history_file is not None:
            with contextlib.suppress(OSError):  # first run, or unreadable: start empty
                readline.read_history_file(history_file)

    def read(self, prompt: str) -> str | None:
        try:
            return input(prompt)
        except EOFError:
            return None

    def close(self) -> None:
        if self._readline is None or self.history_file is None:
            return
        try:
            self.history_file.parent.mkdir(parents=True, exist_ok=True)
            self._readline.write_history_file(self.history_file)
            self.history_file.chmod(0o600)  # what you typed is nobody else's business
        except OSError:
            pass  # history is a convenience; never fail the session over it


class PipedInput:
    """One message per line from a non-terminal stream; no prompts are shown."""

    interactive = False

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def read(self, prompt: str) -> str | None:
        line = self.stream.readline()
        if not line:
            return None
        # bytes that are not UTF-8 (read as lone surrogates) become U+FFFD: the request
        # carries text, and a surrogate cannot be encoded into it
        text = line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        return text.rstrip("\r\n")

    def close(self) -> None:
        return None
