"""The real server process on an SQLite store whose storage fails under it: a database
another process holds locked, a file the server cannot write, a file size limit (what a
full disk looks like to SQLite). Each is a 503 or 507 with one sentence, never a 500 with
a traceback, nothing stored is lost, and the server works again once storage does."""

from __future__ import annotations

import resource
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from api_server import Server, start

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = start(tmp_path, db=tmp_path / "store.db")
    yield s
    s.stop()


def conversation_with_a_turn(url: str) -> tuple[str, list[object]]:
    conv = httpx.post(f"{url}/v1/conversations", timeout=10).json()["id"]
    assert httpx.post(f"{url}/v1/conversations/{conv}/chat", json=CHAT, timeout=60).is_success
    return conv, httpx.get(f"{url}/v1/conversations/{conv}", timeout=10).json()["messages"]


def assert_refused(r: httpx.Response, status: int, code: str, words: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and words in error["message"], error
    if status == 503:
        assert int(r.headers["Retry-After"]) >= 1


def test_a_database_locked_by_another_process_is_503_then_served(server: Server) -> None:
    """It was a 500 with a traceback in the log ('database is locked'), for a chat only
    after its whole reply had been generated."""
    url = server.url
    conv, before = conversation_with_a_turn(url)
    holder = sqlite3.connect(Path(server.log_path).parent / "store.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        for r in (
            httpx.post(f"{url}/v1/conversations", timeout=30),
            httpx.post(f"{url}/v1/conversations/{conv}/chat", json=CHAT, timeout=60),
            httpx.patch(f"{url}/v1/conversations/{conv}", json={"metadata": {}}, timeout=30),
        ):
            assert_refused(r, 503, "store_unavailable", "is locked by another process")
        # reads go on (WAL): the history as it was
        assert httpx.get(f"{url}/v1/conversations/{conv}", timeout=10).json()["messages"] == before
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert httpx.post(f"{url}/v1/conversations/{conv}/chat", json=CHAT, timeout=60).is_success
    assert "Traceback" not in server.log(), server.log_tail()


def test_a_file_size_limit_is_507_then_served_once_lifted(server: Server) -> None:
    """``ulimit -f`` (EFBIG) reaches SQLite as a disk I/O error: it was a 500 with a
    traceback. The limit is set on the running server as ``preexec_fn`` would at start."""
    url = server.url
    conv, before = conversation_with_a_turn(url)
    folder = Path(server.log_path).parent
    largest = max(p.stat().st_size for p in folder.iterdir() if p.is_file())
    limit = largest + 4096
    unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    big = {"messages": [{"role": "system", "content": "word " * 2000}]}  # past the limit
    try:
        r = httpx.post(f"{url}/v1/conversations", json=big, timeout=30)
        assert_refused(r, 507, "storage_full", "file size limit")
        r = httpx.post(
            f"{url}/v1/conversations/{conv}/chat",
            json={**CHAT, "messages": [{"role": "user", "content": "word " * 1500}]},
            timeout=60,
        )
        assert_refused(r, 507, "storage_full", "file size limit")
        assert httpx.get(f"{url}/v1/conversations/{conv}", timeout=10).json()["messages"] == before
    finally:
        resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, unlimited)
    assert httpx.post(f"{url}/v1/conversations", json=big, timeout=30).is_success
    assert httpx.post(f"{url}/v1/conversations/{conv}/chat", json=CHAT, timeout=60).is_success
    assert "Traceback" not in server.log(), server.log_tail()


def immutable(path: Path, on: bool) -> bool:
    """``chattr +i``/``-i``: a file even root cannot write (chmod does not stop root)."""
    if shutil.which("chattr") is None:
        return False
    flag = "+i" if on else "-i"
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


def test_a_read_only_database_is_503_then_served_once_writable(tmp_path: Path) -> None:
    """SQLite opens a file it cannot write read-only and kept it so: every write was a
    500 with a traceback, even after the file was writable again, until a restart."""
    db = tmp_path / "store.db"
    first = start(tmp_path / "a", db=db)
    try:
        conv, before = conversation_with_a_turn(first.url)
    finally:
        first.stop()
    if not immutable(db, True):
        pytest.skip("chattr +i is not available here")
    try:
        s = start(tmp_path / "b", db=db)
    except BaseException:
        immutable(db, False)
        raise
    try:
        url = s.url
        r = httpx.post(f"{url}/v1/conversations/{conv}/chat", json=CHAT, timeout=60)
        assert_refused(r, 503, "store_unavailable", "cannot be written")
        assert httpx.get(f"{url}/v1/conversations/{conv}", timeout=10).json()["messages"] == before
        immutable(db, False)
        assert httpx.post(f"{url}/v1/conversations/{conv}/chat", json=CHAT, timeout=60).is_success
        assert "Traceback" not in s.log(), s.log_tail()
    finally:
        immutable(db, False)
        s.stop()
