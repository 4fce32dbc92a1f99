"""``/metrics`` read by an independent parser (prometheus-client's own), against the real
server process after a mixed load: the whole exposition parses, counters never go down,
histogram buckets are cumulative with ``_count`` the ``+Inf`` bucket, label values are
escaped, and nothing a client sends (paths, model names, keys) makes new series."""

from __future__ import annotations

import json
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from api_server import Server, start
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from bitserve.api.app import create_app
from bitserve.api.served import ServedModel
from bitserve.api.settings import ServerSettings
from bitserve.engine.loader import load_model
from bitserve.model.fixtures import write_family_fixture
from bitserve.store import SQLiteStore

KEY = "sk-metrics"
AUTH = {"Authorization": f"Bearer {KEY}"}
Series = tuple[str, tuple[tuple[str, str], ...]]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start(tmp_path_factory.mktemp("exposition"), "--api-key", KEY, "--head-timeout", "1")
    yield s
    s.stop()


def scrape(url: str, headers: dict[str, str] = AUTH) -> tuple[str, dict[str, list[Sample]]]:
    """The exposition text and its samples by family (the parser reads all of it, or
    raises)."""
    answer = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    assert answer.status_code == 200
    families = {f.name: list(f.samples) for f in text_string_to_metric_families(answer.text)}
    return answer.text, families


def series(families: dict[str, list[Sample]]) -> set[Series]:
    return {(s.name, tuple(sorted(s.labels.items()))) for v in families.values() for s in v}


def counter_values(families: dict[str, list[Sample]]) -> dict[Series, float]:
    """Every sample that may only grow: counters, and histograms' buckets, sums, counts."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for samples in families.values()
        for s in samples
        if s.name.endswith(("_total", "_bucket", "_count", "_sum"))
    }


def check_histograms(families: dict[str, list[Sample]]) -> None:
    for name, samples in families.items():
        buckets = [s for s in samples if s.name == f"{name}_bucket"]
        if not buckets:
            continue
        bounds = [float(s.labels["le"]) for s in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == float("inf"), name
        values = [s.value for s in buckets]
        assert values == sorted(values), f"{name}: buckets not cumulative: {values}"
        (count,) = (s.value for s in samples if s.name == f"{name}_count")
        assert count == values[-1], f"{name}: _count {count} != +Inf bucket {values[-1]}"


def mixed_load(url: str, tag: str) -> None:
    """One round of everything a client can do, with random names, paths and keys."""
    chat = {"model": "bitnet", "messages": [{"role": "user", "content": f"Hi {tag}"}],
            "max_tokens": 4}  # fmt: skip
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
        with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
            assert r.status_code == 200 and "[DONE]" in r.read().decode()
        assert client.post("/completion", json={"prompt": "Hi", "n_predict": 2}).status_code == 200
        conv = client.post("/v1/conversations").json()["id"]
        assert client.post(f"/v1/conversations/{conv}/chat", json=chat).status_code == 200
        assert client.get(f"/v1/conversations/{conv}").status_code == 200
        oracle = client.post("/oracle/v1/1/chat", json={**chat, "model": "llama-3"})
        assert oracle.status_code == 200
        assert client.post(f"/oracle/v1/{tag}/chat", json=chat).status_code == 404
        # client input that must not become a label value
        assert client.get(f'/no/such/{tag}"\\').status_code == 404
        assert client.post("/v1/chat/completions", json={**chat, "model": tag}).status_code == 404
        assert client.get(f"/v1/models/{tag}").status_code == 404
        bad = client.post("/v1/chat/completions", content=b"{", headers={"Content-Type": "x"})
        assert bad.status_code == 422
        for auth in (f"Bearer sk-{tag}", f'Bearer "{tag}\\', "Bearer"):
            r = client.get("/v1/models", headers={"Authorization": auth})
            assert r.status_code == 401
        r = client.post("/oracle/v1/1/chat", json=chat, headers={"Authorization": tag})
        assert r.status_code == 401
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({**chat, "stream": True, "max_tokens": 200}).encode()
    with socket.create_connection((host, int(port))) as sock:  # leaves mid-stream
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer "
            + KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )
        sock.recv(4096)
    with socket.create_connection((host, int(port))) as sock:  # leaves mid-body
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer "
            + KEY.encode()
            + b"\r\nContent-Length: 50\r\n\r\n{"
        )
        time.sleep(0.1)
    with socket.create_connection((host, int(port))) as sock:  # a head that never ends: 408
        sock.sendall(b"GET /" + tag.encode() + b" HTTP/1.1\r\n")
        sock.settimeout(10)
        assert sock.recv(4096).startswith(b"HTTP/1.1 408")


def test_the_exposition_after_a_mixed_load(server: Server) -> None:
    _, first = scrape(server.url)
    counters = counter_values(first)
    seen: set[Series] = set()
    keys: list[str] = []
    for round_ in range(3):
        tag = secrets.token_hex(6)
        keys.append(tag)
        mixed_load(server.url, tag)
        time.sleep(1.5)  # the cut connections are counted once the server sees them go
        text, families = scrape(server.url)
        check_histograms(families)
        now = counter_values(families)
        for name, before in counters.items():
            assert now.get(name, 0.0) >= before, f"{name} went down: {before} -> {now.get(name)}"
        counters = now
        if round_ > 0:  # the same requests with other random input: no new series
            assert series(families) == seen, series(families) ^ seen
        seen = series(families)
        for tag_sent in keys:
            assert tag_sent not in text
    assert KEY not in text
    statuses = {dict(labels).get("status") for _, labels in seen}
    assert {"200", "401", "404", "408", "422", "499"} <= statuses, statuses
    routes = {dict(labels)["route"] for name, labels in seen if "route" in dict(labels)}
    assert "/oracle/v1/{route}/chat" in routes and "unmatched" in routes
    log = server.log()
    assert "Traceback" not in log and KEY not in log


def test_label_values_are_escaped(tmp_path: Path) -> None:
    """A model named with a quote and a backslash (its file's ``general.name``) is
    vLLM's ``model_name`` label: it must come back from the parser unchanged."""
    name = 'we"ird\\model'
    path = write_family_fixture(tmp_path / "odd.gguf", "llama", name=name)
    loaded = load_model(path, kernel="numpy")
    try:
        settings = ServerSettings(db_path=tmp_path / "db.sqlite")
        served = ServedModel.create(loaded, 4, None, settings.aliases, 0)
        app = create_app(settings, served, SQLiteStore(settings.db_path))
        with TestClient(app) as client:
            text = client.get("/metrics").text
    finally:
        loaded.close()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    labels = [s.labels for s in families["vllm:num_requests_waiting"].samples]
    assert labels == [{"model_name": name}]
    assert 'model_name="we\\"ird\\\\model"' in text
