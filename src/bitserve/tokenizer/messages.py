"""Chat messages as the formatter takes them: ``{"role", "content", ...}`` mappings
checked once into :class:`ChatMessage` (roles, contents, OpenAI-shaped tool calls, the
server's own ``token_ids``), every problem a ValueError naming the message."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bitserve.tokenizer.tools import MessageToolCall

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """A validated message: ``role`` is one of :data:`ROLES`; ``token_ids`` (optional)
    are used verbatim for the content when encoding; ``tool_calls`` and
    ``reasoning_content`` (assistant) and ``tool_call_id`` (tool) as OpenAI names them."""

    role: str
    content: str
    token_ids: tuple[int, ...] | None = None
    tool_calls: tuple[MessageToolCall, ...] = ()
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def template_value(self, content: str) -> dict[str, Any]:
        """The message as the template sees it, with ``content`` standing for its text."""
        value: dict[str, Any] = {"role": self.role, "content": content}
        if self.tool_calls:
            value["tool_calls"] = [c.template_value() for c in self.tool_calls]
        if self.tool_call_id is not None:
            value["tool_call_id"] = self.tool_call_id
        if self.reasoning_content is not None:
            value["reasoning_content"] = self.reasoning_content
        return value


def _token_ids(i: int, message: Mapping[str, Any]) -> tuple[int, ...] | None:
    ids = message.get("token_ids")
    if ids is None:
        return None
    if isinstance(ids, str | bytes) or not isinstance(ids, Sequence):
        raise ValueError(f"message {i}: token_ids must be a list of token ids")
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise ValueError(f"message {i}: token_ids must be non-negative integers")
    return tuple(ids)


def _optional_str(i: int, message: Mapping[str, Any], key: str) -> str | None:
    value = message.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"message {i}: {key} must be a string")
    return value


def _tool_calls(i: int, message: Mapping[str, Any]) -> tuple[MessageToolCall, ...]:
    """``tool_calls`` in OpenAI's shape: ``[{"id", "type", "function": {"name",
    "arguments"}}]`` (arguments a JSON string)."""
    calls = message.get("tool_calls") or ()
    if isinstance(calls, str | bytes | Mapping) or not isinstance(calls, Sequence):
        raise ValueError(f"message {i}: tool_calls must be a list")
    if calls and message.get("role") != "assistant":
        raise ValueError(f"message {i}: only assistant messages have tool_calls")
    out = []
    for k, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping):
            raise ValueError(f"message {i}: tool_calls[{k}] needs a function")
        name, arguments = function.get("name"), function.get("arguments", "{}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"message {i}: tool_calls[{k}].function.name must be a string")
        if not isinstance(arguments, str):
            raise ValueError(f"message {i}: tool_calls[{k}].function.arguments must be a string")
        out.append(MessageToolCall(str(call.get("id") or f"call_{i}_{k}"), name, arguments))
    return tuple(out)


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[ChatMessage]:
    """Check roles and contents; raise ValueError naming the first bad message."""
    if not messages:
        raise ValueError("a conversation needs at least one message")
    out = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(
                f"message {i}: unsupported role {role!r}; expected one of {', '.join(ROLES)}"
            )
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string")
        out.append(
            ChatMessage(
                role,
                content,
                _token_ids(i, message),
                _tool_calls(i, message),
                _optional_str(i, message, "tool_call_id"),
                _optional_str(i, message, "reasoning_content"),
            )
        )
    return out
