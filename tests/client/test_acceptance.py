"""The real client against the real server process on the demo model (issue 5's acceptance):
through a pseudo-terminal for the interactive path and through piped stdin."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pexpect
import pytest
from server_process import (
    ServerProcess,
    client_args,
    client_env,
    free_port,
    run_piped,
    start_server,
)

from bitserve.client.session import PROMPT, REPLY_PREFIX

REPLY_ARGS = ("--max-tokens", "8", "--temperature", "0")
CONV_ID = r"(conv_\d+_\d+)"
LONG_REPLY_TOKENS = "1000"  # long enough to press Ctrl-C in the middle


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(tmp_path_factory.mktemp("server"))
    yield process
    process.stop()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def spawn(url: str, home: Path, *extra: str) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable,
        client_args(url, *extra),
        env=client_env(home),
        encoding="utf-8",
        timeout=60,
        dimensions=(40, 400),
    )
    return child


def stored_messages(server: ServerProcess, conversation_id: str) -> list[dict[str, str]]:
    response = httpx.get(f"{server.url}/v1/conversations/{conversation_id}", timeout=10)
    response.raise_for_status()
    messages: list[dict[str, str]] = response.json()["messages"]
    return messages


def prompt_after_reply(child: pexpect.spawn) -> str:
    """Wait for a streamed reply to end (the next prompt) and return its text."""
    child.expect_exact(REPLY_PREFIX)
    child.expect_exact("\r\n" + PROMPT)
    return str(child.before).replace("\r\n", "\n")


def test_interactive_chat_history_new_exit(server: ServerProcess, home: Path) -> None:
    child = spawn(server.url, home, *REPLY_ARGS)
    child.expect(f"new conversation {CONV_ID}")
    first_id = child.match.group(1)
    child.expect_exact(PROMPT)
    child.sendline("Hello there")
    reply = prompt_after_reply(child)
    stored = stored_messages(server, first_id)
    assert [m["role"] for m in stored[-2:]] == ["user", "assistant"]
    assert stored[-2]["content"] == "Hello there"
    assert stored[-1]["content"] == reply  # what streamed in is what the server kept

    child.sendline("history")
    child.expect_exact("you: Hello there")
    child.expect_exact("assistant: ")
    child.expect_exact(PROMPT)

    child.sendline("new")
    child.expect(f"Started new conversation {CONV_ID}")
    assert child.match.group(1) != first_id
    child.expect_exact(PROMPT)
    child.sendline("history")
    child.expect_exact("(no messages yet)")
    child.expect_exact(PROMPT)

    child.sendline("exit")
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0
    history_file = home / "state" / "bitserve" / "chat_history"
    assert "Hello there" in history_file.read_text()  # readline history kept for next time
    assert history_file.stat().st_mode & 0o077 == 0  # and private to the user


def test_ctrl_c_at_the_prompt_and_ctrl_d_to_leave(server: ServerProcess, home: Path) -> None:
    child = spawn(server.url, home, *REPLY_ARGS)
    child.expect_exact(PROMPT)
    child.send("half a line")
    child.expect_exact("half a line")  # readline has taken the keys and waits for more
    time.sleep(0.2)  # (CPython's readline only notices SIGINT while it waits for a key)
    child.sendintr()
    child.expect_exact(PROMPT)
    child.sendline("help")
    child.expect_exact("history")
    child.expect_exact(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0


def test_ctrl_c_during_a_reply_stops_it_and_keeps_the_client(
    server: ServerProcess, home: Path
) -> None:
    child = spawn(server.url, home, "--max-tokens", LONG_REPLY_TOKENS, "--temperature", "1")
    child.expect(f"new conversation {CONV_ID}")
    child.expect_exact(PROMPT)
    child.sendline("Tell me a very long story.")
    child.expect(re.escape(REPLY_PREFIX) + ".")  # the reply has started streaming
    child.sendintr()
    child.expect_exact("[reply stopped]")
    child.expect_exact(PROMPT)
    child.sendline("history")  # the turn is kept, its reply shown as stopped, not as ""
    child.expect_exact("you: Tell me a very long story.")
    child.expect(r"assistant: \[reply stopped\]\r?\n")
    child.expect_exact(PROMPT)
    child.sendline("help")  # still running, still reading commands
    child.expect_exact("history")
    child.expect_exact(PROMPT)
    child.sendline("exit")
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0


def test_resume_a_conversation(server: ServerProcess, home: Path) -> None:
    first = run_piped(server.url, "remember this\n", home, *REPLY_ARGS)
    assert first.returncode == 0, first.stderr
    conversation_id = re.search(CONV_ID, first.stderr).group(1)  # type: ignore[union-attr]
    child = spawn(server.url, home, "--conversation", conversation_id)
    child.expect_exact(f"resumed conversation {conversation_id} (2 messages so far)")
    child.expect_exact(PROMPT)
    child.sendline("history")
    child.expect_exact("you: remember this")
    child.expect_exact(PROMPT)
    child.sendline("quit")
    child.expect(pexpect.EOF)


def test_piped_stdin_one_message_per_line(server: ServerProcess, home: Path) -> None:
    result = run_piped(server.url, "first message\nsecond message\nhistory\n", home, *REPLY_ARGS)
    assert result.returncode == 0, result.stderr
    assert PROMPT not in result.stdout and REPLY_PREFIX not in result.stdout
    conversation_id = re.search(CONV_ID, result.stderr).group(1)  # type: ignore[union-attr]
    stored = stored_messages(server, conversation_id)
    assert [m["content"] for m in stored if m["role"] == "user"] == [
        "first message",
        "second message",
    ]
    replies = [m["content"] for m in stored if m["role"] == "assistant"]
    history = "".join(
        f"{'you' if m['role'] == 'user' else m['role']}: {m['content']}\n" for m in stored
    )
    assert result.stdout == f"{replies[0]}\n{replies[1]}\n{history}"


def test_system_prompt_is_stored(server: ServerProcess, home: Path) -> None:
    result = run_piped(server.url, "hi\n", home, "--system", "Answer briefly.", *REPLY_ARGS)
    assert result.returncode == 0, result.stderr
    conversation_id = re.search(CONV_ID, result.stderr).group(1)  # type: ignore[union-attr]
    stored = stored_messages(server, conversation_id)
    assert stored[0] == {**stored[0], "role": "system", "content": "Answer briefly."}


def test_unknown_conversation_is_one_sentence(server: ServerProcess, home: Path) -> None:
    result = run_piped(server.url, "hi\n", home, "--conversation", "conv_1_999")
    assert result.returncode == 1
    assert result.stderr == "Conversation conv_1_999 was not found on the server.\n"
    assert result.stdout == ""


def test_server_down_is_one_sentence(home: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = run_piped(url, "hi\n", home)
    assert result.returncode == 1
    assert result.stderr == (
        f"Cannot connect to a bitserve server at {url} (connection refused); is it running?\n"
    )


def test_wrong_url_is_one_sentence(server: ServerProcess, home: Path) -> None:
    result = run_piped(server.url + "/not/here", "hi\n", home)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "check --url" in result.stderr


@pytest.mark.slow  # starts a second server
def test_bad_and_missing_keys_are_one_sentence(
    tmp_path_factory: pytest.TempPathFactory, home: Path
) -> None:
    server = start_server(tmp_path_factory.mktemp("keyed"), ["--api-key", "right-key"])
    try:
        missing = run_piped(server.url, "hi\n", home)
        wrong = run_piped(server.url, "hi\n", home, "--api-key", "wrong-key")
        right = run_piped(server.url, "hi\n", home, "--api-key", "right-key", *REPLY_ARGS)
        from_env = run_piped(
            server.url, "hi\n", home, *REPLY_ARGS, env={"BITSERVE_API_KEY": "right-key"}
        )
    finally:
        server.stop()
    assert (missing.returncode, missing.stderr) == (
        1,
        "The server requires an API key; pass --api-key or set BITSERVE_API_KEY.\n",
    )
    assert (wrong.returncode, wrong.stderr) == (
        1,
        "The server rejected the API key; check --api-key or BITSERVE_API_KEY.\n",
    )
    assert right.returncode == 0, right.stderr
    assert from_env.returncode == 0, from_env.stderr
