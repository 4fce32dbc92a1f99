"""``start_nginx`` on a port something else answers on: it must fail and say why, not
hand back that other server's URL as the cluster's."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bitserve.cluster.nginx import NginxError, start_nginx


class _Healthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Exclusive(ThreadingHTTPServer):
    allow_reuse_address = False  # (with it, Linux let nginx bind the same port too)


@pytest.fixture
def other_server() -> Iterator[int]:
    """Another HTTP server on 127.0.0.1 (an earlier cluster, say) that answers /health."""
    server = _Exclusive(("127.0.0.1", 0), _Healthy)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_a_port_in_use_is_an_error_not_someone_elses_cluster(
    other_server: int, tmp_path: Path
) -> None:
    """scripts/cluster --port 9000 with 9000 taken printed http://127.0.0.1:9000 and
    'Ctrl-C stops everything' while nginx had failed to bind: clients reached whatever
    held the port."""
    with pytest.raises(NginxError, match="Address already in use"):
        start_nginx(tmp_path / "nginx", ["127.0.0.1:1"], other_server)
