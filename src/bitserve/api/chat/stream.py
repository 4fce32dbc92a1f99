"""A streamed chat answer: the ``chat.completion.chunk`` SSE events of a planned chat,
in OpenAI's order, each reply read (reasoning, content, tool calls) as its tokens come."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from bitserve.api.chat.protocol import Usage
from bitserve.api.chat.reply import ReplyDelta
from bitserve.api.chat.response import (
    ChoiceResult,
    cached_tokens,
    choice_results,
    logprob_entries,
    reasoning_tokens,
    usage,
)
from bitserve.api.served import ServedModel
from bitserve.api.streaming import check_not_cancelled, merged_events, sse, wire_finish_reason
from bitserve.engine.loop import RequestHandle
from bitserve.engine.types import TokenEvent

if TYPE_CHECKING:
    from bitserve.api.chat.serving import ChatPlan


class ChunkWriter:
    """Builds the ``chat.completion.chunk`` events of one plan, in OpenAI's order."""

    def __init__(self, served: ServedModel, plan: ChatPlan) -> None:
        self.served = served
        self.plan = plan
        self.replies = [plan.output.parser() for _ in plan.requests]

    def chunk(self, choices: list[dict[str, Any]], usage_: Usage | None = None) -> str:
        body: dict[str, Any] = {
            "id": self.plan.id,
            "object": "chat.completion.chunk",
            "created": self.plan.created,
            "model": self.plan.model,
            "system_fingerprint": self.served.fingerprint,
            "choices": choices,
            **self.plan.extra,
        }
        if self.plan.include_usage:
            body["usage"] = usage_.model_dump(mode="json") if usage_ else None
        return sse(body)

    def role(self, index: int) -> str:
        delta: dict[str, Any] = {"role": "assistant", "content": ""}
        if self.plan.oracle:
            delta["reasoning_content"] = None
        return self.chunk(
            [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]
        )

    def content(self, index: int, event: TokenEvent) -> str | None:
        """The chunk for one token: its text as content, reasoning or tool-call pieces
        (held back while it may still be a tag), with its logprobs."""
        entries = logprob_entries(self.served, [event]) if self.plan.logprobs else []
        delta = self.replies[index].feed(event.text)
        if not delta and not entries:
            return None
        logprobs = {"content": [e.model_dump(mode="json") for e in entries], "refusal": None}
        return self.chunk(
            [{
                "index": index,
                "delta": self._delta(delta),
                "logprobs": logprobs if self.plan.logprobs else None,
                "finish_reason": None,
            }]
        )  # fmt: skip

    @staticmethod
    def _delta(delta: ReplyDelta) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if delta.reasoning:
            out["reasoning_content"] = delta.reasoning
        if delta.content or not (delta.reasoning or delta.tool_calls):
            out["content"] = delta.content
        if delta.tool_calls:
            out["tool_calls"] = [
                {"index": d.index, "id": d.id, "type": "function",
                 "function": {"name": d.name, "arguments": d.arguments}}
                if d.id is not None
                else {"index": d.index, "function": {"arguments": d.arguments}}
                for d in delta.tool_calls
            ]  # fmt: skip
        return out

    def finish(self, index: int, result: ChoiceResult) -> str:
        """What the reply still held, then the finish chunk."""
        rest = self.replies[index].finish(cut=wire_finish_reason(result.events) == "length")
        result.reply = self.replies[index]
        events = [] if not rest else [
            {"index": index, "delta": self._delta(rest), "logprobs": None, "finish_reason": None}
        ]  # fmt: skip
        done = {"index": index, "delta": {}, "logprobs": None,
                "finish_reason": result.finish_reason}  # fmt: skip
        return "".join(self.chunk([c]) for c in [*events, done])


async def stream_chat(
    served: ServedModel,
    plan: ChatPlan,
    handles: list[RequestHandle],
    on_complete: Callable[[list[ChoiceResult]], Awaitable[None]] | None = None,
) -> AsyncIterator[str]:
    """The SSE events: a role chunk per choice, the choices' content chunks as their tokens
    come (interleaved when ``n > 1``, each with its ``index``), a finish chunk when a choice
    ends; then the usage chunk (``stream_options.include_usage``) and ``[DONE]``.
    ``on_complete`` runs before ``[DONE]`` (conversations store the turn there). The
    ``handles`` were submitted by the route (so a full queue is a 503, not an event)."""
    writer = ChunkWriter(served, plan)
    events: list[list[TokenEvent]] = [[] for _ in handles]
    for index in range(len(handles)):
        yield writer.role(index)
    async for index, event in merged_events(handles):
        if event is not None:
            events[index].append(event)
            chunk = writer.content(index, event)
            if chunk:
                yield chunk
            continue
        check_not_cancelled(events[index])
        yield writer.finish(index, ChoiceResult(index, events[index]))
    results = choice_results(events, handles)
    for r in results:
        r.reply = writer.replies[r.index]
    if on_complete is not None:
        await on_complete(results)
    if plan.include_usage:
        total = sum(len(r.events) for r in results)
        use = usage(plan.prompt_tokens, total, cached_tokens(results), reasoning_tokens(results))
        yield writer.chunk([], use)
    yield sse("[DONE]")
