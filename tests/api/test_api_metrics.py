"""``/metrics``: Prometheus text that parses, engine counters and HTTP-edge metrics (by
route and status, time to first token, inter-token latency) that move with requests."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from api_helpers import chat_body, sse_events
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bitserve.api.app import create_app
from bitserve.api.metrics import (
    count_text_events,
    install_metrics,
    kv_cache_capacity_bytes,
    make_registry,
)
from bitserve.api.served import ServedModel
from bitserve.api.settings import ServerSettings
from bitserve.engine.loader import LoadedModel
from bitserve.store import SQLiteStore

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def client(loaded: LoadedModel, tmp_path: Path) -> Iterator[TestClient]:
    settings = ServerSettings(db_path=tmp_path / "m.db")
    served = ServedModel.create(loaded, settings.max_queue, None, settings.aliases, 0)
    app = create_app(settings, served, SQLiteStore(settings.db_path))
    install_metrics(app, served)  # a no-op once create_app installs them itself
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def scrape(client: TestClient) -> Samples:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_exposition_parses_and_names_every_metric(client: TestClient) -> None:
    samples = scrape(client)
    names = {name for name, _ in samples}
    for name in (
        "bitserve_requests_started_total",
        "bitserve_requests_finished_total",
        "bitserve_requests_cancelled_total",
        "bitserve_prompt_tokens_total",
        "bitserve_cached_tokens_total",
        "bitserve_tokens_generated_total",
        "bitserve_cache_hit_rate",
        "bitserve_queue_depth",
        "bitserve_running_sequences",
        "bitserve_waiting_sequences",
        "bitserve_kv_cache_bytes",
        "bitserve_prefix_cache_hits_total",
        "bitserve_prefix_cache_spilled_total",
        "bitserve_prefix_cache_disk_hits_total",
        "bitserve_prefix_cache_disk_bytes",
        "bitserve_busy",
        "bitserve_time_to_first_token_seconds_count",
        "bitserve_inter_token_latency_seconds_bucket",
    ):
        assert name in names, name
    assert value(samples, "bitserve_running_sequences") == 0
    assert value(samples, "bitserve_cache_hit_rate") == 0


def test_a_streamed_chat_moves_the_counters(client: TestClient) -> None:
    before = scrape(client)
    start = time.perf_counter()
    r = client.post("/v1/chat/completions", json=chat_body(stream=True, max_tokens=6, seed=1))
    elapsed = time.perf_counter() - start
    events = sse_events(r.text)
    chunks = [e for e in events if isinstance(e, dict) and e["choices"][0]["delta"].get("content")]
    assert chunks, "the reply streamed no text"
    after = scrape(client)
    route = {"route": "/v1/chat/completions", "status": "200"}
    assert value(after, "bitserve_http_requests_total", **route) == 1
    assert value(after, "bitserve_requests_finished_total") == 1 + value(
        before, "bitserve_requests_finished_total"
    )
    generated = value(after, "bitserve_tokens_generated_total")
    assert generated - value(before, "bitserve_tokens_generated_total") >= len(chunks)
    assert value(after, "bitserve_time_to_first_token_seconds_count") == 1
    assert 0 < value(after, "bitserve_time_to_first_token_seconds_sum") <= elapsed
    assert value(after, "bitserve_inter_token_latency_seconds_count") == len(chunks) - 1
    prompt = value(after, "bitserve_prompt_tokens_total")
    assert prompt - value(before, "bitserve_prompt_tokens_total") > 5
    # the scrapes themselves are requests too
    assert value(after, "bitserve_http_requests_total", route="/metrics", status="200") >= 1


def test_the_same_prompt_twice_raises_the_cache_hit_rate(client: TestClient) -> None:
    body = chat_body("Tell me about the river and the mill.", max_tokens=2, temperature=0)
    first = client.post("/v1/chat/completions", json=body).json()["usage"]
    middle = scrape(client)
    second = client.post("/v1/chat/completions", json=body).json()["usage"]
    after = scrape(client)
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0 and first["prompt_tokens"] == second["prompt_tokens"]
    moved = value(after, "bitserve_cached_tokens_total") - value(
        middle, "bitserve_cached_tokens_total"
    )
    assert moved == cached
    total = value(after, "bitserve_prompt_tokens_total")
    rate = value(after, "bitserve_cache_hit_rate")
    assert rate == pytest.approx(value(after, "bitserve_cached_tokens_total") / total)
    assert 0 < rate < 1


def test_errors_are_counted_by_route_template_and_status(client: TestClient) -> None:
    assert client.post("/v1/chat/completions", json=chat_body(max_tokens=0)).status_code == 400
    assert client.get("/v1/conversations/conv_1_1").status_code == 404
    assert client.get("/no/such/route").status_code == 404
    assert client.get("/v1/models/no/such-model").status_code == 404
    assert client.get("/static/app.js").status_code == 200  # the web page's: a mount
    after = scrape(client)
    assert (
        value(after, "bitserve_http_requests_total", route="/v1/chat/completions", status="400")
        == 1
    )
    conversation = {"route": "/v1/conversations/{conversation_id}", "status": "404"}
    assert value(after, "bitserve_http_requests_total", **conversation) == 1
    # the template as the OpenAPI document writes it, not the router's {model:path}
    model = {"route": "/v1/models/{model}", "status": "404"}
    assert value(after, "bitserve_http_requests_total", **model) == 1
    assert value(after, "bitserve_http_requests_total", route="unmatched", status="404") == 1
    assert value(after, "bitserve_http_requests_total", route="/static/{path}", status="200") == 1
    assert value(after, "bitserve_time_to_first_token_seconds_count") == 0


def test_prefix_cache_disk_tier_counters(loaded: LoadedModel, tmp_path: Path) -> None:
    settings = ServerSettings(db_path=tmp_path / "d.db", cache_ram_mb=0, cache_disk_mb=64)
    served = ServedModel.create(
        loaded,
        4,
        None,
        settings.aliases,
        0,
        cache_ram_mb=0,
        cache_disk_mb=64,
        cache_dir=tmp_path / "kv",
    )  # no RAM: every finished sequence's KV goes to disk
    app = create_app(settings, served, SQLiteStore(settings.db_path))
    text = "Tell me about the river and the mill, the miller and the wheel. " * 4
    body = chat_body(text, max_tokens=2, temperature=0)  # over MIN_DISK_TOKENS
    with TestClient(app) as c:
        assert value(scrape(c), "bitserve_prefix_cache_disk_bytes") == 0
        c.post("/v1/chat/completions", json=body)
        first = scrape(c)
        second = c.post("/v1/chat/completions", json=body).json()["usage"]
        after = scrape(c)
    served.close()
    assert value(first, "bitserve_prefix_cache_spilled_total") == 1
    assert value(first, "bitserve_prefix_cache_disk_bytes") > 0
    assert value(first, "bitserve_prefix_cache_disk_hits_total") == 0
    assert second["prompt_tokens_details"]["cached_tokens"] == second["prompt_tokens"] - 1
    assert value(after, "bitserve_prefix_cache_disk_hits_total") == 1
    assert value(after, "bitserve_prefix_cache_hits_total") == 1


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n', 1),
        (b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n', 0),
        # a reasoning model's <think> tokens and a streamed tool call are generated text too
        (b'data: {"choices":[{"delta":{"reasoning_content":"Hm"}}]}\n\n', 1),
        (
            b'data: {"choices":[{"delta":{"tool_calls":[{"index":0,'
            b'"function":{"arguments":"{"}}]}}]}\n\n',
            1,
        ),
        (b'data: {"choices":[{"text":"a"}]}\n\ndata: {"choices":[{"text":"b"}]}\n\n', 2),
        (b'data: {"content":"x","stop":false}\n\ndata: {"content":"","stop":true}\n\n', 1),
        (b"data: [DONE]\n\n", 0),
        (b"data: {not json\n\n: comment\n\n", 0),
    ],
)
def test_count_text_events(body: bytes, expected: int) -> None:
    assert count_text_events(body) == expected


def test_router_gauges_under_our_names_and_vllms(loaded: LoadedModel) -> None:
    """llm-d's endpoint picker and KServe scrape vLLM's names by default: each carries
    the value of ours, labelled with the model."""
    served = ServedModel.create(loaded, 4, None, (), 0, max_batch=4)
    stats = served.engine.stats
    stats.running_sequences, stats.waiting_sequences = 3, 2
    scheduler = served.engine.scheduler
    assert scheduler is not None
    scheduler.waiting.extend([object(), object()])  # type: ignore[list-item]  # admitted
    from concurrent.futures import Future

    from bitserve.engine.loop import _Call, _Generation

    served.engine._jobs.put(object.__new__(_Generation))  # one still queued: 3, not 2 + 3
    served.engine._jobs.put(_Call(print, Future()))  # a caller's call (echo scoring): no request
    served.engine._jobs.put(_Call(print, Future(), internal=True))  # the engine's own: none
    assert served.engine.queue_depth == 4  # but --max-queue bounds callers' calls too
    capacity = kv_cache_capacity_bytes(served)
    cfg = loaded.model.config
    assert capacity == 4 * served.ctx_size * 2 * cfg.n_layers * cfg.kv_dim * 2  # f16 k and v
    stats.prefix_cache_bytes = capacity // 2  # finished requests' KV: not in use
    stats.kv_bytes = stats.prefix_cache_bytes + capacity // 4
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(
            generate_latest(make_registry(served)).decode()
        )
        for s in family.samples
    }
    model = (("model_name", served.name),)
    for ours, theirs, expected in (
        ("bitserve_requests_waiting", ("vllm:num_requests_waiting",), 3),
        ("bitserve_requests_running", ("vllm:num_requests_running",), 3),
        (
            "bitserve_kv_cache_usage",
            ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
            0.25,
        ),
    ):
        assert samples[(ours, ())] == expected
        for name in theirs:
            assert samples[(name, model)] == expected
