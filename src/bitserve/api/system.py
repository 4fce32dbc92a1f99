"""``/health``, ``/v1/models``, ``/metrics`` (Prometheus text), and the header that names
the replica behind every response."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bitserve.api.auth import require_key
from bitserve.api.metrics import install_metrics, make_registry
from bitserve.api.served import ServedModel

__all__ = ["ReplicaHeader", "health_router", "install_metrics", "make_registry", "router"]

REPLICA_HEADER = "X-Bitserve-Replica"


class ReplicaHeader:
    """Pure ASGI middleware: ``X-Bitserve-Replica: <name>`` on every response, so a client
    or a load balancer's log can tell which replica answered."""

    def __init__(self, app: ASGIApp, name: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.lower().encode(), name.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), self.header]
            await send(message)

        await self.app(scope, receive, named_send)


health_router = APIRouter(tags=["system"])
router = APIRouter(tags=["system"], dependencies=[Depends(require_key)])


@health_router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    """Liveness and readiness (never needs a key): `{"status": "ok", "model", "demo",
    "replica"}`."""
    served: ServedModel = request.app.state.served
    replica = request.app.state.settings.replica_name
    return {"status": "ok", "model": served.name, "demo": served.loaded.is_demo, "replica": replica}


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


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text: engine counters (`bitserve_prompt_tokens_total`,
    `bitserve_cached_tokens_total`, `bitserve_tokens_generated_total`, requests started/
    finished/cancelled/failed), `bitserve_cache_hit_rate`, `bitserve_queue_depth`,
    `bitserve_running_sequences`, and from the HTTP edge `bitserve_http_requests_total`
    {route, status} with the `bitserve_time_to_first_token_seconds` and
    `bitserve_inter_token_latency_seconds` histograms (streamed responses)."""
    body = generate_latest(request.app.state.registry)
    return Response(body, media_type=CONTENT_TYPE_PLAIN_0_0_4)  # generate_latest's format
