"""Routes of the conversation API (thin: the logic is in ``serving.py``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from bitserve.api.auth import Principal, require_key
from bitserve.api.chat.protocol import ConversationChatCompletion
from bitserve.api.chat.serving import wire_messages
from bitserve.api.conversations.protocol import (
    ConversationChatRequest,
    ConversationDeleted,
    ConversationList,
    ConversationObject,
    ConversationPrompt,
    ConversationWithMessages,
    CreateConversationRequest,
    UpdateConversationRequest,
)
from bitserve.api.conversations.serving import (
    MAX_LIST_LIMIT,
    ConversationService,
    check_metadata,
    conversation_object,
    message_object,
)
from bitserve.api.edge import GuardedRoute
from bitserve.api.errors import GENERATING_ERRORS, InvalidParameterError, error_responses
from bitserve.api.streaming import RequestGuard

router = APIRouter(
    tags=["conversations"],
    dependencies=[Depends(require_key)],
    route_class=GuardedRoute,
    responses=error_responses(*GENERATING_ERRORS, 409, 507),
)

SSE_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A `chat.completion` object, or with `stream: true` server-sent "
        "`chat.completion.chunk` events ending in `data: [DONE]`.",
        "content": {"text/event-stream": {}},
    }
}


def service(request: Request) -> ConversationService:
    svc: ConversationService = request.app.state.conversations
    return svc


@router.post("/v1/conversations", response_model=ConversationObject)
async def create_conversation(
    request: Request,
    body: CreateConversationRequest | None = Body(None),  # noqa: B008
    who: Principal = Depends(require_key),  # noqa: B008
) -> dict[str, Any]:
    """Create a conversation (optional metadata and initial messages, e.g. a system
    prompt). Its id has the form `conv_<unix-ms>_<n>`."""
    svc = service(request)
    body = body or CreateConversationRequest.model_validate({})
    metadata = check_metadata(body.metadata)
    messages = wire_messages(body.initial_messages())
    conv = await run_in_threadpool(svc.create, who.owner, metadata, messages)
    return conversation_object(conv)


@router.get("/v1/conversations", response_model=ConversationList)
async def list_conversations(
    request: Request,
    limit: int = Query(20, description=f"1-{MAX_LIST_LIMIT}"),
    after: str | None = Query(None, description="The last id of the previous page."),
    who: Principal = Depends(require_key),  # noqa: B008
) -> dict[str, Any]:
    """The caller's conversations, newest first."""
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise InvalidParameterError(f"limit: must be between 1 and {MAX_LIST_LIMIT}", "limit")
    page = await run_in_threadpool(
        service(request).store.list_conversations, who.owner, limit, after
    )
    data = [conversation_object(c) for c in page.conversations]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": page.has_more,
    }


@router.get("/v1/conversations/{conversation_id}", response_model=ConversationWithMessages)
async def get_conversation(
    conversation_id: str,
    request: Request,
    who: Principal = Depends(require_key),  # noqa: B008
) -> Response:
    """The conversation with every stored message, oldest first."""
    store = service(request).store

    def run() -> Response:  # on a worker thread: thousands of messages take a while
        conv, messages = store.read(who.owner, conversation_id)
        body = {**conversation_object(conv), "messages": [message_object(m) for m in messages]}
        return JSONResponse(body)

    return await run_in_threadpool(run)


@router.post("/v1/conversations/{conversation_id}", response_model=ConversationObject)
@router.patch("/v1/conversations/{conversation_id}", response_model=ConversationObject)
async def update_conversation(
    conversation_id: str,
    body: UpdateConversationRequest,
    request: Request,
    who: Principal = Depends(require_key),  # noqa: B008
) -> dict[str, Any]:
    """Replace the conversation's metadata (e.g. set a title)."""
    store = service(request).store
    metadata = check_metadata(body.metadata)
    conv = await run_in_threadpool(store.update_metadata, who.owner, conversation_id, metadata)
    return conversation_object(conv)


@router.delete("/v1/conversations/{conversation_id}", response_model=ConversationDeleted)
async def delete_conversation(
    conversation_id: str,
    request: Request,
    who: Principal = Depends(require_key),  # noqa: B008
) -> dict[str, Any]:
    """Delete the conversation and all its messages."""
    await run_in_threadpool(service(request).store.delete, who.owner, conversation_id)
    return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}


@router.post(
    "/v1/conversations/{conversation_id}/chat",
    response_model=ConversationChatCompletion,
    responses=SSE_DOC,
)
async def conversation_chat(
    conversation_id: str,
    body: ConversationChatRequest,
    request: Request,
    who: Principal = Depends(require_key),  # noqa: B008
) -> Response:
    """Send only the NEW message(s): the stored history is prepended, the reply generated,
    and the new messages plus the reply stored in one transaction. If the history does not
    fit the context (with room for `max_tokens`), the oldest turns are left out (never a
    system message) and `truncated_messages` says how many. Chats to one conversation are
    served one at a time."""
    guard = RequestGuard(request)
    return await service(request).chat(who.owner, conversation_id, body, guard)


@router.get("/v1/conversations/{conversation_id}/prompt", response_model=ConversationPrompt)
async def conversation_prompt(
    conversation_id: str,
    request: Request,
    who: Principal = Depends(require_key),  # noqa: B008
) -> dict[str, Any]:
    """Debugging aid: the chat-formatted history exactly as the next turn's prompt starts
    (before its new message and before any truncation)."""
    svc = service(request)
    prompt, tokens, count = await run_in_threadpool(svc.next_prompt, who.owner, conversation_id)
    return {
        "conversation_id": conversation_id,
        "prompt": prompt,
        "prompt_tokens": len(tokens),
        "num_messages": count,
    }
