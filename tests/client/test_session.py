"""The chat loop in-process: commands, streaming output, Ctrl-C, and errors that the session
survives (on a terminal) or stops at (piped)."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
from client_fakes import FakeServer, content_chunk, sse

from bitserve.client.api_client import ConversationAPI
from bitserve.client.cli import url_problem
from bitserve.client.errors import ConversationNotFound
from bitserve.client.session import (
    PROMPT,
    REPLY_PREFIX,
    THINKING,
    THOUGHT,
    ChatSession,
    parse_command,
)

CTRL_C = object()  # in a script: the user presses Ctrl-C at the prompt


class ScriptedInput:
    """Lines typed by a user (``interactive=True``) or piped in, in order; records prompts."""

    def __init__(self, lines: list[object], interactive: bool) -> None:
        self.lines = list(lines)
        self.interactive = interactive
        self.prompts: list[str] = []

    def read(self, prompt: str) -> str | None:
        self.prompts.append(prompt)
        if not self.lines:
            return None
        line = self.lines.pop(0)
        if line is CTRL_C:
            raise KeyboardInterrupt
        assert isinstance(line, str)
        return line

    def close(self) -> None:
        return None


def run_session(
    api: ConversationAPI, lines: list[object], interactive: bool = False
) -> tuple[int, str, str, ScriptedInput]:
    script = ScriptedInput(lines, interactive)
    out, err = io.StringIO(), io.StringIO()
    session = ChatSession(api, script, out, err)
    session.start()
    status = session.run()
    return status, out.getvalue(), err.getvalue(), script


@pytest.mark.parametrize(
    ("line", "command"),
    [
        ("help", "help"),
        ("  HISTORY ", "history"),
        ("/new", "new"),
        ("quit", "exit"),
        ("/exit", "exit"),
        ("?", "help"),
        ("history please", None),
        ("hello", None),
    ],
)
def test_parse_command(line: str, command: str | None) -> None:
    assert parse_command(line) == command


def test_piped_output_holds_only_replies_and_history(api: ConversationAPI) -> None:
    status, out, err, script = run_session(api, ["hello", "", "second", "history"])
    assert status == 0
    assert out == (
        "echo: hello\necho: second\n"
        "you: hello\nassistant: echo: hello\nyou: second\nassistant: echo: second\n"
    )
    # the one status line goes to stderr when piped; no hints, no prompts
    assert err == "Connected to http://bitserve.test; new conversation conv_1700000000000_0.\n"
    assert set(script.prompts) == {""}


def test_terminal_shows_prompts_and_labels_replies(api: ConversationAPI) -> None:
    status, out, _, script = run_session(api, ["hello", "exit", "never read"], interactive=True)
    assert status == 0
    assert f"{REPLY_PREFIX}echo: hello\n" in out
    assert "new conversation conv_" in out
    assert script.prompts == [PROMPT, PROMPT]
    assert script.lines == ["never read"]


def test_new_starts_an_empty_conversation(api: ConversationAPI, fake_server: FakeServer) -> None:
    _, out, err, _ = run_session(api, ["hello", "new", "history"])
    assert out.endswith("(no messages yet)\n")
    assert len(fake_server.conversations) == 2
    assert "Started new conversation conv_1700000000000_1." in err


def test_help_lists_every_command(api: ConversationAPI) -> None:
    _, out, _, _ = run_session(api, ["help"], interactive=True)
    for name in ("help", "history", "new", "exit"):
        assert f"  {name} " in out


def test_ctrl_c_at_the_prompt_drops_the_line(api: ConversationAPI) -> None:
    status, out, _, script = run_session(api, [CTRL_C, "hello"], interactive=True)
    assert status == 0
    assert "echo: hello" in out
    assert script.prompts.count(PROMPT) == 3  # after Ctrl-C, after hello, then Ctrl-D


def interrupted_stream() -> Iterator[bytes]:
    yield sse(content_chunk("partial "))[0]
    raise KeyboardInterrupt  # what SIGINT does to a blocked socket read


def test_ctrl_c_during_a_reply_stops_it_and_the_session_goes_on(
    api: ConversationAPI, fake_server: FakeServer
) -> None:
    fake_server.reply_stream = interrupted_stream()
    script = ScriptedInput(["hello", "again"], interactive=True)
    out = io.StringIO()
    session = ChatSession(api, script, out, io.StringIO())
    session.start()
    session.handle("hello")
    assert fake_server.closed_streams == 1  # the response was closed: the server can stop
    assert out.getvalue().endswith(f"{REPLY_PREFIX}partial \n[reply stopped]\n")
    fake_server.reply_stream = None
    session.handle("again")
    assert out.getvalue().endswith("echo: again\n")


def test_piped_ctrl_c_during_a_reply_ends_the_client(
    api: ConversationAPI, fake_server: FakeServer
) -> None:
    fake_server.reply_stream = interrupted_stream()
    with pytest.raises(KeyboardInterrupt):
        run_session(api, ["hello"])


def test_errors_on_a_terminal_are_reported_and_survived(
    api: ConversationAPI, fake_server: FakeServer
) -> None:
    script = ScriptedInput(["history", "new", "hello"], interactive=True)
    out, err = io.StringIO(), io.StringIO()
    session = ChatSession(api, script, out, err)
    session.start()
    fake_server.conversations.clear()  # deleted behind the client's back
    assert session.run() == 0
    assert err.getvalue() == "Conversation conv_1700000000000_0 was not found on the server.\n"
    assert "echo: hello" in out.getvalue()


def test_errors_on_a_pipe_end_the_run(api: ConversationAPI, fake_server: FakeServer) -> None:
    script = ScriptedInput(["hello", "again"], interactive=False)
    err = io.StringIO()
    session = ChatSession(api, script, io.StringIO(), err)
    session.start()
    fake_server.conversations.clear()
    assert session.run() == 1
    assert err.getvalue().endswith("was not found on the server.\n")
    assert script.lines == ["again"]


def test_resume_counts_messages_and_unknown_ids_fail(
    api: ConversationAPI, fake_server: FakeServer
) -> None:
    conversation_id = api.create_conversation("sys")
    out = io.StringIO()
    session = ChatSession(api, ScriptedInput([], True), out, io.StringIO())
    session.start(conversation_id)
    assert session.conversation_id == conversation_id
    assert f"resumed conversation {conversation_id} (1 message so far)" in out.getvalue()
    with pytest.raises(ConversationNotFound):
        session.start("conv_missing")


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("http://127.0.0.1:8081", True),
        ("https://example.org/base", True),
        ("127.0.0.1:8081", False),
        ("ftp://host", False),
        ("http://host:99999999", False),
    ],
)
def test_url_problem(url: str, ok: bool) -> None:
    assert (url_problem(url) is None) == ok


def reasoning_chunk(text: str) -> dict[str, object]:
    choice = {"index": 0, "delta": {"reasoning_content": text}, "finish_reason": None}
    return {"object": "chat.completion.chunk", "choices": [choice]}


def test_a_reasoning_model_thinks_visibly_on_a_terminal_and_silently_when_piped(
    api: ConversationAPI, fake_server: FakeServer
) -> None:
    """A Qwen3-style model streams its <think> text first: on a terminal it showed nothing
    until the answer began, however long the model thought."""
    thinking = [reasoning_chunk("Let me "), reasoning_chunk("think."), content_chunk("Hi!")]
    fake_server.reply_stream = sse(*thinking)
    _, out, _, _ = run_session(api, ["hello"], interactive=True)
    assert f"{REPLY_PREFIX}{THINKING}Let me think.{THOUGHT}\nHi!\n" in out
    fake_server.reply_stream = sse(*thinking)
    _, out, _, _ = run_session(api, ["hello"])
    assert out == "Hi!\n"  # a script's stdout holds the answer only


def test_history_shows_tool_calls_and_reasoning(
    api: ConversationAPI, fake_server: FakeServer
) -> None:
    """An agent's conversation: the assistant turn that called a tool showed as an empty
    'assistant:' line."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}  # fmt: skip
    fake_server.conversations["conv_1"] = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call], "reasoning_content": "Ask."},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
        {"role": "assistant", "content": "Sunny.", "tool_calls": None},
    ]
    session = ChatSession(api, ScriptedInput([], False), out := io.StringIO(), io.StringIO())
    session.start("conv_1")
    session.show_history()
    assert out.getvalue() == (
        "you: Weather in Paris?\n"
        "assistant (thinking): Ask.\n"
        'assistant: → get_weather({"city": "Paris"})\n'
        "tool: sunny\n"
        "assistant: Sunny.\n"
    )


def test_ctrl_c_while_a_command_waits_on_the_server_returns_to_the_prompt(
    api: ConversationAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C during `history` (a slow GET) quit the client with status 130."""

    def slow_server(conversation_id: str) -> list[object]:
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "get_messages", slow_server)
    status, out, _, script = run_session(api, ["history", "hello"], interactive=True)
    assert status == 0
    assert script.prompts == [PROMPT, PROMPT, PROMPT]  # back at the prompt, then a reply
    assert "hello" in out


def test_bytes_that_are_not_utf8_in_piped_input_are_replaced() -> None:
    """Piped stdin reads undecodable bytes as lone surrogates, which no request can carry:
    the client died with a UnicodeEncodeError traceback."""
    from bitserve.client.line_input import PipedInput

    stream = io.TextIOWrapper(io.BytesIO(b"caf\xe9\n"), encoding="utf-8", errors="surrogateescape")
    assert PipedInput(stream).read("") == "caf\ufffd"
