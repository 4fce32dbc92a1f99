"""``--cache-disk`` / ``--cache-dir`` end to end: the real server process with a prefix
cache too small for two conversations; the evicted one's next turn is read back from disk,
and after a restart on the same ``--cache-dir`` both conversations still hit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from api_server import Server, metric, start

# ~600 tokens of the demo tokenizer: one conversation's KV (1 KB a token, plus the room the
# prefix cache keeps for a next turn) fills most of a 1 MB prefix cache
LONG = " ".join(
    f"The mill by the river turned {i} times before the miller slept." for i in range(60)
)


def test_negative_cache_disk_is_a_one_line_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bitserve.cli", "serve", "--cache-disk", "-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--cache-disk" in lines[0]


def new_conversation(server: Server) -> str:
    r = httpx.post(f"{server.url}/v1/conversations", json={}, timeout=10)
    return str(r.json()["id"])


def turn(server: Server, conv: str, text: str) -> dict[str, Any]:
    """One turn of ``conv``; its usage."""
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 4, "temperature": 0}
    r = httpx.post(f"{server.url}/v1/conversations/{conv}/chat", json=body, timeout=120)
    assert r.status_code == 200, r.text
    usage: dict[str, Any] = r.json()["usage"]
    return usage


def cached(usage: dict[str, Any]) -> int:
    return int(usage["prompt_tokens_details"]["cached_tokens"])


def test_an_evicted_conversation_comes_back_from_disk_and_after_a_restart(
    tmp_path: Path,
) -> None:
    args = ("--cache-ram", "1", "--cache-disk", "64", "--cache-dir", str(tmp_path / "kv"))
    db = tmp_path / "spill.db"
    server = start(tmp_path / "a", *args, db=db)
    try:
        a, b = new_conversation(server), new_conversation(server)
        first_a = turn(server, a, "A: " + LONG)
        assert first_a["prompt_tokens"] > 400  # the premise: two of these do not fit in 1 MB
        turn(server, b, "B: " + LONG)  # evicts a's KV to disk
        assert metric(server.url, "bitserve_prefix_cache_spilled_total") >= 1
        second_a = turn(server, a, "And then?")
        assert cached(second_a) >= first_a["prompt_tokens"]  # the whole first turn
        assert metric(server.url, "bitserve_prefix_cache_disk_hits_total") == 1
    finally:
        server.stop()  # a clean stop writes the RAM entries to disk too
    assert list((tmp_path / "kv").glob("*/*.kv"))
    again = start(tmp_path / "b", *args, db=db)
    try:
        assert cached(turn(again, b, "And then?")) > 400
        assert cached(turn(again, a, "And after that?")) >= second_a["prompt_tokens"]
        assert metric(again.url, "bitserve_prefix_cache_disk_hits_total") == 2
    finally:
        again.stop()


def test_a_clean_stop_writes_the_prefix_cache_to_disk(tmp_path: Path) -> None:
    """SIGTERM (systemd, Kubernetes, ``server.stop()``): the conversation never evicted
    must be on disk after the stop and hit after a restart. uvicorn re-raises the signal
    once it has shut down, which killed the process before it wrote anything."""
    args = ("--cache-disk", "64", "--cache-dir", str(tmp_path / "kv"))
    db = tmp_path / "stop.db"
    server = start(tmp_path / "a", *args, db=db)
    try:
        conv = new_conversation(server)
        first = turn(server, conv, "A: " + LONG)
        assert metric(server.url, "bitserve_prefix_cache_spilled_total") == 0
    finally:
        server.stop()
    assert list((tmp_path / "kv").glob("*/*.kv"))
    again = start(tmp_path / "b", *args, db=db)
    try:
        assert cached(turn(again, conv, "And then?")) >= first["prompt_tokens"]
    finally:
        again.stop()


def test_an_idle_server_holds_no_kv_beyond_its_prefix_cache(tmp_path: Path) -> None:
    """A spilled cache was released only at the engine's next spill call: an engine that
    went idle right after a spill kept it, counted as KV in use by running requests."""
    import time

    args = ("--cache-ram", "1", "--cache-disk", "64", "--cache-dir", str(tmp_path / "kv"))
    server = start(tmp_path / "a", *args)
    try:
        for name in "ABCD":  # each evicts (spills) the one before
            turn(server, new_conversation(server), f"{name}: " + LONG)
        assert metric(server.url, "bitserve_prefix_cache_spilled_total") >= 2
        deadline = time.monotonic() + 10
        while metric(server.url, "bitserve_kv_cache_usage") != 0.0:
            assert time.monotonic() < deadline, "spilled KV still counted as in use"
            time.sleep(0.1)
        assert metric(server.url, "bitserve_kv_cache_bytes") == metric(
            server.url, "bitserve_prefix_cache_bytes"
        )
    finally:
        server.stop()
