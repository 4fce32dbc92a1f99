"""Text completions: llama.cpp's ``/completion`` and OpenAI's legacy ``/v1/completions``.

Both tokenize a raw prompt (text gets the model's BOS; token ids are used as given),
build one engine request per choice and shape the events two ways.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from bitserve.api.chat.serving import usage
from bitserve.api.completions.protocol import CompletionRequest, LlamaCompletionRequest
from bitserve.api.errors import InvalidParameterError
from bitserve.api.sampling import (
    SamplingFields,
    check_n,
    normalize_stop,
    to_sampling_params,
    wire_names,
)
from bitserve.api.served import ServedModel
from bitserve.api.streaming import (
    RequestGuard,
    collect,
    merged_events,
    sse,
    wire_finish_reason,
)
from bitserve.engine.constraint import CompiledConstraint, ConstraintError
from bitserve.engine.generate import PromptLogprob
from bitserve.engine.loop import RequestHandle
from bitserve.engine.types import GenerationRequest, TokenEvent, TopLogprob


@dataclass(slots=True)
class Prompt:
    """Token ids to run, and how many leading ids the server added (BOS)."""

    tokens: list[int]
    added: int = 0


def tokenize_prompt(served: ServedModel, prompt: str | list[int], param: str = "prompt") -> Prompt:
    if isinstance(prompt, list):
        vocab = served.loaded.tokenizer.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise InvalidParameterError(
                f"{param}: token id {bad[0]} is not in the vocabulary", param
            )
        return Prompt(list(prompt))
    served.check_input_chars(len(prompt), param)
    tok = served.loaded.tokenizer
    tokens = tok.encode(prompt, add_bos=tok.add_bos)
    return Prompt(tokens, int(bool(tokens) and tokens[0] == tok.bos_id and tok.add_bos))


def engine_request(
    served: ServedModel,
    prompt: Prompt,
    fields: SamplingFields,
    max_tokens: int,
    stop: list[str],
    top_n: int,
    seed: int | None = None,
    ignore_eos: bool = False,
    logprobs: bool = False,
) -> GenerationRequest:
    """One validated engine request; ``max_tokens`` -1 means until the context is full."""
    room = served.check_fits(len(prompt.tokens), "prompt")
    req = GenerationRequest(
        prompt_tokens=prompt.tokens,
        sampling=to_sampling_params(fields, served.loaded.tokenizer.vocab_size, seed),
        max_tokens=room if max_tokens < 0 else min(max_tokens, room),
        stop=stop,
        stop_token_ids=served.stop_token_ids,
        ignore_eos=ignore_eos,
        logprobs=logprobs or top_n > 0,
        top_logprobs=top_n,
    )
    with wire_names(
        {"max_tokens": "n_predict" if isinstance(fields, LlamaCompletionRequest) else "max_tokens"}
    ):
        served.generator.check_request(req)
    return req


# ---- llama.cpp /completion -----------------------------------------------------------------


def completion_constraint(
    served: ServedModel, body: LlamaCompletionRequest
) -> CompiledConstraint | None:
    """llama.cpp's ``json_schema`` or ``grammar`` (GBNF), compiled (not both: a 400, as
    llama.cpp answers). A schema or grammar the library refuses is a 400 with its reason."""
    if body.json_schema is not None and body.grammar is not None:
        raise InvalidParameterError(
            "json_schema: give json_schema or grammar, not both", "json_schema"
        )
    try:
        if body.json_schema is not None:
            return served.constraints.json_schema(body.json_schema)
        if body.grammar is not None:
            return served.constraints.gbnf(body.grammar)
    except ConstraintError as exc:
        param = "json_schema" if body.json_schema is not None else "grammar"
        raise InvalidParameterError(f"{param}: {exc.reason}", param) from exc
    return None


def stop_type(served: ServedModel, events: list[TokenEvent], stop: list[str]) -> str:
    """llama.cpp's ``stop_type``: eos (a stop token, or a grammar complete), word (a stop
    string), limit."""
    if not events or events[-1].finish_reason != "stop":
        return "limit"
    return "word" if events[-1].token_id not in served.stop_token_ids and stop else "eos"


def _probs_entry(
    served: ServedModel,
    token_id: int,
    logprob: float,
    tops: tuple[TopLogprob, ...] | list[TopLogprob],
) -> dict[str, Any]:
    token, raw = served.token_piece(token_id)
    return {
        "id": token_id,
        "token": token,
        "bytes": raw,
        "logprob": logprob,
        "top_logprobs": [
            {"id": t.token_id, "token": served.token_piece(t.token_id)[0],
             "bytes": served.token_piece(t.token_id)[1], "logprob": t.logprob}
            for t in tops
        ],
    }  # fmt: skip


@dataclass(slots=True)
class LlamaCompletion:
    """One /completion request: shapes llama.cpp's response objects."""

    served: ServedModel
    body: LlamaCompletionRequest
    request: GenerationRequest
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def plan(cls, served: ServedModel, body: LlamaCompletionRequest) -> LlamaCompletion:
        if not 0 <= body.n_probs <= 20:
            raise InvalidParameterError("n_probs: must be between 0 and 20", "n_probs")
        if body.n_predict < -1:
            raise InvalidParameterError("n_predict: must be -1 or more", "n_predict")
        prompt = tokenize_prompt(served, body.prompt)
        seed = None if body.seed is None or body.seed < 0 else body.seed
        body_seedless = body.model_copy(update={"seed": seed})
        req = engine_request(
            served, prompt, body_seedless, body.n_predict, normalize_stop(body.stop),
            body.n_probs, ignore_eos=body.ignore_eos,
        )  # fmt: skip
        req.sampling.constraint = completion_constraint(served, body)
        return cls(served, body, req)

    def partial(self, event: TokenEvent, n_predicted: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": 0,
            "content": event.text,
            "tokens": [event.token_id] if self.body.return_tokens else [],
            "stop": False,
            "id_slot": 0,
            "tokens_predicted": n_predicted,
            "tokens_evaluated": len(self.request.prompt_tokens),
        }
        if self.body.n_probs and event.logprob is not None:
            out["completion_probabilities"] = [
                _probs_entry(self.served, event.token_id, event.logprob, event.top_logprobs)
            ]
        return out

    def final(self, events: list[TokenEvent], content: str) -> dict[str, Any]:
        elapsed_ms = (time.perf_counter() - self.started) * 1000
        out = {
            **self.partial(TokenEvent(0, content), len(events)),
            "tokens": [e.token_id for e in events] if self.body.return_tokens else [],
            "stop": True,
            "model": self.served.name,
            "prompt": self.served.loaded.tokenizer.decode(
                self.request.prompt_tokens, skip_special=False
            ),
            "generation_settings": self.settings(),
            "stop_type": stop_type(self.served, events, self.request.stop),
            "stopping_word": "",
            "has_new_line": "\n" in content,
            "truncated": False,
            "tokens_cached": 0,
            "timings": {
                "prompt_n": len(self.request.prompt_tokens),
                "predicted_n": len(events),
                "predicted_ms": elapsed_ms,
                "predicted_per_second": len(events) / (elapsed_ms / 1000) if elapsed_ms else 0.0,
            },
        }
        if self.body.n_probs:
            out["completion_probabilities"] = [
                _probs_entry(self.served, e.token_id, e.logprob, e.top_logprobs)
                for e in events
                if e.logprob is not None
            ]
        return out

    def settings(self) -> dict[str, Any]:
        s = self.request.sampling
        return {
            "n_predict": self.body.n_predict,
            "n_ctx": self.served.ctx_size,
            "temperature": s.temperature,
            "top_k": s.top_k,
            "top_p": s.top_p,
            "min_p": s.min_p,
            "repeat_penalty": s.repetition_penalty,
            "repeat_last_n": s.repetition_window,
            "presence_penalty": s.presence_penalty,
            "frequency_penalty": s.frequency_penalty,
            "seed": -1 if s.seed is None else s.seed,
            "stop": self.request.stop,
            "n_probs": self.body.n_probs,
            "ignore_eos": self.request.ignore_eos,
        }

    async def run(self, guard: RequestGuard) -> dict[str, Any]:
        events = await collect(guard.track(self.served.engine.submit(self.request)))
        return self.final(events, "".join(e.text for e in events))

    async def stream(self, guard: RequestGuard) -> AsyncIterator[str]:
        handle = guard.track(self.served.engine.submit(self.request))
        events: list[TokenEvent] = []
        async for event in handle:
            events.append(event)
            if event.finish_reason is None or event.text:
                yield sse(self.partial(event, len(events)))
        await collect_check(events)
        yield sse(self.final(events, ""))


async def no_events() -> list[TokenEvent]:
    """The events of a choice that generates nothing (``max_tokens: 0`` scoring)."""
    return []


async def collect_check(events: list[TokenEvent]) -> None:
    from bitserve.api.errors import GenerationCancelledError

    if events and events[-1].finish_reason == "cancelled":
        raise GenerationCancelledError("the generation was cancelled (the server is stopping)")


# ---- OpenAI legacy /v1/completions ---------------------------------------------------------


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
        if body.logprobs is not None and not 0 <= body.logprobs <= 20:
            raise InvalidParameterError("logprobs: must be between 0 and 20", "logprobs")
        if body.max_tokens < 0:
            raise InvalidParameterError("max_tokens: must be 0 or more", "max_tokens")
        stop, top_n = normalize_stop(body.stop), body.logprobs or 0
        choices = []
        for p_index, raw in enumerate(_prompts(body)):
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
                if req is None:
                    served.check_fits(len(prompt.tokens), "prompt")
                choices.append(LegacyChoice(p_index * body.n + i, prompt, text, req))
        return cls(served, body, choices, model)

    async def echo_logprobs(self, choice: LegacyChoice) -> list[PromptLogprob]:
        tokens, top_n = choice.prompt.tokens, self.body.logprobs or 0
        scored = await self.served.engine.call(lambda g: g.prompt_logprobs(tokens, top_n))
        return scored[choice.prompt.added :]

    def logprobs_object(
        self,
        items: list[LogprobItem],
        offset: int,
    ) -> dict[str, Any]:
        tokens, lps, tops, offsets = [], [], [], []
        for token_id, lp, alternatives in items:
            text = self.served.token_piece(token_id)[0]
            tokens.append(text)
            lps.append(lp)
            tops.append(
                {self.served.token_piece(t.token_id)[0]: t.logprob for t in alternatives}
                if lp is not None
                else None
            )
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": lps,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

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
            logprobs = self.logprobs_object(prompt_items, 0)
            more = self.logprobs_object(generated, len(choice.prompt_text))
            for key, values in more.items():
                logprobs[key] += values
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
        for choice, events in zip(self.choices, all_events, strict=True):
            echoed = (
                await self.echo_logprobs(choice)
                if self.body.echo and self.body.logprobs is not None
                else None
            )
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
                await collect_check(choice_events)
                yield sse(
                    self.envelope([self.chunk(choice, "", wire_finish_reason(choice_events))])
                )
                continue
            choice_events.append(event)
            lp = None
            if self.body.logprobs is not None:  # every token, a final end-of-text too
                item: LogprobItem = (event.token_id, event.logprob, event.top_logprobs)
                lp = self.logprobs_object([item], offsets[live[k][0]])
                offsets[live[k][0]] += len(lp["tokens"][0])
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
