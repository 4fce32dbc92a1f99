"""The web chat page: static files served at ``/`` and ``/static/…``.

The page is plain HTML, CSS and JavaScript modules read from this package (no build step,
nothing fetched from another host), and it talks to the server only through the public
HTTP API, like any other client. ``bitserve serve --no-webui`` leaves it out; with API
keys the page is still served (it holds no data) and asks for a key for every API call.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI
from starlette.responses import FileResponse, Response
from starlette.staticfiles import PathLike, StaticFiles
from starlette.types import Scope

__all__ = ["STATIC_DIR", "browser_url", "install_webui"]

STATIC_DIR = Path(__file__).with_name("static")

# The page runs only its own files: no inline script, nothing from another origin. A
# renderer bug could then still not run injected script (the renderer itself never parses
# model text as HTML; the browser tests check that without relying on this).
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: a new version's page never mixes old files
}


async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)


class _StaticFiles(StaticFiles):
    """``StaticFiles`` whose answers revalidate (ETag) and carry the page's headers."""

    def file_response(
        self, full_path: PathLike, stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(PAGE_HEADERS)
        return response


def install_webui(app: FastAPI) -> None:
    """Serve the page at ``/`` and its files at ``/static/…`` (neither needs a key)."""
    app.add_api_route("/", index, methods=["GET", "HEAD"], include_in_schema=False)
    app.mount("/static", _StaticFiles(directory=STATIC_DIR), name="webui-static")


def browser_url(host: str, port: int) -> str:
    """The page's address for a person to open: a wildcard listen address becomes the
    loopback one, and an IPv6 address gets its brackets."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}/"
