"""Errors as one readable line, each caused for real: a keyed server without a key (and
with a wrong one), a full queue (503 with its Retry-After), and a server that is gone."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect
from webui_helpers import api, metric, open_app, send, set_settings, start_demo_server

from bitserve.api.process import ServerProcess
from bitserve.gguf import read_gguf
from bitserve.model.demo import demo_model_path
from bitserve.tokenizer import Tokenizer

KEY = "webui-test-key"


@pytest.fixture
def keyed_server(tmp_path: Path) -> Iterator[ServerProcess]:
    # one running sequence and one waiting: a third request finds the queue full
    args = ("--api-key", KEY, "--max-batch", "1", "--max-queue", "1")
    with start_demo_server(tmp_path, *args) as s:
        yield s


def long_request(url: str) -> tuple[str, dict[str, object], dict[str, str]]:
    """A streamed chat that runs to max_tokens: the demo's stop tokens are suppressed."""
    with read_gguf(demo_model_path()) as gguf:
        stop_ids = Tokenizer.from_gguf(gguf).stop_ids
    body = {
        "model": "bitnet",
        "messages": [{"role": "user", "content": "Go on"}],
        "max_tokens": 1500,
        "stream": True,
        "logit_bias": {str(t): -100 for t in stop_ids},
    }
    return f"{url}/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}"}


def wait_for_metric(url: str, name: str, value: float) -> None:
    deadline = time.monotonic() + 30
    while metric(url, name, {"Authorization": f"Bearer {KEY}"}) != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.05)


def test_each_failure_is_one_readable_line(page: Page, keyed_server: ServerProcess) -> None:
    url = keyed_server.url
    error = page.locator("#error-text")
    open_app(page, url)  # the page and /health need no key
    expect(error).to_have_text("This server needs an API key: enter it under Settings.")
    expect(page.locator("#api-key")).to_be_focused()  # settings opened at the key field

    set_settings(page, api_key="wrong")
    expect(error).to_have_text("The server refused this API key: check it under Settings.")
    set_settings(page, api_key="clé")  # no header can carry it: said so, not "unreachable"
    expect(error).to_have_text(
        "An API key is printable ASCII without spaces: check it under Settings."
    )

    created = api(url, "POST", "/v1/conversations", KEY, json={"metadata": {"title": "Keyed"}})
    set_settings(page, api_key=KEY)
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator(f'.conversation[data-id="{created["id"]}"] .title')).to_have_text("Keyed")

    chat_url, body, headers = long_request(url)
    with (
        httpx.Client(timeout=60, headers=headers) as client,
        client.stream("POST", chat_url, json=body) as running,
    ):
        lines = running.iter_lines()  # kept: a dropped iterator would close the connection
        next(lines)
        wait_for_metric(url, "bitserve_running_sequences", 1)  # generating, out of the queue
        with client.stream("POST", chat_url, json=body) as waiting:
            assert waiting.status_code == 200
            wait_for_metric(url, "bitserve_queue_depth", 1)  # waiting: the queue is full
            send(page, "Are you busy?")
            expect(error).to_have_text(
                re.compile(r"^The server is busy \(its queue is full\): try again in \d+ s\.$")
            )
            expect(page.locator("#input")).to_have_value("Are you busy?")  # kept to resend

    keyed_server.stop()
    page.click("#refresh")
    expect(error).to_have_text(
        "Cannot reach the bitserve server: it may have stopped, or the network is down."
    )
    set_settings(page, max_tokens="4")
    send(page, "Anyone there?")
    expect(error).to_have_text(re.compile("^Cannot reach the bitserve server"))


def test_a_refused_request_names_the_field(page: Page, server: ServerProcess) -> None:
    open_app(page, server.url)
    set_settings(page, temperature="5")
    send(page, "Too hot")
    expect(page.locator("#error-text")).to_have_text(
        re.compile(r"^The server refused the request \(400\): .*temperature")
    )
    expect(page.locator(".message.user.failed")).to_have_count(1)
    expect(page.locator("#input")).to_have_value("Too hot")  # kept to send again
