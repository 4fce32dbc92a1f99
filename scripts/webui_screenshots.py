#!/usr/bin/env python3
"""Regenerate the web page's screenshots in docs/ (desktop, phone width, dark mode).

    python3 scripts/webui_screenshots.py [--out docs]

Starts ``bitserve serve`` on the demo model with a fresh conversation store, fills it over
the HTTP API, sends one message through the page (the reply is the demo model's: random
text, with its real figures) and photographs the page with Debian's Chromium through
Playwright (both come with ``pip install -e '.[dev]'`` and scripts/system-deps).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import Browser, Page, expect, sync_playwright

from bitserve.api.process import start_server

CHROMIUM = "/usr/bin/chromium"
SHOTS: dict[str, dict[str, Any]] = {  # file name → browser context options
    "webui-desktop.png": {"viewport": {"width": 1100, "height": 640}},
    "webui-phone.png": {
        "viewport": {"width": 390, "height": 700},
        "is_mobile": True,
        "has_touch": True,
    },
    "webui-dark.png": {"viewport": {"width": 1100, "height": 640}, "color_scheme": "dark"},
}

# A conversation imported through the API (POST /v1/conversations with messages), to show
# how replies' Markdown is drawn: the demo model itself writes random text.
IMPORTED = [
    {"role": "user", "content": "How do I serve a real model?"},
    {
        "role": "assistant",
        "content": "Point `bitserve serve` at a GGUF file:\n\n"
        "```sh\nbitserve serve -m models/BitNet-b1.58-2B-4T/ggml-model-i2_s.gguf\n```\n\n"
        "- conversations are kept on the **server**, so any client can continue them;\n"
        "- a follow-up reuses the cached prompt: see *cached prompt tokens* below a reply.",
    },
]
OTHER_TITLES = ["Chat from the terminal", "Notes on the KV cache", "Summarise this file"]


def fill(url: str) -> str:
    """Conversations for the sidebar; returns the id of the one to show."""
    with httpx.Client(base_url=url, timeout=60) as client:
        for title in OTHER_TITLES:
            client.post("/v1/conversations", json={"metadata": {"title": title}}).raise_for_status()
        created = client.post(
            "/v1/conversations",
            json={"metadata": {"title": "Serving a real model"}, "messages": IMPORTED},
        )
        created.raise_for_status()
        return str(created.json()["id"])


def send_one(page: Page) -> None:
    """One real turn through the page, so the reply's figures line shows."""
    page.click("#toggle-settings")
    page.fill("#max-tokens", "40")
    page.click("#toggle-settings")
    page.fill("#input", "And on the demo model?")
    page.press("#input", "Enter")
    expect(page.locator(".message.assistant").last.locator(".stats")).not_to_be_empty()


def take_screenshots(browser: Browser, url: str, conversation_id: str, out: Path) -> list[Path]:
    paths = []
    for i, (name, options) in enumerate(SHOTS.items()):
        context = browser.new_context(**options)
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.goto(f"{url}/#{conversation_id}")
        expect(page.locator(".message.assistant").first).to_be_visible()
        if i == 0:
            send_one(page)  # stored: the later shots show it too
        if options.get("color_scheme") == "dark":
            page.click("#toggle-settings")  # the settings, too
        page.mouse.move(0, options["viewport"]["height"] - 1)  # no hover highlight
        page.evaluate("document.activeElement.blur()")
        page.evaluate("document.querySelector('#messages').scrollTop = 1e9")
        path = out / name
        page.screenshot(path=str(path))
        paths.append(path)
        context.close()
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "docs",
        help="folder the three PNG files are written to (default: the repository's docs/)",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with start_server(["--db", str(work / "c.db")], work) as server:
            conversation_id = fill(server.url)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM)
                for path in take_screenshots(browser, server.url, conversation_id, args.out):
                    print(f"{path} ({path.stat().st_size // 1024} KB)")
                browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
