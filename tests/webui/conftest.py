"""Fixtures for the web page's tests: Debian's Chromium driven by Playwright (one browser
for the session, a fresh context per test), and the real ``bitserve serve`` process on
the demo model (one for the session: each test makes its own conversations)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright
from webui_helpers import DESKTOP, PageWatch, start_demo_server

from bitserve.api.process import ServerProcess

# Playwright's own browser download cannot work offline: the tests use the system's
# Chromium, which scripts/system-deps installs (scripts/system-packages.txt).
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/system-deps (Debian package chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with start_demo_server(tmp_path_factory.mktemp("webui")) as s:
        yield s


@pytest.fixture
def watch(browser: Browser) -> Iterator[PageWatch]:
    """A page in a fresh desktop-sized context (its own localStorage), watched for script
    errors and dialogs: a test fails if the page threw, whatever it asserted."""
    context = browser.new_context(viewport=DESKTOP)
    watched = PageWatch(context.new_page())
    yield watched
    context.close()
    assert watched.errors == [], f"the page threw: {watched.errors}"


@pytest.fixture
def page(watch: PageWatch) -> Page:
    return watch.page
