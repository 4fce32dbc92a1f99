"""OpenAI's legacy ``POST /v1/completions``: several prompts and choices, ``echo``,
``logprobs`` with text offsets, ``text_completion`` objects or their chunks."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import ClientDisconnect

from bitserve.api.chat.response import usage
from bitserve.api.completions.protocol import CompletionRequest
from bitserve.api.completions.serving import Prompt, engine_request, no_events, tokenize_prompt
from bitserve.api.errors import ContextLengthExceededError, InvalidParameterError
from bitserve.api.sampling import check_n, normalize_stop
from bitserve.api.served import ServedModel
from bitserve.api.streaming import (
    RequestGuard,
    check_not_cancelled,
    collect,
    merged_events,
    sse,
    wire_finish_reason,
)
from bitserve.engine.generate import PromptLogprob
from bitserve.engine.loop import RequestHandle
from bitserve.engine.types import GenerationRequest, TokenEvent, TopLogprob
from bitserve.tokenizer.detokenizer import IncrementalDetokenizer


def _prompts(body: CompletionRequest) -> list[str | list[int]]:
    p = body.prompt
    if isinstance(p, str):
        return [p]
    if p and all(isinstance(x, int) for x in p):
        return [p]  # type: ignore[list-item]
    if not p:
        raise InvalidParameterError("prompt: must not be empty", "prompt")
    return list(p)  # type: ignore[arg-type]


LogprobItem = tuple[int, float | None, Sequence[TopLogprob]]


@dataclass(slots=True)
class LegacyChoice:
    index: int
    prompt: Prompt
    prompt_text: str
    request: GenerationRequest | None  # None when max_tokens == 0


@dataclass(slots=True)
class LegacyCompletion:
    served: ServedModel
    body: CompletionRequest
    choices: list[LegacyChoice]
    model: str
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))
    handles: list[RequestHandle | None] | None = None  # set by submit()

    @classmethod
    def plan(cls, served: ServedModel, body: CompletionRequest) -> LegacyCompletion:
        model = served.resolve(body.model)
        check_n(body.n)
        if body.suffix is not None:
            raise InvalidParameterError("suffix: not supported", "suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise InvalidParameterError("best_of: only best_of == n is supported", "best_of")
        foreign = body.foreign_constraint("response_format", "tools")
        if foreign is not None:
            raise InvalidParameterError(
                f"{foreign}: structured output is not supported on /v1/completions; use "
                "/completion (json_schema, grammar) or /v1/chat/completions "
                "(response_format, tools)",
                foreign,
            )
        if body.logprobs is not None and not 0 <= body.logprobs <= 20:
            raise InvalidParameterError("logprobs: must be between 0 and 20", "logprobs")
        if body.max_tokens < 0:
            raise InvalidParameterError("max_tokens: must be 0 or more", "max_tokens")
        stop, top_n = normalize_stop(body.stop), body.logprobs or 0
        prompts = _prompts(body)
        if body.max_tokens > 0:
            served.check_queue_room(len(prompts) * body.n, "prompt")
        choices = []
        for p_index, raw in enumerate(prompts):
            prompt = tokenize_prompt(served, raw)
            text = (
                raw
                if isinstance(raw, str)
                else served.loaded.tokenizer.decode(raw, skip_special=False)
            )
            for i in range(body.n):
                seed = None if body.seed is None else body.seed + i
                req = None if body.max_tokens == 0 else engine_request(
                    served, prompt, body, body.max_tokens, stop, top_n, seed,
                    logprobs=body.logprobs is not None,
                )  # fmt: skip
                if req is None and len(prompt.tokens) > served.ctx_size:  # scored, room for none
                    raise ContextLengthExceededError(len(prompt.tokens), served.ctx_size, "prompt")
                choices.append(LegacyChoice(p_index * body.n + i, prompt, text, req))
        return cls(served, body, choices, model)

    async def echo_logprobs(self, choice: LegacyChoice, guard: RequestGuard) -> list[PromptLogprob]:
        """The prompt's scores, computed a chunk at a time between the engine's steps;
        a client that leaves stops them before the next chunk (``ClientDisconnect``)."""
        tokens, top_n = choice.prompt.tokens, self.body.logprobs or 0
        scheduler = self.served.engine.scheduler
        dtype = scheduler.config.kv_dtype if scheduler is not None else "float32"
        scoring = asyncio.ensure_future(
            self.served.engine.call_in_steps(lambda g: g.score_prompt(tokens, top_n, dtype))
        )

        def client_left() -> None:
            scoring.cancel()

        guard.add(client_left)
        try:
            await asyncio.wait({scoring})
        finally:
            scoring.cancel()  # this request cancelled itself (shutdown): so is its scoring
        if scoring.cancelled():
            raise ClientDisconnect()
        return scoring.result()[choice.prompt.added :]

    def logprobs_object(self, items: list[LogprobItem], offsets: list[int]) -> dict[str, Any]:
        """OpenAI's legacy ``logprobs`` of ``items``, the i-th token at ``offsets[i]``."""
        tokens, lps, tops = [], [], []
        for token_id, lp, alternatives in items:
            tokens.append(self.served.token_piece(token_id)[0])
            lps.append(lp)
            tops.append(
                {self.served.token_piece(t.token_id)[0]: t.logprob for t in alternatives}
                if lp is not None
                else None
            )
        return {
            "tokens": tokens,
            "token_logprobs": lps,
            "top_logprobs": tops,
            "text_offset": list(offsets),
        }

    def prompt_offsets(self, token_ids: list[int]) -> list[int]:
        """Where each echoed prompt token starts in the prompt's text: the characters its
        predecessors complete (a token ending inside a character starts at that
        character)."""
        detokenizer = IncrementalDetokenizer(self.served.loaded.tokenizer, skip_special=False)
        offsets, at = [], 0
        for token_id in token_ids:
            offsets.append(at)
            at += len(detokenizer.push(token_id))
        return offsets

    def choice_object(
        self, choice: LegacyChoice, events: list[TokenEvent], echoed: list[PromptLogprob] | None
    ) -> dict[str, Any]:
        text = "".join(e.text for e in events)
        prefix = choice.prompt_text if self.body.echo else ""
        logprobs = None
        if self.body.logprobs is not None:
            # as OpenAI: every generated token is listed, a final end-of-text included
            # (lm-evaluation-harness drops the last entry of prompt + 1); offsets count
            # from the prompt's start
            prompt_items: list[LogprobItem] = [(p.token_id, p.logprob, p.top) for p in echoed or []]
            generated: list[LogprobItem] = [(e.token_id, e.logprob, e.top_logprobs) for e in events]
            offsets = self.prompt_offsets([p.token_id for p in echoed or []])
            at = len(choice.prompt_text)
            for e in events:  # where each token's text starts in the reply (hidden: none)
                offsets.append(at)
                at += len(e.text)
            logprobs = self.logprobs_object(prompt_items + generated, offsets)
        return {
            "text": prefix + text,
            "index": choice.index,
            "logprobs": logprobs,
            "finish_reason": wire_finish_reason(events),
        }

    def envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.served.fingerprint,
            "choices": choices,
        }

    def submit(self, guard: RequestGuard) -> list[RequestHandle | None]:
        """Every choice (``n`` per prompt) submitted at once, so they decode together in
        the running batch; a full queue raises (a 503) before anything is sent. ``None``
        for a choice that generates nothing (``max_tokens: 0``)."""
        if self.handles is None:
            self.handles = [
                guard.track(self.served.engine.submit(c.request)) if c.request else None
                for c in self.choices
            ]
        return self.handles

    async def run(self, guard: RequestGuard) -> dict[str, Any]:
        handles = self.submit(guard)
        all_events = await asyncio.gather(*(collect(h) if h else no_events() for h in handles))
        out, completion_tokens = [], 0
        cached = max((h.cached_tokens for h in handles if h is not None), default=0)
        scored: dict[int, list[PromptLogprob]] = {}  # by prompt: its n choices share it
        for choice, events in zip(self.choices, all_events, strict=True):
            echoed = None
            if self.body.echo and self.body.logprobs is not None:
                prompt_index = choice.index // self.body.n
                if prompt_index not in scored:
                    scored[prompt_index] = await self.echo_logprobs(choice, guard)
                echoed = scored[prompt_index]
            out.append(self.choice_object(choice, events, echoed))
            completion_tokens += len(events)
        prompt_tokens = sum(len(c.prompt.tokens) for c in self.choices[:: self.body.n])
        return {
            **self.envelope(out),
            "usage": usage(prompt_tokens, completion_tokens, cached).model_dump(mode="json"),
        }

    async def stream(self, guard: RequestGuard) -> AsyncIterator[str]:
        """The echoed prompts (if asked), then every choice's token chunks as they come
        (interleaved, each with its ``index``) and its finish chunk when it ends; a usage
        chunk with ``stream_options.include_usage``; then ``[DONE]``."""
        handles = self.submit(guard)
        if self.body.echo:
            for choice in self.choices:
                yield sse(self.envelope([self.chunk(choice, choice.prompt_text, None)]))
        events: list[list[TokenEvent]] = [[] for _ in self.choices]
        for i in (i for i, h in enumerate(handles) if h is None):  # max_tokens 0: done
            yield sse(self.envelope([self.chunk(self.choices[i], "", "length")]))
        live = [(i, h) for i, h in enumerate(handles) if h is not None]
        offsets = [len(c.prompt_text) for c in self.choices]  # text_offset: from the prompt
        async for k, event in merged_events([h for _, h in live]):
            choice_events, choice = events[live[k][0]], self.choices[live[k][0]]
            if event is None:
                check_not_cancelled(choice_events)
                yield sse(
                    self.envelope([self.chunk(choice, "", wire_finish_reason(choice_events))])
                )
                continue
            choice_events.append(event)
            lp = None
            if self.body.logprobs is not None:  # every token, a final end-of-text too
                item: LogprobItem = (event.token_id, event.logprob, event.top_logprobs)
                lp = self.logprobs_object([item], [offsets[live[k][0]]])
            offsets[live[k][0]] += len(event.text)
            if event.text or lp:
                yield sse(self.envelope([self.chunk(choice, event.text, None, lp)]))
        if self.body.stream_options and self.body.stream_options.include_usage:
            prompt_tokens = sum(len(c.prompt.tokens) for c in self.choices[:: self.body.n])
            completion_tokens = sum(len(e) for e in events)
            cached = max((h.cached_tokens for _, h in live), default=0)
            use = usage(prompt_tokens, completion_tokens, cached).model_dump(mode="json")
            yield sse({**self.envelope([]), "usage": use})
        yield sse("[DONE]")

    @staticmethod
    def chunk(
        choice: LegacyChoice, text: str, finish: str | None, logprobs: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return {"text": text, "index": choice.index, "logprobs": logprobs, "finish_reason": finish}
