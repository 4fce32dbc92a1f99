"""Wire types of the conversation routes (OpenAI Conversations names where they exist)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from bitserve.api.chat.protocol import ChatCompletionRequest, ChatMessage, ToolCall
from bitserve.api.errors import InvalidParameterError
from bitserve.api.wire import RequestModel

METADATA_DOC = "Up to 16 string pairs (keys <= 64 chars, values <= 512), e.g. a title."


class ConversationItem(ChatMessage):
    """An OpenAI Conversations API input item; only ``message`` items are stored."""

    type: Literal["message"] = "message"


class CreateConversationRequest(RequestModel):
    """Body of ``POST /v1/conversations``; every field optional (an empty body works)."""

    metadata: dict[str, str] | None = Field(None, description=METADATA_DOC)
    messages: list[ChatMessage] | None = Field(
        None, description="Initial messages, e.g. a system prompt, stored before any turn."
    )
    items: list[ConversationItem] | None = Field(
        None,
        description="The same as OpenAI Conversations API items (what `client.conversations."
        "create(items=...)` sends): message items only; not together with `messages`.",
    )

    def initial_messages(self) -> list[ChatMessage]:
        """``messages`` or ``items`` (a 400 naming ``items`` if both are given)."""
        if self.messages is not None and self.items is not None:
            raise InvalidParameterError("items: give initial messages or items, not both", "items")
        return list(self.messages or self.items or [])


class UpdateConversationRequest(RequestModel):
    metadata: dict[str, str] = Field(description="Replaces the metadata. " + METADATA_DOC)


class ConversationChatRequest(ChatCompletionRequest):
    """Body of ``POST /v1/conversations/{id}/chat``: a chat completion request whose
    ``messages`` are only the NEW message(s); the stored history is prepended."""

    model: str = Field("bitnet", description="Optional here; a served name or alias.")


class ConversationObject(BaseModel):
    id: str
    conversation_id: str = Field(description="Same as id (the BitNet API guide's name).")
    object: Literal["conversation"] = "conversation"
    created_at: int = Field(description="Unix seconds.")
    metadata: dict[str, str]


class ConversationMessage(BaseModel):
    role: str
    content: str
    created_at: int
    tokens: int = Field(description="Tokens in this message's content.")
    prompt_tokens: int | None = Field(None, description="Assistant replies: prompt size.")
    completion_tokens: int | None = Field(None, description="Assistant replies: reply size.")
    finish_reason: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant's calls.")
    tool_call_id: str | None = Field(None, description="The call a tool message answers.")
    reasoning_content: str | None = Field(None, description="An assistant's <think> text.")


class ConversationWithMessages(ConversationObject):
    messages: list[ConversationMessage]


class ConversationList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ConversationObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ConversationDeleted(BaseModel):
    id: str
    object: Literal["conversation.deleted"] = "conversation.deleted"
    deleted: bool = True


class ConversationPrompt(BaseModel):
    """What the model would see for the next turn (debugging aid)."""

    conversation_id: str
    prompt: str = Field(description="The chat-formatted history, ending in the reply prompt.")
    prompt_tokens: int
    num_messages: int
