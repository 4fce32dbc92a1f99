"""Prometheus metrics of one app: the engine's counters, read at scrape time, and what the
HTTP edge measures (requests by route and status, time to first token, inter-token gaps).

Everything hangs off a per-app ``CollectorRegistry`` (never prometheus-client's global
one), so tests build as many apps as they like. :func:`install_metrics` puts the registry
on ``app.state.registry`` (``GET /metrics`` renders it) and adds :class:`MetricsMiddleware`.

Routers: llm-d's endpoint picker (the Gateway API inference extension) and KServe read a
model server's queued requests, running requests and KV-cache use from Prometheus under
vLLM's names, which their defaults scrape. :data:`ROUTER_GAUGES` exports those three (and
vLLM's older name of the third) next to ours, with vLLM's ``model_name`` label, so
bitserve sits behind them unchanged.

Latencies are measured where the events reach the client: the middleware times the body
chunks of ``text/event-stream`` responses. The first chunk carrying generated text gives
the time to first token (from the request's arrival, so queueing and the prompt are in
it); each later one an inter-token latency. A token whose text is held back (half a UTF-8
character, a possible stop string) shows up with the chunk that finally carries it, as
the client sees it. Non-streamed responses have no first token to time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from fastapi import FastAPI

    from bitserve.api.served import ServedModel

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
UNMATCHED_ROUTE = "unmatched"  # 404s: raw paths would make the label set unbounded

# engine counters: metric name, help, the EngineStats attributes summed (absent reads as 0)
ENGINE_COUNTERS = (
    ("requests_started", "generations started", ("requests_started",)),
    ("requests_finished", "generations finished", ("requests_finished",)),
    ("requests_cancelled", "generations cancelled", ("requests_cancelled",)),
    ("requests_failed", "generations that raised", ("requests_failed",)),
    ("prompt_tokens", "prompt tokens, computed or cached", ("prompt_tokens", "cached_tokens")),
    ("cached_tokens", "prompt tokens reused from the prefix cache", ("cached_tokens",)),
    ("tokens_generated", "tokens generated", ("tokens_generated",)),
    ("prefix_cache_lookups", "prefix cache lookups", ("cache_lookups",)),
    ("prefix_cache_hits", "prefix cache lookups that reused a token", ("cache_hits",)),
)
# prefix cache counters read from ``PrefixCacheStats`` (the engine's stats do not carry them)
PREFIX_CACHE_COUNTERS = (
    ("prefix_cache_spilled", "prefix cache entries evicted from RAM to disk", "spilled"),
    ("prefix_cache_disk_hits", "prefix cache hits read back from disk", "disk_hits"),
)
ENGINE_GAUGES = (
    ("waiting_sequences", "sequences admitted but not running yet", "waiting_sequences"),
    ("kv_cache_bytes", "KV cache bytes allocated (sequences and prefix cache)", "kv_bytes"),
    ("prefix_cache_bytes", "KV cache bytes held by the prefix cache", "prefix_cache_bytes"),
)


# the load a router balances on: our name, vLLM's names (what llm-d's endpoint picker and
# KServe scrape by default), and what it measures
ROUTER_GAUGES = (
    ("bitserve_requests_waiting", ("vllm:num_requests_waiting",),
     "requests waiting to run: queued, or admitted but not yet in the running batch"),
    ("bitserve_requests_running", ("vllm:num_requests_running",),
     "requests generating now (the running batch)"),
    ("bitserve_kv_cache_usage", ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
     "KV cache held by running requests / what max_batch full contexts hold (0 to 1)"),
)  # fmt: skip


def kv_cache_capacity_bytes(served: ServedModel) -> int:
    """KV bytes of ``max_batch`` sequences each filling the context: the most running
    requests can hold (the prefix cache keeps finished ones apart, like vLLM's free but
    cached blocks, which its usage does not count either)."""
    scheduler = served.engine.scheduler
    if scheduler is None:
        return 0
    cfg = served.loaded.model.config
    itemsize = np.dtype(scheduler.config.kv_dtype).itemsize
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * itemsize  # k and v
    return scheduler.config.max_batch * served.ctx_size * per_token


def _stat(stats: object, name: str) -> float:
    value = getattr(stats, name, 0)
    return float(value) if isinstance(value, int | float) else 0.0


class EngineCollector(Collector):
    """Reads the served model's ``EngineLoop`` (``stats``, ``queue_depth``) at scrape time.

    ``EngineStats.prompt_tokens`` counts the prompt tokens the model computed and
    ``cached_tokens`` those reused instead; the exported ``bitserve_prompt_tokens_total``
    is their sum (every prompt token), so the hit rate is cached / prompt tokens.
    """

    def __init__(self, served: ServedModel) -> None:
        self.served = served

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        engine = self.served.engine
        stats = engine.stats
        for name, doc, attrs in ENGINE_COUNTERS:
            total = sum(_stat(stats, a) for a in attrs)
            yield CounterMetricFamily(f"bitserve_{name}", doc, value=total)
        cached = _stat(stats, "cached_tokens")
        prompt = _stat(stats, "prompt_tokens") + cached
        yield GaugeMetricFamily(
            "bitserve_cache_hit_rate",
            "prompt tokens reused from the prefix cache / all prompt tokens (0 before any)",
            cached / prompt if prompt else 0.0,
        )
        yield GaugeMetricFamily("bitserve_queue_depth", "requests waiting", engine.queue_depth)
        running = getattr(stats, "running_sequences", None)
        if not isinstance(running, int):
            running = int(bool(stats.running))
        yield GaugeMetricFamily("bitserve_running_sequences", "sequences being generated", running)
        for name, doc, attr in ENGINE_GAUGES:
            yield GaugeMetricFamily(f"bitserve_{name}", doc, _stat(stats, attr))
        yield GaugeMetricFamily("bitserve_busy", "1 while the engine works", int(stats.running))
        yield from self._prefix_cache()
        yield from self._router_gauges(running)

    def _router_gauges(self, running: int) -> Iterator[GaugeMetricFamily]:
        stats = self.served.engine.stats
        waiting = self.served.engine.requests_waiting
        capacity = kv_cache_capacity_bytes(self.served)
        held = _stat(stats, "kv_bytes") - _stat(stats, "prefix_cache_bytes")
        usage = min(1.0, max(0.0, held / capacity)) if capacity else 0.0
        for (ours, theirs, doc), value in zip(
            ROUTER_GAUGES, (waiting, running, usage), strict=True
        ):
            yield GaugeMetricFamily(ours, doc, value)
            for name in theirs:
                family = GaugeMetricFamily(name, f"{doc} (= {ours})", labels=["model_name"])
                family.add_metric([self.served.name], value)
                yield family

    def _prefix_cache(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """Disk-tier counters and the bytes on disk (plain ints written by the engine)."""
        prefix = self.served.prefix_cache
        for name, doc, attr in PREFIX_CACHE_COUNTERS:
            value = _stat(prefix.stats, attr) if prefix is not None else 0.0
            yield CounterMetricFamily(f"bitserve_{name}", doc, value=value)
        spill = prefix.spill if prefix is not None else None
        disk = float(spill.nbytes) if spill is not None else 0.0
        yield GaugeMetricFamily(
            "bitserve_prefix_cache_disk_bytes", "bytes of prefix KV in spill files", disk
        )


@dataclass(slots=True)
class HttpMetrics:
    """The metrics the HTTP edge updates, registered in ``registry``."""

    registry: CollectorRegistry
    requests: Counter = field(init=False)
    ttft: Histogram = field(init=False)
    itl: Histogram = field(init=False)

    def __post_init__(self) -> None:
        self.requests = Counter(
            "bitserve_http_requests",
            "HTTP requests answered, by route template and status code",
            ("route", "status"),
            registry=self.registry,
        )
        self.ttft = Histogram(
            "bitserve_time_to_first_token_seconds",
            "streamed responses: request arrival to the first chunk with generated text",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "bitserve_inter_token_latency_seconds",
            "streamed responses: gap between consecutive chunks with generated text",
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )

    def count_unrouted(self, status: int) -> None:
        """An answer no route saw, written by the connection itself: a request head that
        never finished (408), or one h11 could not parse (400, 431, 501); see
        ``connections.HeadDeadlineProtocol``."""
        self.requests.labels(route=UNMATCHED_ROUTE, status=str(status)).inc()


def _event_has_text(data: Any) -> bool:
    """Whether one SSE payload carries generated text: OpenAI chat (``delta.content``, or
    ``delta.reasoning_content`` and ``delta.tool_calls``, the same tokens read as reasoning
    or calls), legacy completions (``text``) or llama.cpp's ``/completion`` (``content``)."""
    if not isinstance(data, dict):
        return False
    if isinstance(data.get("content"), str) and data["content"]:
        return True
    for choice in data.get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and any(
            delta.get(key) for key in ("content", "reasoning_content", "tool_calls")
        ):
            return True
        if isinstance(choice, dict) and choice.get("text"):
            return True
    return False


def count_text_events(body: bytes) -> int:
    """How many SSE events in ``body`` carry generated text (``[DONE]`` and bad JSON: 0)."""
    count = 0
    for block in body.split(b"\n\n"):
        if not block.startswith(b"data: ") or block == b"data: [DONE]":
            continue
        try:
            count += _event_has_text(json.loads(block[6:]))
        except ValueError:
            continue
    return count


class _Exchange:
    """One HTTP request/response as the middleware watches it go by."""

    def __init__(self, metrics: HttpMetrics) -> None:
        self.metrics = metrics
        self.started = time.perf_counter()
        self.status = 500  # if the app raises before answering
        self.streaming = False
        self.last_token: float | None = None

    def on_send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            headers = dict(message.get("headers") or ())
            self.streaming = headers.get(b"content-type", b"").startswith(b"text/event-stream")
        elif message["type"] == "http.response.body" and self.streaming:
            for _ in range(count_text_events(message.get("body", b""))):
                self._token(time.perf_counter())

    def _token(self, now: float) -> None:
        if self.last_token is None:
            self.metrics.ttft.observe(now - self.started)
        else:
            self.metrics.itl.observe(now - self.last_token)
        self.last_token = now

    def finish(self, scope: Scope) -> None:
        label = route_label(scope)
        self.metrics.requests.labels(route=label, status=str(self.status)).inc()


def route_label(scope: Scope) -> str:
    """The template of the route that answered, as the OpenAPI document writes it
    (``/v1/models/{model}``, not the router's ``{model:path}``), a mounted app's
    (the web page's files) as ``/static/{path}``; ``unmatched`` for unknown paths."""
    route = scope.get("route")
    if route is None:  # Starlette names no route for a mount: the one holding the endpoint
        endpoint, routes = scope.get("endpoint"), getattr(scope.get("app"), "routes", ())
        mounts = (r for r in routes if endpoint is not None and getattr(r, "app", None) is endpoint)
        route = next(mounts, None)
    path = getattr(route, "path_format", None)
    return path if isinstance(path, str) else UNMATCHED_ROUTE


class MetricsMiddleware:
    """Pure ASGI middleware (streams pass through untouched, chunk by chunk)."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = _Exchange(self.metrics)

        async def watched_send(message: Message) -> None:
            exchange.on_send(message)
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        finally:
            exchange.finish(scope)


def make_registry(served: ServedModel) -> CollectorRegistry:
    """A fresh registry with the engine's collector (the HTTP metrics come with
    :func:`install_metrics`)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(EngineCollector(served))
    return registry


def install_metrics(app: FastAPI, served: ServedModel) -> HttpMetrics:
    """Give ``app`` its registry (``app.state.registry``) and the middleware. Call before
    the app starts; calling again returns the metrics already installed."""
    existing = getattr(app.state, "http_metrics", None)
    if isinstance(existing, HttpMetrics):
        return existing
    registry = make_registry(served)
    metrics = HttpMetrics(registry)
    app.state.registry = registry
    app.state.http_metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return metrics
