"""``/health``, ``/v1/models``, ``/metrics`` (Prometheus text), and the header that names
the replica behind every response."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bitserve.api.auth import require_key
from bitserve.api.edge import GuardedRoute
from bitserve.api.errors import KEYED_ERRORS, ModelNotFoundError, error_responses
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


health_router = APIRouter(tags=["system"], responses=error_responses(400))  # a bad Host
router = APIRouter(
    tags=["system"],
    dependencies=[Depends(require_key)],
    route_class=GuardedRoute,
    responses=error_responses(*KEYED_ERRORS),
)


NOT_FOUND_DOC = error_responses(404)
HEALTH_DOC: dict[int | str, dict[str, Any]] = {
    503: {
        "description": 'The engine cannot run requests: `{"status": "error", "model", '
        '"demo", "error"}` says why (its thread stopped, or its last steps all failed).'
    }
}


@health_router.get("/health", responses=HEALTH_DOC)
async def health(request: Request) -> JSONResponse:
    """Whether the server can generate (never needs a key; load balancers' and Kubernetes'
    readiness): `{"status": "ok", "model", "arch", "demo", "replica"}` (`model`: the model
    id, its file's `general.name`; `arch`: its `general.architecture`; `replica`: this
    replica's name), or 503 with `"status": "error"` and the reason."""
    served: ServedModel = request.app.state.served
    state = served.engine.health()
    body: dict[str, Any] = {
        "status": "ok" if state.ok else "error",
        "model": served.name,
        "arch": served.loaded.model.config.arch,
        "demo": served.loaded.is_demo,
        "replica": request.app.state.settings.replica_name,
    }
    if not state.ok:
        body["error"] = state.reason
    return JSONResponse(body, status_code=200 if state.ok else 503)


def model_object(served: ServedModel, name: str) -> dict[str, Any]:
    """OpenAI's model object; the model id's carries ``meta`` (context, vocabulary)."""
    model: dict[str, Any] = {
        "id": name,
        "object": "model",
        "created": served.created,
        "owned_by": "bitserve",
    }
    if name == served.name:
        model["meta"] = served.describe()
    return model


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    """The served model and every alias it answers to on every route (OpenAI's model
    list). Oracle aliases, which only the oracle routes accept, are not listed."""
    served: ServedModel = request.app.state.served
    return {"object": "list", "data": [model_object(served, n) for n in served.names]}


@router.get("/v1/models/{model:path}", responses=NOT_FOUND_DOC)
async def retrieve_model(model: str, request: Request) -> dict[str, Any]:
    """One model of the list (OpenAI's retrieve); 404 `model_not_found` for another name.
    A name may hold slashes (a converted file is named by its repository,
    ``microsoft/bitnet-b1.58-2B-4T``), as vLLM's and llama-server's do."""
    served: ServedModel = request.app.state.served
    if model not in served.names:
        raise ModelNotFoundError(model)
    return model_object(served, model)


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
