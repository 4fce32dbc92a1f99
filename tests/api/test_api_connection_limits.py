"""Connection and body limits of the real server process, over real sockets: the key is
checked before the body is read, bodies over ``--max-body-mb`` are refused unread (413),
request heads that never finish and bodies that stop halfway are cut after
``--head-timeout`` (of silence, for a body) with a 408, and running out of file descriptors logs
one line per interval instead of a traceback per accept attempt."""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from api_server import Server, start

KEY = "sk-limits"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start(
        tmp_path_factory.mktemp("limits"),
        "--api-key", KEY, "--max-body-mb", "1", "--head-timeout", "1",
    )  # fmt: skip
    yield s
    s.stop()


def connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def response_head(sock: socket.socket, timeout: float = 5.0) -> str:
    """What the server answers, up to the end of its head (or whatever came before EOF)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.decode("latin-1")


def post_head(path: str, length: int, key: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"{auth}Content-Length: {length}\r\n\r\n"
    ).encode()


def test_a_keyless_request_is_refused_before_its_body_is_sent(server: Server) -> None:
    with connect(server) as sock:
        # a body the server would have to wait for: never sent
        sock.sendall(post_head("/v1/chat/completions", 900_000))
        head = response_head(sock)
    assert head.startswith("HTTP/1.1 401"), head


def test_a_body_over_the_limit_is_refused_unread(server: Server) -> None:
    with connect(server) as sock:
        sock.sendall(post_head("/v1/chat/completions", 300 * 2**20, KEY))
        head = response_head(sock)
    assert head.startswith("HTTP/1.1 413"), head
    # the same through a client, with the API's error body naming the limit
    answer = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=b"x" * (2**20 + 1),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert answer.status_code == 413
    error = answer.json()["error"]
    assert error["code"] == "request_too_large" and str(2**20) in error["message"]


def test_a_chunked_body_is_counted_as_it_comes(server: Server) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b" " * 65536  # 2.5 MB in all, no Content-Length

    answer = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=chunks(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "request_too_large"


def requests_counted(server: Server, route: str, status: int) -> float:
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    line = f'bitserve_http_requests_total{{route="{route}",status="{status}"}} '
    return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(line))


def response_of(sock: socket.socket, timeout: float) -> tuple[str, bytes]:
    """The head and the body the server sends before it closes the connection."""
    head = response_head(sock, timeout)
    data = head.encode("latin-1")
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.decode("latin-1"), body


def test_request_heads_that_never_finish_are_cut(server: Server) -> None:
    """A head begun but never finished is answered 408 and counted so (as nginx logs it):
    it was closed without a word, and not counted at all. A connection that sent nothing
    is closed quietly."""
    late_heads = requests_counted(server, "unmatched", 408)
    silent, partial = connect(server), connect(server)
    try:
        partial.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        start_wait = time.monotonic()
        head, body = response_of(partial, timeout=10)
        assert time.monotonic() - start_wait < 8
        assert head.startswith("HTTP/1.1 408") and "connection: close" in head.lower(), head
        assert "x-bitserve-replica:" in head.lower()
        assert json.loads(body)["error"]["code"] == "request_timeout"
        assert response_head(silent, timeout=10) == ""  # closed without an answer
    finally:
        silent.close()
        partial.close()
    # a client that sends its head in time is served on the same server meanwhile
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert requests_counted(server, "unmatched", 408) == late_heads + 1


def test_a_body_that_stops_halfway_is_cut_and_one_with_short_pauses_is_served(
    server: Server,
) -> None:
    """The stopped body is a 408 under its route: it was closed unanswered and counted as
    499, as if the client had left."""
    route = "/v1/completions"
    late, left = requests_counted(server, route, 408), requests_counted(server, route, 499)
    body = b'{"model": "bitnet", "prompt": "Hi", "max_tokens": 1}'
    with connect(server) as sock:
        sock.sendall(post_head(route, len(body), KEY) + body[:10])
        start_wait = time.monotonic()
        head, answer = response_of(sock, timeout=10)
        assert time.monotonic() - start_wait < 8
    assert head.startswith("HTTP/1.1 408") and "connection: close" in head.lower(), head
    error = json.loads(answer)["error"]
    assert error["code"] == "request_timeout" and "--head-timeout" in error["message"]
    assert requests_counted(server, route, 408) == late + 1
    assert requests_counted(server, route, 499) == left
    with connect(server) as sock:  # pauses shorter than the 1 s limit, 2 s in all
        sock.sendall(post_head(route, len(body), KEY))
        for i in range(0, len(body), 13):
            time.sleep(0.5)
            sock.sendall(body[i : i + 13])
        assert response_head(sock, timeout=30).startswith("HTTP/1.1 200"), "served"
    assert "Traceback" not in server.log()


def test_transfer_encoding_with_content_length_is_refused_and_closes(server: Server) -> None:
    """Both headers: h11 follows Transfer-Encoding, a proxy in front may follow
    Content-Length, and the rest of the body becomes a request of its own (smuggling).
    It was served, and the connection kept for the request behind it; RFC 9112 6.3 says
    close after answering."""
    body = b'{"content": "Hi"}'
    smuggled = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with connect(server) as sock:
        sock.sendall(
            b"POST /tokenize HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer %s\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n"
            b"\r\n%x\r\n%s\r\n0\r\n\r\n%s" % (KEY.encode(), len(body), body, smuggled)
        )
        head, answer = response_of(sock, timeout=10)
    assert head.startswith("HTTP/1.1 400") and "connection: close" in head.lower(), head
    assert b"HTTP/1.1" not in answer  # the request behind it was not answered
    error = json.loads(answer)["error"]
    assert error["code"] == "malformed_request" and "Transfer-Encoding" in error["message"]


CHUNKED_HEAD = (
    b"POST /tokenize HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Authorization: Bearer " + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
)


@pytest.mark.parametrize(
    ("request_bytes", "status", "says"),
    [
        (b"GARBAGE\r\n\r\n", 400, "illegal request line"),
        (b"GET /health HTTP/1.1\r\nHost: a\r\nAuthorization : Bearer " + KEY.encode() + b"\r\n\r\n",
         400, "illegal header line"),
        (b"POST /tokenize HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
         400, "conflicting Content-Length"),
        (post_head("/tokenize", 2).replace(b": 2", b": -2"), 400, "bad Content-Length"),
        (b"POST /tokenize HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501,
         "Only Transfer-Encoding: chunked is supported"),
        (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 2**20 + b"\r\n\r\n",
         431, "its head is over 16 KB"),
    ],
)  # fmt: skip
def test_a_request_h11_refuses_is_answered_in_the_api_shape_and_counted(
    server: Server, request_bytes: bytes, status: int, says: str
) -> None:
    """uvicorn answered these in plain text ('Invalid HTTP request received.'), without
    the replica header, and /metrics never saw them."""
    before = requests_counted(server, "unmatched", status)
    with connect(server) as sock:
        sock.sendall(request_bytes)  # all of it: the server reads what it does not use
        head, answer = response_of(sock, timeout=10)
    assert head.startswith(f"HTTP/1.1 {status} ") and "connection: close" in head.lower(), head
    assert "x-bitserve-replica:" in head.lower()
    error = json.loads(answer)["error"]
    assert error["code"] == "malformed_request" and says in error["message"], error
    assert KEY not in error["message"]  # h11 quotes the line: never echoed, never logged
    assert requests_counted(server, "unmatched", status) == before + 1
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


@pytest.mark.parametrize("chunk", [b"zz\r\n", b"-5\r\n"])
def test_a_bad_chunk_mid_body_is_a_400_under_its_route(server: Server, chunk: bytes) -> None:
    """The body had started: the route answers (it was counted as a 499, client gone)."""
    before = requests_counted(server, "/tokenize", 400)
    left = requests_counted(server, "/tokenize", 499)
    with connect(server) as sock:
        sock.sendall(CHUNKED_HEAD + b"2\r\n{}\r\n")
        time.sleep(0.2)  # the route is reading the body
        sock.sendall(chunk)
        head, answer = response_of(sock, timeout=10)
    assert head.startswith("HTTP/1.1 400") and "connection: close" in head.lower(), head
    assert "illegal chunk header" in json.loads(answer)["error"]["message"]
    assert requests_counted(server, "/tokenize", 400) == before + 1
    assert requests_counted(server, "/tokenize", 499) == left
    assert "Traceback" not in server.log()


def test_out_of_file_descriptors_logs_once_per_interval(tmp_path: Path) -> None:
    # the server process gets 64 file descriptors (the model file, the store, the engine
    # and the listening socket take about 20 of them)
    limited = (
        sys.executable, "-c",
        "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)); "
        "sys.argv = ['bitserve', 'serve', *sys.argv[1:]]; "
        "runpy.run_module('bitserve.cli', run_name='__main__')",
    )  # fmt: skip
    server = start(tmp_path, "--head-timeout", "3", launcher=limited)
    socks: list[socket.socket] = []
    try:
        for _ in range(100):  # the kernel's backlog accepts them; the server cannot
            socks.append(connect(server))
        time.sleep(2.5)
        log = server.log()
        assert log.count("Too many open files") <= 2, log[-3000:]
        assert "cannot accept connections" in log
        assert "socket.accept() out of system resource" not in log
        for sock in socks:
            sock.close()
        socks.clear()
        # the held connections are cut by the head timeout; the server recovers
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail("the server did not recover: " + server.log_tail())
    finally:
        for sock in socks:
            sock.close()
        server.stop()


def test_only_known_host_names_are_answered(server: Server) -> None:
    port = server.url.rsplit(":", 1)[1]
    auth = {"Authorization": f"Bearer {KEY}"}
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}",
                 f"10.1.2.3:{port}"):  # fmt: skip
        answer = httpx.get(f"{server.url}/v1/models", headers={**auth, "Host": host}, timeout=10)
        assert answer.status_code == 200, host
    # DNS rebinding: a page on attacker.example whose name now points at 127.0.0.1
    answer = httpx.get(
        f"{server.url}/v1/conversations",
        headers={**auth, "Host": f"attacker.example:{port}"},
        timeout=10,
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "invalid_host"


def test_allowed_host_adds_a_name(tmp_path: Path) -> None:
    with start(tmp_path, "--allowed-host", "bitserve.lan") as server:
        ok = httpx.get(f"{server.url}/health", headers={"Host": "bitserve.lan:80"}, timeout=10)
        other = httpx.get(f"{server.url}/health", headers={"Host": "other.lan"}, timeout=10)
    assert ok.status_code == 200 and other.status_code == 400
