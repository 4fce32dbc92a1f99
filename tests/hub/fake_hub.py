"""A local stand-in for the Hugging Face Hub: the endpoints ``huggingface_hub`` really
calls, served on 127.0.0.1 and reached through ``HF_ENDPOINT`` (or ``endpoint=``).

- ``GET /api/models/{repo}[/revision/{rev}]`` (``?blobs=true``): the model info, with every
  file's size, git blob id and LFS metadata (sha256, size);
- ``HEAD|GET /{repo}/resolve/{rev}/{file}``: for an LFS file a 302 to the "CDN" (a second
  port, so the client treats it as another host, as with the real hub), carrying the
  ``X-Repo-Commit``, ``X-Linked-Etag`` and ``X-Linked-Size`` headers; errors carry the
  hub's ``X-Error-Code`` (``RepoNotFound``, ``GatedRepo``, ``RevisionNotFound``,
  ``EntryNotFound``);
- ``GET /blobs/{sha256}`` on the CDN port: the bytes, honouring ``Range: bytes=N-``.

Every request is logged (method, path, ``Range``, status, body bytes sent), so tests
can prove what the client did: a resume is a second GET with ``Range: bytes=N-``.
Faults are set per file: ``drop_after`` cuts the first transfer after that many bytes,
``stall_after`` stops sending after that many (the connection held open until ``stop``),
``endless`` sends the file and then zeros without end (no ``Content-Length``),
``served`` replaces the bytes the CDN sends (a corrupted download), ``listed_size``
overrides the size the hub advertises (a file too big for the disk), ``resolve_headers``
the headers of the resolve answer (a hub naming paths ``../x``), ``cdn_answer`` the
whole answer of the CDN (status, headers, body: a redirect loop, a broken gzip); a repository's
``info`` replaces the model-info answer (a hub that is not one, or a broken one), and
``info_stalls`` holds it back until ``stop`` (a hub that accepts and never answers),
``info_trickle_s`` sends it a byte every so many seconds;
a file's ``resolve_stalls`` does the same to its metadata (HEAD) answer, and
``trickle_s`` has the CDN send it one byte every so many seconds (resumed ranges too).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit


@dataclass
class HubFile:
    content: bytes
    lfs: bool = True
    served: bytes | None = None  # what the CDN sends instead of ``content``
    drop_after: int | None = None  # cut the first GET after this many bytes
    stall_after: int | None = None  # send this many bytes, then nothing until the hub stops
    endless: bool = False  # no Content-Length; the file, then more bytes until the client goes
    listed_size: int | None = None  # the size the hub advertises instead of the real one
    resolve_headers: dict[str, str] = field(default_factory=dict)  # override the resolve's
    cdn_answer: tuple[int, dict[str, str], bytes] | None = None  # the CDN's, instead
    resolve_stalls: bool = False  # the resolve (HEAD) answer never comes (until the hub stops)
    trickle_s: float | None = None  # the CDN sends one byte every this many seconds

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def git_oid(self) -> str:
        header = f"blob {len(self.content)}\0".encode()
        return hashlib.sha1(header + self.content).hexdigest()

    @property
    def size(self) -> int:
        return len(self.content) if self.listed_size is None else self.listed_size


@dataclass
class HubRepo:
    files: dict[str, HubFile]
    gated: bool = False
    commit: str = ""
    info: bytes | None = None  # what the model-info endpoint answers instead (a broken hub)
    info_stalls: bool = False  # the model-info answer never comes (until the hub stops)
    info_trickle_s: float | None = None  # its body comes one byte every this many seconds

    def __post_init__(self) -> None:
        if not self.commit:
            self.new_commit()

    def new_commit(self) -> None:
        """A new commit id from the files' contents (call after changing them)."""
        digest = hashlib.sha1()
        for name, f in sorted(self.files.items()):
            digest.update(name.encode("utf-8", "surrogatepass") + f.content)
        digest.update(self.commit.encode())
        self.commit = digest.hexdigest()


@dataclass(frozen=True)
class Request:
    server: str  # "hub" or "cdn"
    method: str
    path: str
    range: str | None
    authorization: str | None
    status: int
    sent: int  # body bytes written


@dataclass
class FakeHub:
    repos: dict[str, HubRepo] = field(default_factory=dict)
    token: str = "hf_test_token"  # the token that opens gated repos
    log: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self.stopping = threading.Event()  # releases stalled transfers

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> FakeHub:
        self.stopping.clear()
        for role in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, role))
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
            self._servers.append(server)
        return self

    def stop(self) -> None:
        self.stopping.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    # -- inspection ---------------------------------------------------------------------

    def record(self, request: Request) -> None:
        with self._lock:
            self.log.append(request)

    def requests(self, server: str | None = None, method: str | None = None) -> list[Request]:
        with self._lock:
            return [
                r
                for r in self.log
                if (server is None or r.server == server) and (method is None or r.method == method)
            ]

    def blob_gets(self) -> list[Request]:
        return self.requests("cdn", "GET")

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()

    def find_blob(self, sha256: str) -> HubFile | None:
        for repo in self.repos.values():
            for f in repo.files.values():
                if f.sha256 == sha256:
                    return f
        return None


def _handler(hub: FakeHub, role: str) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubHandler):
        pass

    Handler.hub = hub
    Handler.role = role
    return Handler


_API = re.compile(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?")
_RESOLVE = re.compile(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)")
_BLOB = re.compile(r"/blobs/([0-9a-f]{64})")
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


class _HubHandler(BaseHTTPRequestHandler):
    hub: FakeHub
    role: str
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    # -- routing ------------------------------------------------------------------------

    def _dispatch(self, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        sent = 0
        if self.role == "cdn":
            m = _BLOB.fullmatch(path)
            status, sent = self._blob(m.group(1), head) if m else self._error(404, "Nope", head)
        elif m := _API.fullmatch(path):
            status = self._model_info(m.group(1), m.group(2), head)
        elif m := _RESOLVE.fullmatch(path):
            status, sent = self._resolve(m.group(1), m.group(2), m.group(3), head)
        else:
            status, _ = self._error(404, "Nope", head)
        self.hub.record(
            Request(
                self.role,
                "HEAD" if head else "GET",
                path,
                self.headers.get("Range"),
                self.headers.get("Authorization"),
                status,
                sent,
            )
        )

    def _send(self, status: int, headers: dict[str, str], body: bytes, head: bool) -> int:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
            return len(body)
        return 0

    def _error(
        self, status: int, code: str, head: bool, commit: str | None = None
    ) -> tuple[int, int]:
        headers = {"X-Error-Code": code, "X-Error-Message": f"{code} (fake hub)"}
        if commit:
            headers["X-Repo-Commit"] = commit
        body = json.dumps({"error": code}).encode()
        headers["Content-Type"] = "application/json"
        return status, self._send(status, headers, body, head)

    def _authorized(self, repo: HubRepo) -> str | None:
        """None if the request may read ``repo``, else the error status to answer."""
        if not repo.gated:
            return None
        auth = self.headers.get("Authorization")
        if auth is None:
            return "401"
        return None if auth == f"Bearer {self.hub.token}" else "403"

    # -- endpoints ----------------------------------------------------------------------

    def _model_info(self, repo_id: str, revision: str | None, head: bool) -> int:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error(401, "RepoNotFound", head)[0]
        if revision not in (None, "main", repo.commit):
            return self._error(404, "RevisionNotFound", head)[0]
        if repo.info_stalls:
            self.hub.stopping.wait()
            self.close_connection = True
            return 0
        if repo.info is not None:
            self._send(200, {"Content-Type": "application/json"}, repo.info, head)
            return 200
        if repo.info_trickle_s is not None and not head:
            info = json.dumps({"id": repo_id, "sha": repo.commit, "siblings": []}).encode()
            headers = {"Content-Type": "application/json"}
            self._send_trickle(200, headers, info, repo.info_trickle_s)
            return 200
        siblings = []
        for name, f in sorted(repo.files.items()):
            item: dict[str, Any] = {"rfilename": name, "size": f.size, "blobId": f.git_oid}
            if f.lfs:
                item["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
            siblings.append(item)
        info = {
            "_id": repo.commit[:24],
            "id": repo_id,
            "modelId": repo_id,
            "sha": repo.commit,
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "tags": ["gguf"],
            "siblings": siblings,
        }
        self._send(200, {"Content-Type": "application/json"}, json.dumps(info).encode(), head)
        return 200

    def _resolve(self, repo_id: str, revision: str, filename: str, head: bool) -> tuple[int, int]:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error(401, "RepoNotFound", head)
        denied = self._authorized(repo)
        if denied is not None:
            return self._error(int(denied), "GatedRepo", head)
        if revision not in ("main", repo.commit):
            return self._error(404, "RevisionNotFound", head)
        f = repo.files.get(filename)
        if f is None:
            return self._error(404, "EntryNotFound", head, commit=repo.commit)
        if f.resolve_stalls:
            self.hub.stopping.wait()
            self.close_connection = True
            return 0, 0
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{f.git_oid}"'}
        if not f.lfs:
            return 200, self._send(200, headers | f.resolve_headers, f.content, head)
        headers.update(
            {
                "X-Linked-Etag": f'"{f.sha256}"',
                "X-Linked-Size": str(f.size),
                "Location": f"{self.hub.cdn_url}/blobs/{f.sha256}",
            }
        )
        return 302, self._send(302, headers | f.resolve_headers, b"", head)

    def _blob(self, sha256: str, head: bool) -> tuple[int, int]:
        f = self.hub.find_blob(sha256)
        if f is None:
            return self._error(404, "EntryNotFound", head)
        if f.cdn_answer is not None:
            status, headers, body = f.cdn_answer
            return status, self._send(status, headers, body, head)
        data = f.served if f.served is not None else f.content
        start = 0
        status = 200
        headers = {"Content-Type": "application/octet-stream", "ETag": f'"{sha256}"'}
        if m := _RANGE.fullmatch(self.headers.get("Range", "")):
            start = int(m.group(1))
            end = int(m.group(2)) + 1 if m.group(2) else len(data)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            data = data[start:end]
        if f.trickle_s is not None and not head:  # resumed transfers too
            return status, self._send_trickle(status, headers, data, f.trickle_s)
        if f.endless and not head:
            return status, self._send_endless(headers, data)
        elif f.stall_after is not None and not head:
            return status, self._send_part(headers, data, f.stall_after, stall=True)
        elif f.drop_after is not None and not head:
            cut, f.drop_after = f.drop_after, None  # only the first transfer is cut
            return status, self._send_part(headers, data, cut, stall=False)
        return status, self._send(status, headers, data, head)

    def _send_part(self, headers: dict[str, str], data: bytes, sent: int, stall: bool) -> int:
        """Announce all of ``data`` but send ``sent`` bytes, then nothing until the hub
        stops (``stall``) or drop the connection (the client sees the body end early)."""
        self.send_response(200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:sent])
        self.wfile.flush()
        self.close_connection = True
        if stall:
            self.hub.stopping.wait()
        else:
            self.connection.shutdown(2)  # SHUT_RDWR
        return sent

    def _send_trickle(
        self, status: int, headers: dict[str, str], data: bytes, every_s: float
    ) -> int:
        """``data`` one byte every ``every_s`` seconds, until the client leaves or the hub
        stops (a link at a few bytes a second that no read timeout ends)."""
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.close_connection = True
        sent = 0
        try:
            for byte in data:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                sent += 1
                if self.hub.stopping.wait(every_s):
                    break
        except OSError:  # the client hung up
            pass
        return sent

    def _send_endless(self, headers: dict[str, str], data: bytes) -> int:
        """``data``, then zeros until the client leaves or the hub stops; the body's end is
        the connection's (no ``Content-Length``)."""
        self.send_response(200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        sent, filler = 0, bytes(1 << 16)
        try:
            self.wfile.write(data)
            sent = len(data)
            while not self.hub.stopping.is_set():
                self.wfile.write(filler)
                sent += len(filler)
        except OSError:  # the client hung up
            pass
        return sent
