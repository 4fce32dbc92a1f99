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

from bitserve.api.chat.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatMessage,
    ChoiceLogprobs,
    LogprobEntry,
    OracleAssistantMessage,
    PromptTokensDetails,
    TopLogprobEntry,
    Usage,
)
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
    ``cached_tokens``: prompt tokens the engine reused from its prefix cache."""

    index: int
    events: list[TokenEvent]
    cached_tokens: int = 0

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def finish_reason(self) -> str:
        return wire_finish_reason(self.events)


@dataclass(slots=True)
class ChatPlan:
    """Everything needed to answer: one engine request per choice, plus response fields.
    ``extra`` is merged into every response object (conversation id, truncation)."""

    requests: list[GenerationRequest]
    model: str
    logprobs: bool
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


def encode_chat(
    served: ServedModel, messages: Sequence[Mapping[str, Any]], param: str
) -> list[int]:
    """The chat-formatted prompt's token ids (a message the format rejects is a 400)."""
    try:
        return served.loaded.chat.encode(messages)
    except ValueError as exc:
        raise InvalidParameterError(f"{param}: {exc}", param) from exc


def check_supported(body: ChatCompletionRequest) -> None:
    """400 for what the request asks and this server cannot do (function calling, output
    constrained to JSON): answering with plain text would look like the model's choice."""
    fmt = (body.response_format or {}).get("type", "text")
    if fmt != "text":
        raise InvalidParameterError(
            f"response_format: type {fmt!r} is not supported, only 'text' "
            "(this server does not constrain its output)",
            "response_format",
        )
    for param in ("tools", "functions"):
        if getattr(body, param):
            raise InvalidParameterError(
                f"{param}: function calling is not supported by this server", param
            )
    for param in ("tool_choice", "function_call"):
        choice = getattr(body, param)
        if choice not in (None, "none", "auto"):
            raise InvalidParameterError(
                f"{param}: {choice!r} needs function calling, which this server does not "
                "support (only 'none' or 'auto')",
                param,
            )


def plan_chat(
    served: ServedModel,
    body: ChatCompletionRequest,
    messages: Sequence[Mapping[str, Any]],
    model: str,
    param: str = "messages",
    prompt: list[int] | None = None,
) -> ChatPlan:
    """Validate ``body`` and tokenize ``messages`` (the full history) into engine requests
    (``prompt``: their token ids, when the caller has them already). Raises 400s naming
    the field; the prompt must leave room for one token."""
    check_n(body.n)
    if not messages:
        raise InvalidParameterError(f"{param}: must contain at least one message", param)
    stop = normalize_stop(body.stop)
    max_tokens, top_n = _max_tokens(body), _top_logprobs(body)
    if prompt is None:
        prompt = encode_chat(served, messages, param)
    max_tokens = min(max_tokens, served.check_fits(len(prompt), param))
    vocab = served.loaded.tokenizer.vocab_size
    requests = []
    for i in range(body.n):
        seed = None if body.seed is None else body.seed + i
        req = GenerationRequest(
            prompt_tokens=prompt,
            sampling=to_sampling_params(body, vocab, seed),
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
    return ChatPlan(requests, model, body.logprobs, include_usage=include_usage)


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


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
    """OpenAI's usage object; ``cached_tokens`` goes to ``prompt_tokens_details``."""
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )


def cached_tokens(results: list[ChoiceResult]) -> int:
    """Prompt tokens served from the prefix cache (the prompt is counted once: the most
    any choice reused)."""
    return max((r.cached_tokens for r in results), default=0)


def _message(plan: ChatPlan, content: str) -> AssistantMessage:
    if plan.oracle:
        return OracleAssistantMessage(content=content)
    return AssistantMessage(content=content)


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
            ChatChoice(
                index=r.index,
                message=_message(plan, r.text),
                logprobs=logprobs,
                finish_reason=r.finish_reason,  # type: ignore[arg-type]
            ).model_dump(mode="json")
        )
    completion_tokens = sum(len(r.events) for r in results)
    return {
        "id": plan.id,
        "object": "chat.completion",
        "created": plan.created,
        "model": plan.model,
        "choices": choices,
        "usage": usage(plan.prompt_tokens, completion_tokens, cached_tokens(results)).model_dump(
            mode="json"
        ),
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


async def run_chat(handles: list[RequestHandle]) -> list[ChoiceResult]:
    """Wait for every choice (generated together) and return them in index order."""
    return choice_results(await asyncio.gather(*(collect(h) for h in handles)), handles)


class ChunkWriter:
    """Builds the ``chat.completion.chunk`` events of one plan, in OpenAI's order."""

    def __init__(self, served: ServedModel, plan: ChatPlan) -> None:
        self.served = served
        self.plan = plan

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
        entries = logprob_entries(self.served, [event]) if self.plan.logprobs else []
        if not event.text and not entries:
            return None
        logprobs = {"content": [e.model_dump(mode="json") for e in entries], "refusal": None}
        choice = {
            "index": index,
            "delta": {"content": event.text},
            "logprobs": logprobs if self.plan.logprobs else None,
            "finish_reason": None,
        }
        return self.chunk([choice])

    def finish(self, index: int, reason: str) -> str:
        return self.chunk(
            [{"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}]
        )


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
        yield writer.finish(index, wire_finish_reason(events[index]))
    results = choice_results(events, handles)
    if on_complete is not None:
        await on_complete(results)
    if plan.include_usage:
        total = sum(len(r.events) for r in results)
        yield writer.chunk([], usage(plan.prompt_tokens, total, cached_tokens(results)))
    yield sse("[DONE]")


def wire_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Pydantic messages → the formatter's ``{"role", "content"}`` dicts (developer →
    system, text parts joined)."""
    return [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in messages
    ]


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
        results = await run_chat(handles)
        if on_complete is not None:
            await on_complete(results)
        return JSONResponse(completion_body(served, plan, results))
    except BaseException:
        guard.close()
        raise
    finally:
        if not stream:
            guard.close()
