"""A chat's answer: finished choices, their ``message`` (content, reasoning, tool calls),
logprobs and usage, and the ``chat.completion`` object they make."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bitserve.api.chat.protocol import (
    ChoiceLogprobs,
    CompletionTokensDetails,
    LogprobEntry,
    PromptTokensDetails,
    TopLogprobEntry,
    Usage,
)
from bitserve.api.chat.reply import ReplyParser
from bitserve.api.chat.tools import ParsedCall, wire_tool_calls
from bitserve.api.served import ServedModel
from bitserve.api.streaming import wire_finish_reason
from bitserve.engine.loop import RequestHandle
from bitserve.engine.types import TokenEvent, TopLogprob

if TYPE_CHECKING:
    from bitserve.api.chat.serving import ChatPlan


@dataclass(slots=True)
class ChoiceResult:
    """One finished choice: its events (the stop token's included) and text;
    ``cached_tokens``: prompt tokens the engine reused from its prefix cache; ``reply``:
    the text read as reasoning, content and tool calls (set by :func:`read_replies`)."""

    index: int
    events: list[TokenEvent]
    cached_tokens: int = 0
    reply: ReplyParser | None = None

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def content(self) -> str:
        return self.text if self.reply is None else self.reply.content

    @property
    def reasoning(self) -> str | None:
        return self.reply.reasoning if self.reply is not None and self.reply.has_reasoning else None

    @property
    def tool_calls(self) -> list[ParsedCall]:
        return [] if self.reply is None else self.reply.tool_calls

    @property
    def finish_reason(self) -> str:
        reason = wire_finish_reason(self.events)
        return "tool_calls" if reason == "stop" and self.tool_calls else reason


def _shown(served: ServedModel, event: TokenEvent) -> bool:
    """A stop token ends the reply but is not part of it (no text, no logprob entry)."""
    return not (event.finish_reason == "stop" and event.token_id in served.stop_token_ids)


def _top_entry(served: ServedModel, top: TopLogprob) -> TopLogprobEntry:
    token, raw = served.token_piece(top.token_id)
    return TopLogprobEntry(token=token, logprob=top.logprob, bytes=raw)


def logprob_entries(served: ServedModel, events: list[TokenEvent]) -> list[LogprobEntry]:
    entries = []
    for e in events:
        if e.logprob is None or not _shown(served, e):
            continue
        token, raw = served.token_piece(e.token_id)
        tops = [_top_entry(served, t) for t in e.top_logprobs]
        entries.append(LogprobEntry(token=token, logprob=e.logprob, bytes=raw, top_logprobs=tops))
    return entries


def usage(
    prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, reasoning_tokens: int = 0
) -> Usage:
    """OpenAI's usage object; ``cached_tokens`` goes to ``prompt_tokens_details``,
    ``reasoning_tokens`` (those up to ``</think>``) to ``completion_tokens_details``."""
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reasoning_tokens),
    )


def reasoning_tokens(results: list[ChoiceResult]) -> int:
    return sum(r.reply.reasoning_tokens for r in results if r.reply is not None)


def cached_tokens(results: list[ChoiceResult]) -> int:
    """Prompt tokens served from the prefix cache (the prompt is counted once: the most
    any choice reused)."""
    return max((r.cached_tokens for r in results), default=0)


def _message(plan: ChatPlan, result: ChoiceResult) -> dict[str, Any]:
    """The ``message`` object; the oracle routes always carry ``reasoning_content`` and
    ``tool_calls`` (``[]`` without calls), the others only when there are some."""
    calls = wire_tool_calls(result.tool_calls)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": result.content if result.content or not calls else None,
        "refusal": None,
    }
    if calls or plan.oracle:
        message["tool_calls"] = calls
    if result.reasoning is not None or plan.oracle:
        message["reasoning_content"] = result.reasoning
    return message


def read_replies(plan: ChatPlan, results: list[ChoiceResult]) -> list[ChoiceResult]:
    """Read each finished choice's text as reasoning, content and tool calls (token by
    token, as a stream is, so that reasoning tokens are counted the same way)."""
    for r in results:
        r.reply = plan.output.parser()
        for event in r.events:
            r.reply.feed(event.text)
        r.reply.finish(cut=wire_finish_reason(r.events) == "length")
    return results


def completion_body(
    served: ServedModel, plan: ChatPlan, results: list[ChoiceResult]
) -> dict[str, Any]:
    """The ``chat.completion`` object for finished ``results``."""
    choices = []
    for r in results:
        logprobs = (
            ChoiceLogprobs(content=logprob_entries(served, r.events)) if plan.logprobs else None
        )
        choices.append(
            {
                "index": r.index,
                "message": _message(plan, r),
                "logprobs": logprobs.model_dump(mode="json") if logprobs else None,
                "finish_reason": r.finish_reason,
            }
        )
    completion_tokens = sum(len(r.events) for r in results)
    return {
        "id": plan.id,
        "object": "chat.completion",
        "created": plan.created,
        "model": plan.model,
        "choices": choices,
        "usage": usage(
            plan.prompt_tokens, completion_tokens, cached_tokens(results), reasoning_tokens(results)
        ).model_dump(mode="json"),
        "system_fingerprint": served.fingerprint,
        "service_tier": None,
        **plan.extra,
    }


def choice_results(
    events: Sequence[list[TokenEvent]], handles: list[RequestHandle]
) -> list[ChoiceResult]:
    """The choices' results in index order, from each one's events and handle."""
    return [
        ChoiceResult(index, choice_events, handle.cached_tokens)
        for index, (choice_events, handle) in enumerate(zip(events, handles, strict=True))
    ]
