"""``/health``, ``/v1/models`` and ``/metrics`` (Prometheus text)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.responses import Response

from bitserve.api.auth import require_key
from bitserve.api.served import ServedModel

health_router = APIRouter(tags=["system"])
router = APIRouter(tags=["system"], dependencies=[Depends(require_key)])


@health_router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    """Liveness (never needs a key): `{"status": "ok", "model", "demo"}`."""
    served: ServedModel = request.app.state.served
    return {"status": "ok", "model": served.name, "demo": served.loaded.is_demo}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    """The served model and every alias it answers to (OpenAI's model list)."""
    served: ServedModel = request.app.state.served
    names = (*served.names, *request.app.state.settings.oracle.aliases)
    data = [
        {"id": name, "object": "model", "created": served.created, "owned_by": "bitserve"}
        for name in dict.fromkeys(names)
    ]
    data[0]["meta"] = served.describe()
    return {"object": "list", "data": data}


class EngineCollector(Collector):
    """Reads the engine loop's counters at scrape time."""

    def __init__(self, served: ServedModel) -> None:
        self.served = served

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self.served.engine.stats
        for name, value, doc in (
            ("requests_started", stats.requests_started, "generations started"),
            ("requests_finished", stats.requests_finished, "generations finished"),
            ("requests_cancelled", stats.requests_cancelled, "generations cancelled"),
            ("requests_failed", stats.requests_failed, "generations that raised"),
            ("tokens_generated", stats.tokens_generated, "tokens generated"),
        ):
            yield CounterMetricFamily(f"bitserve_{name}", doc, value=value)
        yield GaugeMetricFamily(
            "bitserve_queue_depth", "requests waiting", self.served.engine.queue_depth
        )
        yield GaugeMetricFamily("bitserve_busy", "1 while generating", int(stats.running))


def make_registry(served: ServedModel) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(EngineCollector(served))
    return registry


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: engine counters (`bitserve_tokens_generated_total`,
    `bitserve_requests_cancelled_total`, ...) and the queue depth."""
    body = generate_latest(request.app.state.registry)
    return Response(body, media_type="text/plain; version=0.0.4")
