"""llama.cpp's ``POST /completion``: one prompt, one choice, llama.cpp's response fields
(``content``, ``stop_type``, ``timings``, ``completion_probabilities``...)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from bitserve.api.completions.protocol import LLAMA_SAMPLERS_OFF, LlamaCompletionRequest
from bitserve.api.completions.serving import engine_request, tokenize_prompt
from bitserve.api.errors import InvalidParameterError
from bitserve.api.sampling import MAX_LLAMA_STOP_STRINGS, normalize_stop
from bitserve.api.served import ServedModel
from bitserve.api.streaming import RequestGuard, check_not_cancelled, sse
from bitserve.engine.constraint import CompiledConstraint, ConstraintError
from bitserve.engine.loop import RequestHandle
from bitserve.engine.types import GenerationRequest, TokenEvent, TopLogprob


def completion_constraint(
    served: ServedModel, body: LlamaCompletionRequest
) -> CompiledConstraint | None:
    """llama.cpp's ``json_schema`` or ``grammar`` (GBNF), compiled (not both: a 400, as
    llama.cpp answers). A schema or grammar the library refuses is a 400 with its reason."""
    grammar = body.grammar or None  # "": no grammar, as llama.cpp reads it
    if body.json_schema is not None and grammar is not None:
        raise InvalidParameterError(
            "json_schema: give json_schema or grammar, not both", "json_schema"
        )
    try:
        if body.json_schema is not None:
            return served.constraints.json_schema(body.json_schema, "json_schema")
        if grammar is not None:
            return served.constraints.gbnf(grammar, "grammar")
    except ConstraintError as exc:
        param = "json_schema" if body.json_schema is not None else "grammar"
        raise InvalidParameterError(f"{param}: {exc.reason}", param) from exc
    return None


def stop_type(events: list[TokenEvent]) -> str:
    """llama.cpp's ``stop_type``: eos (a stop token, or a grammar complete), word (a stop
    string), limit."""
    if not events or events[-1].finish_reason != "stop":
        return "limit"
    return "word" if events[-1].stop_string is not None else "eos"


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
    first_token: float | None = None  # when the first event came: the prompt was done
    cached_tokens: int = 0  # prompt tokens the prefix cache served
    handle: RequestHandle | None = None  # set by submit()

    @classmethod
    def plan(cls, served: ServedModel, body: LlamaCompletionRequest) -> LlamaCompletion:
        if not 0 <= body.n_probs <= 20:
            raise InvalidParameterError("n_probs: must be between 0 and 20", "n_probs")
        if body.n_predict < -1:
            raise InvalidParameterError("n_predict: must be -1 or more", "n_predict")
        for name, is_off in LLAMA_SAMPLERS_OFF.items():
            if not is_off(getattr(body, name)):
                raise InvalidParameterError(
                    f"{name}: this sampler is not implemented; leave it out or off", name
                )
        prompt = tokenize_prompt(served, body.prompt, special=True)  # llama.cpp parses them
        seed = None if body.seed is None or body.seed < 0 else body.seed
        body_seedless = body.model_copy(update={"seed": seed})
        stop = normalize_stop(body.stop, limit=MAX_LLAMA_STOP_STRINGS)
        req = engine_request(
            served, prompt, body_seedless, body.n_predict, stop, body.n_probs,
            ignore_eos=body.ignore_eos,
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
        out = {
            **self.partial(TokenEvent(0, content), len(events)),
            "tokens": [e.token_id for e in events] if self.body.return_tokens else [],
            "stop": True,
            "model": self.served.name,
            "prompt": self.served.loaded.tokenizer.decode(
                self.request.prompt_tokens, skip_special=False
            ),
            "generation_settings": self.settings(),
            "stop_type": stop_type(events),
            "stopping_word": (events[-1].stop_string or "") if events else "",
            "has_new_line": "\n" in "".join(e.text for e in events),
            "truncated": False,
            "tokens_cached": self.cached_tokens,
            "timings": self.timings(len(events)),
        }
        if self.body.n_probs:
            out["completion_probabilities"] = [
                _probs_entry(self.served, e.token_id, e.logprob, e.top_logprobs)
                for e in events
                if e.logprob is not None
            ]
        return out

    def timings(self, predicted: int) -> dict[str, Any]:
        """llama.cpp's ``timings``: the prompt (the computed tokens, cached ones apart in
        ``cache_n``) until the first token, then generation."""
        now = time.perf_counter()
        first = self.first_token or now
        prompt_n = len(self.request.prompt_tokens) - self.cached_tokens
        prompt_ms, predicted_ms = (first - self.started) * 1000, (now - first) * 1000
        return {
            "cache_n": self.cached_tokens,
            "prompt_n": prompt_n,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
            "prompt_per_second": prompt_n / prompt_ms * 1000 if prompt_ms else 0.0,
            "predicted_n": predicted,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / predicted if predicted else 0.0,
            "predicted_per_second": predicted / predicted_ms * 1000 if predicted_ms else 0.0,
        }

    def observe(self, handle: RequestHandle, event: TokenEvent) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()
        self.cached_tokens = handle.cached_tokens

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

    def submit(self, guard: RequestGuard) -> RequestHandle:
        """The generation, submitted once; a full queue raises (a 503) before any event."""
        if self.handle is None:
            self.handle = guard.track(self.served.engine.submit(self.request))
        return self.handle

    async def run(self, guard: RequestGuard) -> dict[str, Any]:
        handle = self.submit(guard)
        events: list[TokenEvent] = []
        async for event in handle:
            self.observe(handle, event)
            events.append(event)
        check_not_cancelled(events)
        return self.final(events, "".join(e.text for e in events))

    async def stream(self, guard: RequestGuard) -> AsyncIterator[str]:
        handle = self.submit(guard)
        events: list[TokenEvent] = []
        async for event in handle:
            self.observe(handle, event)
            events.append(event)
            if event.finish_reason is None or event.text:
                yield sse(self.partial(event, len(events)))
        check_not_cancelled(events)
        yield sse(self.final(events, ""))
