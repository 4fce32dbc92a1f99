"""Chat completions: request → engine requests → ``chat.completion`` (or its SSE chunks).

Shared by ``/v1/chat/completions``, ``/v1/conversations/{id}/chat`` and the oracle routes;
they differ only in where the messages come from and a few extra response fields. This
module plans a chat (validation, prompt, constraint) and answers it; the answer itself is
built by ``response`` (a whole ``chat.completion``) and ``stream`` (its SSE chunks).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from bitserve.api.auth import scope_to_caller
from bitserve.api.chat.output import OutputPlan, plan_output, response_schema
from bitserve.api.chat.protocol import (
    ChatCompletionRequest,
    ChatMessage,
)
from bitserve.api.chat.response import (
    ChoiceResult,
    choice_results,
    completion_body,
    read_replies,
)
from bitserve.api.chat.stream import stream_chat
from bitserve.api.chat.tools import ToolPlan, tool_plan
from bitserve.api.errors import InvalidParameterError
from bitserve.api.sampling import check_n, normalize_stop, to_sampling_params, wire_names
from bitserve.api.served import ServedModel
from bitserve.api.streaming import (
    RequestGuard,
    collect,
    sse_response,
)
from bitserve.engine.loop import RequestHandle
from bitserve.engine.sampling import validate_top_logprobs
from bitserve.engine.types import GenerationRequest


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
    """400 for the deprecated ``functions``/``function_call`` (use ``tools``), audio output,
    web search and other servers' structured-output fields: answering with plain text would
    look like the model's choice."""
    if body.functions:
        raise InvalidParameterError(
            "functions: deprecated and not supported; use tools", "functions"
        )
    if body.function_call not in (None, "none", "auto"):
        raise InvalidParameterError(
            "function_call: deprecated and not supported; use tool_choice", "function_call"
        )
    if body.modalities is not None and any(m != "text" for m in body.modalities):
        raise InvalidParameterError(
            f"modalities: only text is supported, not {body.modalities}", "modalities"
        )
    if body.audio is not None:
        raise InvalidParameterError("audio: audio output is not supported", "audio")
    if body.web_search_options is not None:
        raise InvalidParameterError(
            "web_search_options: web search is not supported", "web_search_options"
        )
    foreign = body.foreign_constraint()
    if foreign is not None:
        raise InvalidParameterError(
            f"{foreign}: not supported on chat routes; use response_format (a JSON schema), "
            "or /completion for a GBNF grammar",
            foreign,
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


def check_fields(body: ChatCompletionRequest) -> tuple[list[str], int, int]:
    """400s for the fields that are wrong whatever the model and messages (unsupported,
    out of range); returns the stop strings, ``max_tokens`` and ``top_logprobs``."""
    check_supported(body)
    check_n(body.n)
    stop = normalize_stop(body.stop)
    max_tokens, top_n = _max_tokens(body), _top_logprobs(body)
    to_sampling_params(body, None)
    return stop, max_tokens, top_n


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
    stop, max_tokens, top_n = check_fields(body)
    if not messages:
        raise InvalidParameterError(f"{param}: must contain at least one message", param)
    options = options or prompt_options(served, body)
    if prompt is None:
        prompt = encode_chat(served, messages, param, options)
    max_tokens = min(max_tokens, served.check_fits(len(prompt), param))
    output = plan_reply(served, body, options, prompt)
    output.check_stop(stop)
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
            stop_until=output.stop_until,
            stop_token_ids=served.stop_token_ids,
            logprobs=body.logprobs,
            top_logprobs=top_n,
        )
        with wire_names():
            served.generator.check_request(req)
        requests.append(req)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return ChatPlan(requests, model, body.logprobs, output, include_usage=include_usage)


def submit_all(served: ServedModel, plan: ChatPlan, guard: RequestGuard) -> list[RequestHandle]:
    """Every choice's request, submitted at once: they join the running batch together.
    A full queue raises (a 503) before anything is sent."""
    return [guard.track(served.engine.submit(req)) for req in plan.requests]


async def run_chat(plan: ChatPlan, handles: list[RequestHandle]) -> list[ChoiceResult]:
    """Wait for every choice (generated together) and return them in index order, read."""
    events = await asyncio.gather(*(collect(h) for h in handles))
    return read_replies(plan, choice_results(events, handles))


def input_chars(
    messages: Sequence[Mapping[str, Any]], tools: list[dict[str, Any]] | None = None
) -> int:
    """The characters of text the chat template will render from wire ``messages`` (their
    content, reasoning and tool calls) and the ``tools`` it lists, counted before any
    tokenizing (``--max-input-chars``)."""
    chars = len(json.dumps(tools, ensure_ascii=False)) if tools else 0  # as templates do
    for m in messages:
        chars += len(m["content"]) + len(m.get("reasoning_content") or "")
        for call in m.get("tool_calls") or ():
            function = call.get("function") or {}
            chars += len(function.get("name") or "") + len(function.get("arguments") or "")
    return chars


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


async def answer_chat(
    served: ServedModel,
    body: ChatCompletionRequest,
    model: str,
    request: Request,
    oracle: bool = False,
) -> Response:
    """A stateless chat (``/v1/chat/completions``, the oracle routes), answered as
    ``model``: the checks that come before any tokenizing (queue room, input size), the
    plan on a worker thread, the caller's prefix-cache scope, then :func:`respond_chat`."""
    served.check_queue_room(body.n, "n")
    messages = wire_messages(body.messages)
    served.check_input_chars(input_chars(messages, body.tools), "messages")
    plan = await run_in_threadpool(plan_chat, served, body, messages, model)  # tokenizes
    scope_to_caller(plan.requests, request)
    plan.oracle = oracle
    return await respond_chat(served, plan, RequestGuard(request), body.stream)


async def respond_chat(
    served: ServedModel,
    plan: ChatPlan,
    guard: RequestGuard,
    stream: bool,
    on_complete: Callable[[list[ChoiceResult]], Awaitable[None]] | None = None,
    on_submitted: Callable[[], Awaitable[None]] | None = None,
) -> Response:
    """Answer a planned chat: SSE when ``stream``, else one JSON ``chat.completion``.
    ``on_submitted`` runs once the engine took the requests (a full queue raises before);
    if it raises, they are cancelled. The guard is closed when the answer is done (or
    abandoned)."""
    try:
        handles = submit_all(served, plan, guard)
        if on_submitted is not None:
            await on_submitted()
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
