"""Chat completions: request → engine requests → ``chat.completion`` (or its SSE chunks).

Shared by ``/v1/chat/completions``, ``/v1/conversations/{id}/chat`` and the oracle routes;
they differ only in where the messages come from and a few extra response fields.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import JSONResponse, Response

from bitserve.api.chat.output import OutputPlan, plan_output, response_schema
from bitserve.api.chat.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    ChoiceLogprobs,
    CompletionTokensDetails,
    LogprobEntry,
    PromptTokensDetails,
    TopLogprobEntry,
    Usage,
)
from bitserve.api.chat.reply import ReplyDelta, ReplyParser
from bitserve.api.chat.tools import ParsedCall, ToolPlan, tool_plan
from bitserve.api.errors import GenerationCancelledError, InvalidParameterError
from bitserve.api.sampling import check_n, normalize_stop, to_sampling_params, wire_names
from bitserve.api.served import ServedModel
from bitserve.api.streaming import (
    RequestGuard,
    collect,
    merged_events,
    sse,
    sse_response,
    wire_finish_reason,
)
from bitserve.engine.loop import RequestHandle
from bitserve.engine.sampling import validate_top_logprobs
from bitserve.engine.types import GenerationRequest, TokenEvent, TopLogprob


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


@dataclass(slots=True)
class ChatPlan:
    """Everything needed to answer: one engine request per choice, plus response fields.
    ``extra`` is merged into every response object (conversation id, truncation)."""

    requests: list[GenerationRequest]
    model: str
    logprobs: bool
    output: OutputPlan = field(default_factory=OutputPlan)
    oracle: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        return len(self.requests[0].prompt_tokens)


def _max_tokens(body: ChatCompletionRequest) -> int:
    value = body.max_new_tokens()
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    if value < 1:
        raise InvalidParameterError(f"{param}: must be at least 1, got {value}", param)
    return value


def _top_logprobs(body: ChatCompletionRequest) -> int:
    if body.top_logprobs is None:
        return 0
    with wire_names():
        validate_top_logprobs(body.top_logprobs)
    if body.top_logprobs and not body.logprobs:
        raise InvalidParameterError(
            "top_logprobs: requires logprobs to be true", param="top_logprobs"
        )
    return body.top_logprobs


@dataclass(frozen=True, slots=True)
class PromptOptions:
    """What besides the messages shapes a chat prompt: the tools shown to the template
    (none with ``tool_choice: "none"``) and ``chat_template_kwargs``."""

    tools: ToolPlan | None = None
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def shown_tools(self) -> list[dict[str, Any]] | None:
        return self.tools.tools if self.tools is not None and self.tools.active else None


def prompt_options(served: ServedModel, body: ChatCompletionRequest) -> PromptOptions:
    """Validate the request's tool fields and template kwargs (400s name the field)."""
    syntax = served.loaded.chat.tool_syntax
    tools = tool_plan(body.tools, body.tool_choice, body.parallel_tool_calls, syntax)
    return PromptOptions(tools, body.chat_template_kwargs or {})


def encode_chat(
    served: ServedModel,
    messages: Sequence[Mapping[str, Any]],
    param: str,
    options: PromptOptions | None = None,
) -> list[int]:
    """The chat-formatted prompt's token ids (a message the format rejects is a 400)."""
    options = options or PromptOptions()
    try:
        return served.loaded.chat.encode(
            messages, tools=options.shown_tools, template_kwargs=options.template_kwargs
        )
    except ValueError as exc:
        raise InvalidParameterError(f"{param}: {exc}", param) from exc


def check_supported(body: ChatCompletionRequest) -> None:
    """400 for the deprecated ``functions``/``function_call`` (use ``tools``): answering
    with plain text would look like the model's choice."""
    if body.functions:
        raise InvalidParameterError(
            "functions: deprecated and not supported; use tools", "functions"
        )
    if body.function_call not in (None, "none", "auto"):
        raise InvalidParameterError(
            "function_call: deprecated and not supported; use tool_choice", "function_call"
        )


def plan_reply(
    served: ServedModel, body: ChatCompletionRequest, options: PromptOptions, prompt: list[int]
) -> OutputPlan:
    """How the reply is constrained and read: response_format, tools, reasoning."""
    chat = served.loaded.chat
    reasoning = chat.reasons and options.template_kwargs.get("enable_thinking") is not False
    tail = served.loaded.tokenizer.decode(prompt[-4:], skip_special=False) if reasoning else ""
    in_think = tail.rstrip().endswith("<think>")
    schema = response_schema(body.response_format)
    return plan_output(served.constraints, schema, options.tools, reasoning, in_think)


def plan_chat(
    served: ServedModel,
    body: ChatCompletionRequest,
    messages: Sequence[Mapping[str, Any]],
    model: str,
    param: str = "messages",
    prompt: list[int] | None = None,
    options: PromptOptions | None = None,
) -> ChatPlan:
    """Validate ``body`` and tokenize ``messages`` (the full history) into engine requests
    (``prompt``: their token ids, when the caller has them already, encoded with
    ``options``). Raises 400s naming the field; the prompt must leave room for one token."""
    check_supported(body)
    check_n(body.n)
    if not messages:
        raise InvalidParameterError(f"{param}: must contain at least one message", param)
    stop = normalize_stop(body.stop)
    max_tokens, top_n = _max_tokens(body), _top_logprobs(body)
    options = options or prompt_options(served, body)
    if prompt is None:
        prompt = encode_chat(served, messages, param, options)
    max_tokens = min(max_tokens, served.check_fits(len(prompt), param))
    output = plan_reply(served, body, options, prompt)
    vocab = served.loaded.tokenizer.vocab_size
    requests = []
    for i in range(body.n):
        seed = None if body.seed is None else body.seed + i
        sampling = to_sampling_params(body, vocab, seed)
        sampling.constraint = output.constraint
        req = GenerationRequest(
            prompt_tokens=prompt,
            sampling=sampling,
            max_tokens=max_tokens,
            stop=stop,
            stop_token_ids=served.stop_token_ids,
            logprobs=body.logprobs,
            top_logprobs=top_n,
        )
        with wire_names():
            served.generator.check_request(req)
        requests.append(req)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return ChatPlan(requests, model, body.logprobs, output, include_usage=include_usage)


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


def wire_tool_calls(calls: list[ParsedCall]) -> list[dict[str, Any]]:
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls
    ]


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
        r.reply.finish()
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


def submit_all(served: ServedModel, plan: ChatPlan, guard: RequestGuard) -> list[RequestHandle]:
    """Every choice's request, submitted at once: they join the running batch together.
    A full queue raises (a 503) before anything is sent."""
    return [guard.track(served.engine.submit(req)) for req in plan.requests]


def choice_results(
    events: Sequence[list[TokenEvent]], handles: list[RequestHandle]
) -> list[ChoiceResult]:
    """The choices' results in index order, from each one's events and handle."""
    return [
        ChoiceResult(index, choice_events, handle.cached_tokens)
        for index, (choice_events, handle) in enumerate(zip(events, handles, strict=True))
    ]


async def run_chat(plan: ChatPlan, handles: list[RequestHandle]) -> list[ChoiceResult]:
    """Wait for every choice (generated together) and return them in index order, read."""
    events = await asyncio.gather(*(collect(h) for h in handles))
    return read_replies(plan, choice_results(events, handles))


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
        rest = self.replies[index].finish()
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
        if events[index] and events[index][-1].finish_reason == "cancelled":
            raise GenerationCancelledError("the generation was cancelled (the server is stopping)")
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


def wire_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Pydantic messages → the formatter's ``{"role", "content", ...}`` dicts (developer →
    system, text parts joined; tool calls, tool call ids and reasoning kept)."""
    out = []
    for m in messages:
        message: dict[str, Any] = {
            "role": "system" if m.role == "developer" else m.role,
            "content": m.text(),
        }
        if m.tool_calls:
            message["tool_calls"] = [c.model_dump(mode="json") for c in m.tool_calls]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.reasoning_content is not None:
            message["reasoning_content"] = m.reasoning_content
        out.append(message)
    return out


async def respond_chat(
    served: ServedModel,
    plan: ChatPlan,
    guard: RequestGuard,
    stream: bool,
    on_complete: Callable[[list[ChoiceResult]], Awaitable[None]] | None = None,
) -> Response:
    """Answer a planned chat: SSE when ``stream``, else one JSON ``chat.completion``.
    The guard is closed when the answer is done (or abandoned)."""
    try:
        handles = submit_all(served, plan, guard)
        if stream:
            return sse_response(stream_chat(served, plan, handles, on_complete), guard)
        results = await run_chat(plan, handles)
        if on_complete is not None:
            await on_complete(results)
        return JSONResponse(completion_body(served, plan, results))
    except BaseException:
        guard.close()
        raise
    finally:
        if not stream:
            guard.close()
