"""``/health``, ``/v1/models`` and ``/metrics`` (Prometheus text)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from starlette.responses import JSONResponse, Response

from bitserve.api.auth import require_key
from bitserve.api.edge import GuardedRoute
from bitserve.api.metrics import install_metrics, make_registry
from bitserve.api.served import ServedModel

__all__ = ["health_router", "install_metrics", "make_registry", "router"]

health_router = APIRouter(tags=["system"])
router = APIRouter(tags=["system"], dependencies=[Depends(require_key)], route_class=GuardedRoute)


HEALTH_DOC: dict[int | str, dict[str, Any]] = {
    503: {
        "description": 'The engine cannot run requests: `{"status": "error", "model", '
        '"demo", "error"}` says why (its thread stopped, or its last steps all failed).'
    }
}


@health_router.get("/health", responses=HEALTH_DOC)
async def health(request: Request) -> JSONResponse:
    """Whether the server can generate (never needs a key): `{"status": "ok", "model",
    "demo"}`, or 503 with `"status": "error"` and the reason."""
    served: ServedModel = request.app.state.served
    state = served.engine.health()
    body: dict[str, Any] = {
        "status": "ok" if state.ok else "error",
        "model": served.name,
        "demo": served.loaded.is_demo,
    }
    if not state.ok:
        body["error"] = state.reason
    return JSONResponse(body, status_code=200 if state.ok else 503)


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
