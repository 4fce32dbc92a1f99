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


class _Replica(BaseHTTPRequestHandler):
    """Answers any GET or POST with its server's name (a replica stand-in)."""

    def _answer(self) -> None:
        body = self.server.name.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


def _replica(port: int, name: str) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", port), _Replica)
    server.name = name  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def _stop(server: ThreadingHTTPServer) -> None:
    server.shutdown()
    server.server_close()


def test_a_replica_back_from_a_crash_takes_requests_when_another_dies(tmp_path: Path) -> None:
    """With max_fails=1, a replica that had failed stayed marked for fail_timeout after
    it came back: when the other replica died meanwhile, nginx found 'no live upstreams'
    and answered 502 with a healthy replica up."""
    import httpx

    from bitserve.api.process import free_port

    ports = [free_port(), free_port()]
    nginx = start_nginx(tmp_path / "nginx", [f"127.0.0.1:{p}" for p in ports], free_port())
    try:
        b = _replica(ports[1], "b")
        for i in range(8):  # a is down: everything reaches b (and a is seen failing)
            got = httpx.get(f"{nginx.url}/v1/conversations/conv_{i}", timeout=10)
            assert got.text == "b"
        a = _replica(ports[0], "a")  # a is back (and b is about to die)
        _stop(b)
        for i in range(8):
            got = httpx.post(f"{nginx.url}/v1/conversations/conv_{i}/chat", timeout=10)
            assert (got.status_code, got.text) == (200, "a")
            assert httpx.get(f"{nginx.url}/health", timeout=10).text == "a"
        _stop(a)
    finally:
        nginx.stop()
