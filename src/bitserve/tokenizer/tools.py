"""Tool calls in prompts: how each chat format shows tools and writes calls.

Templates that know tools (Qwen3's, Falcon3's: they render a ``tools`` variable and
``<tool_call>`` blocks) get the tools and the messages' ``tool_calls`` as they are, and the
model answers in the template's own syntax (:func:`tool_call_syntax`). For every other
format (LLaMA-3's template, BitNet-2B-4T's) :func:`generic_tool_messages` rewrites the
conversation into plain system/user/assistant messages using the Hermes convention that
Qwen and many fine-tunes were trained on, documented in docs/api.md:

- a system message lists the tools, one JSON object per line inside ``<tools></tools>``,
  and asks for each call as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``;
- an assistant message's calls are written after its text in that syntax;
- a ``role="tool"`` result becomes a user message ``<tool_response>\\n…\\n</tool_response>``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bitserve.tokenizer.messages import ChatMessage


@dataclass(frozen=True, slots=True)
class MessageToolCall:
    """One call of an assistant message: ``arguments`` is JSON text (OpenAI's shape)."""

    id: str
    name: str
    arguments: str

    def arguments_value(self) -> Any:
        """The arguments parsed (templates render them with ``tojson``); text that is not
        JSON stays text."""
        try:
            return json.loads(self.arguments)
        except ValueError:
            return self.arguments

    def template_value(self) -> dict[str, Any]:
        """The call as Hugging Face templates read it (OpenAI's shape, arguments parsed)."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments_value()},
        }


@dataclass(frozen=True, slots=True)
class ToolCallSyntax:
    """How a model writes its calls: each call's JSON ``{"name", "arguments"}`` between
    ``open`` and ``close``, blocks joined by ``separator``; with ``array`` all calls are one
    JSON array in a single block (Falcon3)."""

    open: str = "<tool_call>\n"
    close: str = "\n</tool_call>"
    separator: str = "\n"
    array: bool = False

    def write(self, calls: Sequence[MessageToolCall]) -> str:
        """The text a model following this syntax writes for ``calls``."""
        objects = [{"name": c.name, "arguments": c.arguments_value()} for c in calls]
        if self.array:
            return self.open + json.dumps(objects, ensure_ascii=False) + self.close
        return self.separator.join(
            self.open + json.dumps(o, ensure_ascii=False) + self.close for o in objects
        )


HERMES = ToolCallSyntax()
FALCON3 = ToolCallSyntax(array=True)


def template_knows_tools(template: str | None) -> bool:
    """True if the template renders ``tools`` and ``<tool_call>`` blocks itself."""
    return template is not None and "tools" in template and "<tool_call>" in template


def tool_call_syntax(template: str | None) -> ToolCallSyntax:
    """The call syntax the model of ``template`` was trained on (Hermes by default)."""
    if template is not None and template_knows_tools(template) and "<tool_call>\\n[" in template:
        return FALCON3
    return HERMES


def generic_tool_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        f"You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{lines}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def generic_tool_messages(
    messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, Any]] | None
) -> list[ChatMessage]:
    """``messages`` with tools, calls and results written as plain text (module doc).
    Messages that carry ``token_ids`` keep them only if nothing was added to them."""
    out: list[ChatMessage] = []
    for m in messages:
        if m.role == "tool":
            content = f"<tool_response>\n{m.content}\n</tool_response>"
            out.append(replace(m, role="user", content=content, tool_call_id=None))
        elif m.tool_calls:
            calls = HERMES.write(m.tool_calls)
            content = f"{m.content}\n{calls}" if m.content else calls
            out.append(replace(m, content=content, tool_calls=(), token_ids=None))
        else:
            out.append(m)
    if tools:
        prompt = generic_tool_prompt(tools)
        if out and out[0].role == "system":
            out[0] = replace(out[0], content=f"{out[0].content}\n\n{prompt}", token_ids=None)
        else:
            out.insert(0, type(out[0])(role="system", content=prompt))
    return out
