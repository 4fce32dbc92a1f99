"""scripts/webui_screenshots.py, which makes the screenshots in docs/, still works."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path
from types import ModuleType

from playwright.sync_api import Browser

from bitserve.api.process import ServerProcess

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "webui_screenshots.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("webui_screenshots", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_the_screenshot_script_photographs_the_page(
    browser: Browser, server: ServerProcess, tmp_path: Path
) -> None:
    script = load_script()
    conversation_id = script.fill(server.url)
    paths = script.take_screenshots(browser, server.url, conversation_id, tmp_path)
    assert [p.name for p in paths] == list(script.SHOTS)
    for path in paths:
        viewport = script.SHOTS[path.name]["viewport"]
        assert png_size(path) == (viewport["width"], viewport["height"])
        assert path.stat().st_size < 300_000  # small enough to commit
    committed = Path(__file__).resolve().parents[2] / "docs"
    for path in paths:
        assert png_size(committed / path.name) == png_size(path)  # docs/ has each one
