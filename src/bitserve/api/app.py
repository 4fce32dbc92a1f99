"""``create_app(settings, served, store)``: the FastAPI application.

All state lives on ``app.state``, built here and in the lifespan (which starts the engine
loop and, on shutdown, stops it and closes the store); there are no module globals, so
tests build as many apps as they like.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from bitserve import __version__
from bitserve.api import system
from bitserve.api.auth import KeyChecker
from bitserve.api.chat import routes as chat_routes
from bitserve.api.completions import routes as completion_routes
from bitserve.api.conversations import routes as conversation_routes
from bitserve.api.conversations.serving import ConversationService
from bitserve.api.edge import EdgeGuard
from bitserve.api.errors import InvalidParameterError, error_response, install_error_handlers
from bitserve.api.oracle import routes as oracle_routes
from bitserve.api.sampling import THREADS_DOC
from bitserve.api.served import ServedModel
from bitserve.api.settings import ServerSettings
from bitserve.store import ConversationStore
from bitserve.webui import install_webui

DESCRIPTION = f"""
A CPU-first server for BitNet b1.58 models: OpenAI chat and legacy completions,
llama.cpp's `/completion`, durable conversations (`/v1/conversations`) and
BitMind-compatible oracle routes. Errors are always
`{{"error": {{"message", "type", "param", "code"}}}}`.

**Auth**: when the server has API keys, every route but `/health` needs
`Authorization: Bearer <key>`.

**threads**: {THREADS_DOC}
"""


class _CORS(CORSMiddleware):
    """Starlette's CORS, whose refused preflight answers in the API's error shape (it was
    plain text "Disallowed CORS origin")."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        reason = bytes(response.body).decode()
        error = error_response(InvalidParameterError(f"CORS preflight refused: {reason}"))
        kept = {
            k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")
        }
        error.headers.update(kept)  # Vary and the CORS headers
        return error


def create_app(settings: ServerSettings, served: ServedModel, store: ConversationStore) -> FastAPI:
    """The app serving ``served`` with conversations in ``store``. The lifespan owns both:
    it starts ``served.engine`` and, at shutdown, stops it, writes the prefix cache to disk
    (``--cache-disk``) and closes ``store``. This must happen here: once uvicorn has shut
    down after a SIGTERM it raises the signal again, which ends the process at once."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        served.engine.start()
        try:
            yield
        finally:
            served.engine.stop()
            served.close()
            store.close()

    app = FastAPI(
        title="bitserve",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.served = served
    app.state.store = store
    app.state.keys = KeyChecker(settings.api_keys)
    app.state.conversations = ConversationService(store, served)
    if settings.cors_origins:
        app.add_middleware(
            _CORS,
            allow_origins=list(settings.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
        )
    app.add_middleware(
        EdgeGuard, allowed_hosts=settings.allowed_hosts, max_body_bytes=settings.max_body_bytes
    )
    system.install_metrics(app, served)  # app.state.registry + the HTTP-edge middleware
    app.add_middleware(system.ReplicaHeader, name=settings.replica_name)
    install_error_handlers(app)
    for router in (
        system.health_router,
        system.router,
        chat_routes.router,
        conversation_routes.router,
        completion_routes.router,
        oracle_routes.router,
    ):
        app.include_router(router)
    if settings.webui:
        install_webui(app)
    return app
