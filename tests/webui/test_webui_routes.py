"""The page's files as the app serves them (in-process): where they are, their headers,
that they load nothing from another host, keys, ``--no-webui`` and the printed address."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from bitserve.api.app import create_app
from bitserve.api.serve import settings_from_args
from bitserve.api.served import ServedModel
from bitserve.api.settings import ServerSettings
from bitserve.cli import build_parser
from bitserve.engine.loader import LoadedModel, load_model
from bitserve.store import SQLiteStore
from bitserve.webui import STATIC_DIR, browser_url

STATIC_FILES = sorted(p.name for p in STATIC_DIR.iterdir())


@pytest.fixture(scope="module")
def loaded() -> Iterator[LoadedModel]:
    model = load_model(None)
    yield model
    model.close()


@pytest.fixture
def make_client(loaded: LoadedModel, tmp_path: Path) -> Any:
    @contextmanager
    def factory(**overrides: Any) -> Iterator[TestClient]:
        settings = ServerSettings(db_path=tmp_path / "c.db", **overrides)
        served = ServedModel.create(loaded, 4, None, settings.aliases, int(time.time()))
        app = create_app(settings, served, SQLiteStore(settings.db_path))
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client

    return factory


def test_the_page_and_its_files_are_served(make_client: Any) -> None:
    assert {"index.html", "app.js", "markdown.js", "style.css"} <= set(STATIC_FILES)
    with make_client() as client:
        page = client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert client.head("/").status_code == 200
        for name in STATIC_FILES:
            r = client.get(f"/static/{name}")
            assert r.status_code == 200 and r.content == (STATIC_DIR / name).read_bytes()
            assert r.headers["x-content-type-options"] == "nosniff"
        assert "javascript" in client.get("/static/app.js").headers["content-type"]
        assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
        assert client.get("/static/nothing.js").status_code == 404
        assert "/" not in client.get("/openapi.json").json()["paths"]


def test_the_page_loads_nothing_from_elsewhere_and_parses_no_html() -> None:
    html = (STATIC_DIR / "index.html").read_text()
    for target in re.findall(r'(?:src|href)="([^"]*)"', html):
        assert target.startswith(("static/", "data:")), target
    for name in STATIC_FILES:
        text = (STATIC_DIR / name).read_text()
        if name.endswith(".js"):
            text = re.sub(r"^\s*//.*$", "", text, flags=re.MULTILINE)  # comments may name them
            for module in re.findall(r'(?:import|from)\s*\(?\s*"([^"]+)"', text):
                assert module.startswith("./"), (name, module)
            for html_api in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"):
                assert html_api not in text, (name, html_api)
            assert not re.search(r"\b(?:eval|Function)\(", text), name
        if name.endswith(".css"):
            assert "url(" not in text and "@import" not in text


def test_with_keys_the_page_is_open_and_the_api_is_not(make_client: Any) -> None:
    with make_client(api_keys=("k",)) as client:
        assert client.get("/").status_code == 200
        assert client.get("/static/app.js").status_code == 200
        assert client.get("/v1/conversations").status_code == 401
        assert client.get("/health").status_code == 200


def test_no_webui_leaves_the_page_out(make_client: Any) -> None:
    with make_client(webui=False) as client:
        unknown = client.get("/no-such-page")
        for path in ("/", "/static/app.js"):
            r = client.get(path)
            assert r.status_code == 404 and r.json() == unknown.json()  # like any unknown path


def test_the_serve_flag_and_the_address_printed() -> None:
    parser = build_parser("serve")
    assert settings_from_args(parser.parse_args(["serve"])).webui is True
    assert settings_from_args(parser.parse_args(["serve", "--no-webui"])).webui is False
    assert browser_url("127.0.0.1", 8081) == "http://127.0.0.1:8081/"
    assert browser_url("0.0.0.0", 80) == "http://127.0.0.1:80/"
    assert browser_url("::", 8081) == "http://[::1]:8081/"
    assert browser_url("fe80::1", 8081) == "http://[fe80::1]:8081/"
    assert browser_url("example.lan", 8081) == "http://example.lan:8081/"
