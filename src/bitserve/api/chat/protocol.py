"""Wire types of ``POST /v1/chat/completions`` (OpenAI's schema names), shared by the
conversation and oracle routes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bitserve.api.sampling import SamplingFields
from bitserve.api.wire import ForeignConstraintFields, RequestModel

DEFAULT_MAX_TOKENS = 100

Role = Literal["system", "developer", "user", "assistant", "tool"]


class TextPart(BaseModel):
    """A text part; ``input_text``/``output_text`` are the Responses/Conversations API's
    names for the same thing."""

    type: Literal["text", "input_text", "output_text"] = "text"
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="The arguments as JSON text.")


class ToolCall(BaseModel):
    """An assistant message's call (OpenAI's ``tool_calls[i]``)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """One message. ``content`` may be a string or a list of text parts (joined).
    Assistant messages may carry ``tool_calls`` (and ``reasoning_content``); a ``tool``
    message answers the call ``tool_call_id``."""

    model_config = ConfigDict(extra="ignore")

    role: Role
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(RequestModel):
    include_usage: bool = Field(False, description="Send a last chunk with `usage`.")


class ChatCompletionRequest(SamplingFields, ForeignConstraintFields):
    """Body of ``POST /v1/chat/completions``. Defaults follow the BitNet API guide."""

    model: str = Field(description="A name from GET /v1/models (or a configured alias).")
    messages: list[ChatMessage] = Field(description="The conversation so far, oldest first.")
    max_tokens: int | None = Field(
        None, description=f"Tokens to generate at most (default {DEFAULT_MAX_TOKENS})."
    )
    max_completion_tokens: int | None = Field(None, description="Same as max_tokens (wins).")
    n: int = Field(1, description="Choices to generate (1-8), together in the batch.")
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings.")
    stream: bool = Field(False, description="Answer with server-sent events.")
    stream_options: StreamOptions | None = None
    logprobs: bool = Field(False, description="Return each generated token's logprob.")
    top_logprobs: int | None = Field(
        None, description="0-20 alternatives per token (needs logprobs: true)."
    )
    user: str | None = None
    # checked by the serving code (400s naming the field), not by pydantic (422s)
    response_format: dict[str, Any] | None = Field(
        None,
        description='`{"type": "text"}` (default), `{"type": "json_object"}` or '
        '`{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`: the reply '
        "is constrained to valid JSON (against the schema).",
    )
    tools: list[dict[str, Any]] | None = Field(
        None, description='Functions the model may call: `[{"type": "function", "function": '
        '{"name", "description", "parameters"}}]`.',
    )  # fmt: skip
    tool_choice: str | dict[str, Any] | None = Field(
        None,
        description='"none", "auto" (default with tools), "required" or '
        '`{"type": "function", "function": {"name": ...}}`.',
    )
    parallel_tool_calls: bool | None = Field(
        None, description="Allow several calls in one reply (default true)."
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description='Extra chat template variables, e.g. `{"enable_thinking": false}`.'
    )
    # the deprecated form of tools is refused (check_supported) rather than ignored
    functions: list[dict[str, Any]] | None = Field(
        None, description="Deprecated form of tools; not supported (use tools)."
    )
    function_call: str | dict[str, Any] | None = Field(
        None, description='Only "none" or "auto" (use tool_choice).'
    )
    # OpenAI's asks for what a text model cannot give: refused (check_supported), since
    # a plain-text reply would look like an answer to them
    modalities: list[str] | None = Field(None, description='Only `["text"]`.')
    audio: dict[str, Any] | None = Field(None, description="Audio output: not supported.")
    web_search_options: dict[str, Any] | None = Field(
        None, description="Web search: not supported."
    )

    def max_new_tokens(self) -> int:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens


# ---- responses -----------------------------------------------------------------------------


class TopLogprobEntry(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class LogprobEntry(TopLogprobEntry):
    top_logprobs: list[TopLogprobEntry] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[LogprobEntry] | None
    refusal: None = None


class AssistantMessage(BaseModel):
    """``tool_calls`` only when the model called tools; ``reasoning_content`` only when
    it reasoned (``<think>``)."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = None


class OracleAssistantMessage(AssistantMessage):
    """The oracle routes' message: BitMind clients read these keys, always present
    (``tool_calls`` is ``[]`` without calls)."""


FinishReason = Literal["stop", "length", "tool_calls"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage | OracleAssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    completion_tokens_details: CompletionTokensDetails = Field(
        default_factory=CompletionTokensDetails
    )


class ChatCompletion(BaseModel):
    """The ``chat.completion`` object. Conversation chats add ``conversation_id`` and
    ``truncated_messages`` (history messages left out to fit the context)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str
    service_tier: str | None = None


class ConversationChatCompletion(ChatCompletion):
    conversation_id: str
    truncated_messages: int = 0


class ToolCallChunk(BaseModel):
    """A streamed piece of call ``index``: first its ``id``, ``type`` and name (with
    ``arguments: ""``), then pieces of ``function.arguments`` to append."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: dict[str, str]


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallChunk] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One ``chat.completion.chunk`` SSE event (for the OpenAPI description)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
