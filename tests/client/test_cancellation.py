"""Ctrl-C in the middle of a reply, through a real pseudo-terminal and a real socket: the
client closes the connection (the server sees it), says so, and keeps its prompt."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from server_process import client_args, client_env, free_port

from bitserve.client.session import PROMPT, REPLY_PREFIX

STUB = Path(__file__).with_name("stub_server.py")


@pytest.fixture
def stub_url() -> Iterator[tuple[str, pexpect.spawn]]:
    port = free_port()
    stub = pexpect.spawn(sys.executable, [str(STUB), str(port)], encoding="utf-8", timeout=20)
    stub.expect_exact("READY")
    yield f"http://127.0.0.1:{port}", stub
    stub.terminate(force=True)


def test_ctrl_c_closes_the_stream_and_returns_to_the_prompt(
    stub_url: tuple[str, pexpect.spawn], tmp_path: Path
) -> None:
    url, stub = stub_url
    env = client_env(tmp_path)
    child = pexpect.spawn(
        sys.executable, client_args(url, "--max-tokens", "100000"), env=env, encoding="utf-8"
    )
    child.timeout = 20
    child.expect(r"new conversation (conv_\d+_\d+)")
    conversation_id = child.match.group(1)
    child.expect_exact(PROMPT)
    child.sendline("go on forever")
    child.expect_exact(REPLY_PREFIX + "word word word ")
    child.sendintr()
    child.expect_exact("[reply stopped]")
    stub.expect_exact(f"DISCONNECTED {conversation_id}")  # the server saw the client leave
    child.expect_exact(PROMPT)
    child.sendline("history")  # the connection pool was reset: the next request works
    child.expect_exact("(no messages yet)")
    child.sendline("exit")
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0
