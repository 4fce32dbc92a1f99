"""``/health``, ``/v1/models`` and ``/metrics`` (Prometheus text)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from starlette.responses import Response

from bitserve.api.auth import require_key
from bitserve.api.metrics import install_metrics, make_registry
from bitserve.api.served import ServedModel

__all__ = ["health_router", "install_metrics", "make_registry", "router"]

health_router = APIRouter(tags=["system"])
router = APIRouter(tags=["system"], dependencies=[Depends(require_key)])


@health_router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    """Liveness (never needs a key): `{"status": "ok", "model", "arch", "demo"}`; `model`
    is the served model's name (its file's `general.name`)."""
    served: ServedModel = request.app.state.served
    arch = served.loaded.model.config.arch
    return {"status": "ok", "model": served.name, "arch": arch, "demo": served.loaded.is_demo}


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
