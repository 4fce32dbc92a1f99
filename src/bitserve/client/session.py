"""The chat loop: read a line, run a command or send it as a message, stream the reply.

Output discipline: replies and ``history`` go to ``out``; status lines (banner, "started
conversation ...") go to ``out`` on a terminal and to ``err`` when piped, so a script's
stdout holds only what it asked for; errors always go to ``err``, one sentence each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TextIO

from bitserve.client.api_client import ConversationAPI, ReplyOptions
from bitserve.client.errors import ChatClientError
from bitserve.client.line_input import LineInput

__all__ = ["COMMANDS", "ChatSession", "parse_command"]

PROMPT = "you> "
REPLY_PREFIX = "assistant> "
THINKING, THOUGHT = "\x1b[2m", "\x1b[0m"  # a reasoning model's thinking, dimmed (terminal only)
ROLE_LABELS = {"user": "you", "assistant": "assistant", "system": "system"}

# command → help text; a leading "/" is also accepted ("/new")
COMMANDS: dict[str, str] = {
    "help": "list these commands",
    "history": "show the conversation so far (as stored on the server)",
    "new": "start a new conversation",
    "exit": "leave (also: quit, Ctrl-D)",
}
ALIASES = {"quit": "exit", "?": "help"}


def parse_command(line: str) -> str | None:
    """The command a line names (``"exit"`` for ``quit``, ``/quit`` ...), or ``None`` when
    the line is a message. Commands are single words, case-insensitive."""
    word = line.strip().lower()
    word = word[1:] if word.startswith("/") else word
    word = ALIASES.get(word, word)
    return word if word in COMMANDS else None


class ChatSession:
    """One user's session with a server: the current conversation and the loop around it.

    Invariant after :meth:`start`: ``conversation_id`` names a conversation that existed on
    the server when it was last checked.
    """

    def __init__(
        self,
        api: ConversationAPI,
        lines: LineInput,
        out: TextIO,
        err: TextIO,
        options: ReplyOptions | None = None,
        system: str | None = None,
    ) -> None:
        self.api = api
        self.lines = lines
        self.out = out
        self.err = err
        self.options = options or ReplyOptions()
        self.system = system
        self.conversation_id: str | None = None
        self._handlers: dict[str, Callable[[], bool]] = {
            "help": self.show_help,
            "history": self.show_history,
            "new": self.new_conversation,
            "exit": lambda: False,
        }

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, conversation_id: str | None = None) -> None:
        """Resume ``conversation_id`` (checking it exists) or create a new conversation.
        Raises :class:`ChatClientError` if the server cannot be used."""
        if conversation_id is None:
            self.conversation_id = self.api.create_conversation(self.system)
            self.info(f"Connected to {self.api.base_url}; new conversation {self.conversation_id}.")
        else:
            count = len(self.api.get_messages(conversation_id))
            self.conversation_id = conversation_id
            self.info(
                f"Connected to {self.api.base_url}; resumed conversation {conversation_id}"
                f" ({count} message{'s' if count != 1 else ''} so far)."
            )
        if self.lines.interactive:
            self.info("Type a message, or 'help' for commands.")

    def run(self) -> int:
        """Read lines until exit; returns the process exit status (0, or 1 after an error
        that ends the session)."""
        while True:
            line = self._read_line()
            if line is None:
                return 0
            try:
                if not self.handle(line):
                    return 0
            except ChatClientError as error:
                self.error(str(error))
                if not (self.lines.interactive and error.recoverable):
                    return 1
            except KeyboardInterrupt:  # Ctrl-C while a command waits on the server
                if not self.lines.interactive:
                    raise
                self.api.reset()
                self.out.write("\n")

    def handle(self, line: str) -> bool:
        """Run one input line; returns ``False`` when the session should end."""
        if not line.strip():
            return True
        command = parse_command(line)
        if command is not None:
            return self._handlers[command]()
        self.send(line)
        return True

    def _read_line(self) -> str | None:
        prompt = PROMPT if self.lines.interactive else ""
        while True:
            try:
                line = self.lines.read(prompt)
            except KeyboardInterrupt:  # Ctrl-C at the prompt: drop the line, ask again
                self.out.write("\n")
                continue
            if line is None and self.lines.interactive:
                self.out.write("\n")  # leave the terminal on a fresh line after Ctrl-D
            return line

    # -- commands ----------------------------------------------------------------------

    def show_help(self) -> bool:
        width = max(map(len, COMMANDS))
        for name, text in COMMANDS.items():
            self.out.write(f"  {name:<{width}}  {text}\n")
        self.out.write("Anything else is sent as a message. Ctrl-C stops a reply.\n")
        return True

    def show_history(self) -> bool:
        messages = self.api.get_messages(self._current())
        if not messages:
            self.out.write("(no messages yet)\n")
        for message in messages:
            label = ROLE_LABELS.get(message.role, message.role)
            if message.reasoning:
                self.out.write(f"{label} (thinking): {message.reasoning}\n")
            if message.interrupted:  # the server keeps a stopped reply's turn, empty
                self.out.write(f"{label}: {message.content}[reply stopped]\n")
            elif message.content or not message.tool_calls:
                self.out.write(f"{label}: {message.content}\n")
            for call in message.tool_calls:
                self.out.write(f"{label}: → {call}\n")
        self.out.flush()
        return True

    def new_conversation(self) -> bool:
        self.conversation_id = self.api.create_conversation(self.system)
        self.info(f"Started new conversation {self.conversation_id}.")
        return True

    def send(self, content: str) -> None:
        """Send one message and stream the reply to ``out``. On a terminal, Ctrl-C stops
        the reply: the response is closed (so the server stops generating) and the
        session goes on. On a terminal a reasoning model's thinking is shown too, dimmed,
        before its answer; piped, only the answer is written."""
        thinking = _Thinking(self.out) if self.lines.interactive else None
        on_reasoning = None if thinking is None else thinking.write
        pieces = self.api.stream_reply(self._current(), content, self.options, on_reasoning)
        started = self.lines.interactive
        if started:
            self.out.write(REPLY_PREFIX)
            self.out.flush()
        try:
            for piece in pieces:
                started = True
                if thinking is not None:
                    thinking.end("\n")
                self.out.write(piece)
                self.out.flush()
        except ChatClientError:
            if thinking is not None:
                thinking.end()
            if started:
                self.out.write("\n")  # the error sentence starts on its own line
            raise
        except KeyboardInterrupt:
            if not self.lines.interactive:
                raise
            pieces.close()
            self.api.reset()
            if thinking is not None:
                thinking.end()
            self.out.write("\n[reply stopped]\n")
            self.out.flush()
            return
        finally:
            pieces.close()
        if thinking is not None:
            thinking.end()
        self.out.write("\n")
        self.out.flush()

    # -- output ------------------------------------------------------------------------

    def _current(self) -> str:
        if self.conversation_id is None:
            self.conversation_id = self.api.create_conversation(self.system)
        return self.conversation_id

    def info(self, text: str) -> None:
        stream = self.out if self.lines.interactive else self.err
        stream.write(text + "\n")
        stream.flush()

    def error(self, text: str) -> None:
        self.out.flush()
        self.err.write(text + "\n")
        self.err.flush()


class _Thinking:
    """A reply's reasoning on a terminal: dimmed while it streams, closed (styles reset)
    once the answer starts or the reply ends."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.open = False

    def write(self, text: str) -> None:
        if not self.open:
            self.out.write(THINKING)
            self.open = True
        self.out.write(text)
        self.out.flush()

    def end(self, separator: str = "") -> None:
        if self.open:
            self.out.write(THOUGHT + separator)
            self.open = False
