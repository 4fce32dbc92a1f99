"""``POST /v1/chat/completions`` (thin: the logic is in ``serving.py``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from bitserve.api.auth import require_key
from bitserve.api.chat.protocol import ChatCompletion, ChatCompletionRequest
from bitserve.api.chat.serving import answer_chat
from bitserve.api.conversations.routes import SSE_DOC
from bitserve.api.edge import GuardedRoute
from bitserve.api.errors import GENERATING_ERRORS, error_responses
from bitserve.api.served import ServedModel

router = APIRouter(
    tags=["openai"],
    dependencies=[Depends(require_key)],
    route_class=GuardedRoute,
    responses=error_responses(*GENERATING_ERRORS),
)


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=SSE_DOC)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    """OpenAI chat completions, stateless: send the whole conversation in `messages`.
    `stream: true` answers with `chat.completion.chunk` events (role chunk, content
    chunks, finish chunk, a usage chunk with `stream_options.include_usage`, `[DONE]`).
    `response_format` constrains the reply to JSON; `tools` let the model call functions
    (`message.tool_calls`, `finish_reason: "tool_calls"`)."""
    served: ServedModel = request.app.state.served
    return await answer_chat(served, body, served.resolve(body.model), request)
