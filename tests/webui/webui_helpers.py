"""Helpers for the web page's tests: the demo server, a watched page, and the few
gestures every test makes (open the page, change a setting, send a message)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import Dialog, Error, Page, expect

from bitserve.api.process import ServerProcess, start_server

DESKTOP = {"width": 1100, "height": 760}
PHONE = {"width": 375, "height": 720}
TIMEOUT_MS = 30_000  # a loaded 2-core CI machine is slow; nothing here waits that long normally
# a reply's figures; the rate only when it is measurable (2+ tokens over 0.2 s or more)
STATS = re.compile(
    r"^(\d+) tokens?(?: · [\d.]+ tokens/s)? · first token \d+ ms · (\d+) cached prompt tokens"
)

expect.set_options(timeout=TIMEOUT_MS)


def start_demo_server(workdir: Path, *args: str) -> ServerProcess:
    """``bitserve serve`` on the demo model with the numpy kernel on one thread: the native
    kernels write the demo's tokens at thousands a second, so a reply would end before a
    person, or a test, could press Stop; the numpy oracle makes it ~100 a second."""
    env = {"BITSERVE_CACHE": os.environ.get("BITSERVE_CACHE", str(workdir))}
    db = ["--db", str(workdir / "conversations.db")]
    return start_server([*db, "--kernel", "numpy", "--threads", "1", *args], workdir, env=env)


@dataclass
class PageWatch:
    """A page whose uncaught script errors and dialogs (alert, confirm...) are recorded;
    dialogs are dismissed."""

    page: Page
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.page.set_default_timeout(TIMEOUT_MS)
        self.page.on("pageerror", self._on_error)
        self.page.on("dialog", self._on_dialog)

    def _on_error(self, error: Error) -> None:
        self.errors.append(str(error))

    def _on_dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()


def open_app(page: Page, url: str, conversation_id: str | None = None) -> None:
    """Load the page (on a conversation, if given) and wait until it knows the model."""
    page.goto(f"{url}/" + (f"#{conversation_id}" if conversation_id else ""))
    expect(page.locator("#model-name")).to_have_text("demo-v1")


def set_settings(page: Page, **values: str) -> None:
    """Fill settings fields by id (``max_tokens="16"`` fills ``#max-tokens``)."""
    if page.locator("#settings").is_hidden():
        page.click("#toggle-settings")
    for name, value in values.items():
        field_id = "#" + name.replace("_", "-")
        page.fill(field_id, value)
        page.dispatch_event(field_id, "change")


def send(page: Page, text: str) -> None:
    """Type ``text`` in the message box and press Enter."""
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_for_reply(page: Page) -> str:
    """Wait until the last reply is complete; returns its figures line."""
    expect(page.locator("#send")).to_be_visible()
    stats = page.locator(".message.assistant").last.locator(".stats")
    expect(stats).not_to_be_empty()
    return stats.inner_text()


def metric(url: str, name: str, headers: dict[str, str] | None = None) -> float:
    """One unlabelled value from ``/metrics``."""
    for line in httpx.get(f"{url}/metrics", headers=headers, timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def api(url: str, method: str, path: str, key: str | None = None, **kwargs: Any) -> Any:
    """One JSON call to the server's API (as curl would make it), checked for success."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.request(method, f"{url}{path}", headers=headers, timeout=60, **kwargs)
    response.raise_for_status()
    return response.json()
