"""BitMind-compatible oracle routes: ``POST /oracle/v1/{route}/chat`` and
``/oracle/v1/{route}/chat/completions``. A bearer key is always required: a server started
without keys answers these routes with 401. Each route's config defaults fill the fields the
client left out, ``model`` may be any alias from the config, and replies carry
``reasoning_content`` and ``tool_calls`` keys."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.responses import Response

from bitserve.api.auth import require_configured_key
from bitserve.api.chat.protocol import ChatCompletion, ChatCompletionRequest
from bitserve.api.chat.serving import answer_chat
from bitserve.api.conversations.routes import SSE_DOC
from bitserve.api.edge import GuardedRoute
from bitserve.api.errors import GENERATING_ERRORS, RouteNotFoundError, error_responses
from bitserve.api.oracle.config import OracleConfig
from bitserve.api.served import ServedModel

router = APIRouter(
    tags=["oracle"],
    dependencies=[Depends(require_configured_key)],
    route_class=GuardedRoute,
    responses=error_responses(*GENERATING_ERRORS),
)


@router.post("/oracle/v1/{route}/chat", response_model=ChatCompletion, responses=SSE_DOC)
@router.post(
    "/oracle/v1/{route}/chat/completions", response_model=ChatCompletion, responses=SSE_DOC
)
async def oracle_chat(
    route: str,
    request: Request,
    raw: dict[str, Any] = Body(  # noqa: B008
        description="A chat completion request; the route's defaults fill missing fields."
    ),
) -> Response:
    """Oracle chat (BitMind API), at both paths. Route defaults: see the oracle config."""
    config: OracleConfig = request.app.state.settings.oracle
    spec = config.routes.get(route)
    if spec is None:
        known = ", ".join(sorted(config.routes)) or "none"
        raise RouteNotFoundError(f"oracle route {route!r} is not configured (known: {known})")
    try:
        # null means absent (RequestModel): the route's default, not the model's
        given = {key: value for key, value in raw.items() if value is not None}
        body = ChatCompletionRequest.model_validate({**spec.defaults, **given})
    except ValidationError as exc:  # the same 422 as a typed route's
        raise RequestValidationError(exc.errors()) from exc
    served: ServedModel = request.app.state.served
    served.resolve(body.model, (*config.aliases, *spec.aliases))
    return await answer_chat(served, body, body.model, request, oracle=True)
