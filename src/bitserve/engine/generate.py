"""Generation for one request at a time: prompt once, then token by token.

``Generator(model, tokenizer).generate(req)`` runs the whole prompt through
``model.forward`` in one call, then samples, emits and forwards one token per step. Every
event's ``text`` is whole UTF-8 characters (``IncrementalDetokenizer``) and never contains
a stop string or anything after it: text that could still be the start of a stop string is
held back until it cannot be (or generation ends).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from bitserve.engine.sampling import (
    Sampler,
    SamplingParamError,
    log_softmax,
    top_logprobs,
    validate_top_logprobs,
)
from bitserve.engine.types import GenerationRequest, GenerationResult, TokenEvent, TopLogprob
from bitserve.tokenizer import IncrementalDetokenizer

if TYPE_CHECKING:
    from bitserve.model.bitnet import BitNetModel
    from bitserve.tokenizer import Tokenizer

PROMPT_LOGPROBS_CHUNK = 256  # tokens per forward in prompt_logprobs: bounds the [T, vocab] logits


class ContextLengthError(ValueError):
    """The prompt does not fit in the model's context (raised before any work)."""

    def __init__(self, prompt_tokens: int, context_length: int) -> None:
        super().__init__(
            f"the prompt has {prompt_tokens} tokens, more than the model's context length "
            f"of {context_length}"
        )
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


class PromptLogprob(NamedTuple):
    """Logprob of one prompt token given the tokens before it (``None`` for the first)."""

    token_id: int
    logprob: float | None
    top: list[TopLogprob]


@dataclass(slots=True)
class StopStringMatcher:
    """Cuts generated text at the first stop string, holding back possible beginnings.

    Invariant: ``held`` is the longest suffix of the text fed so far that is a proper
    prefix of some stop string; everything before it has been returned by :meth:`feed`.
    Hence no stop string can begin inside text already returned.
    """

    stops: Sequence[str]
    held: str = ""
    _stops: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self._stops = [s for s in self.stops if s]

    def feed(self, text: str) -> tuple[str, bool]:
        """``(text safe to emit, stopped)``; once stopped, the rest must be discarded."""
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        keep = self._longest_partial(buf)
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Generation ended without a stop string: release the held text."""
        text, self.held = self.held, ""
        return text

    def _longest_partial(self, buf: str) -> int:
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best


@dataclass(slots=True)
class _TextState:
    """Bytes → text → stop-string cut for one generation."""

    detok: IncrementalDetokenizer
    stops: StopStringMatcher

    def push(self, token_id: int) -> tuple[str, bool]:
        return self.stops.feed(self.detok.push(token_id))

    def finish(self) -> tuple[str, bool]:
        """Generation ends here: flush partial characters and held text."""
        text, stopped = self.stops.feed(self.detok.flush())
        return (text, True) if stopped else (text + self.stops.flush(), False)


class Generator:
    """Generates for one request at a time with ``model`` (a ``BitNetModel``-like object:
    ``config.context_length``, ``config.vocab_size``, ``new_cache``, ``forward``)."""

    def __init__(self, model: BitNetModel, tokenizer: Tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer

    @property
    def context_length(self) -> int:
        return int(self.model.config.context_length)

    def check_request(self, req: GenerationRequest) -> Sampler:
        """Validate ``req`` and build its sampler. Raises :class:`ContextLengthError` or
        :class:`SamplingParamError` (``param`` names the field)."""
        n_prompt = len(req.prompt_tokens)
        if n_prompt == 0:
            raise SamplingParamError("prompt", "must contain at least one token")
        if n_prompt > self.context_length:
            raise ContextLengthError(n_prompt, self.context_length)
        vocab = int(self.model.config.vocab_size)
        bad = [t for t in req.prompt_tokens if not 0 <= t < vocab]
        if bad:
            raise SamplingParamError("prompt", f"token id {bad[0]} is not in the vocabulary")
        if req.max_tokens < 0:
            raise SamplingParamError("max_tokens", f"must be 0 or more, got {req.max_tokens}")
        validate_top_logprobs(req.top_logprobs)
        return Sampler.create(req.sampling, vocab)

    def generate(
        self, req: GenerationRequest, cancel: threading.Event | None = None
    ) -> Iterator[TokenEvent]:
        """Events for each generated token; the last one carries ``finish_reason``.

        Validation errors are raised here, before any work. ``max_tokens == 0`` yields no
        events. ``cancel`` is checked after every sampled token: that token's event is the
        last one, with finish_reason "cancelled".
        """
        sampler = self.check_request(req)
        return self._run(req, sampler, cancel)

    def _run(
        self, req: GenerationRequest, sampler: Sampler, cancel: threading.Event | None
    ) -> Iterator[TokenEvent]:
        if req.max_tokens == 0:
            return
        n_prompt = len(req.prompt_tokens)
        cache = self.model.new_cache(
            max(n_prompt, min(self.context_length, n_prompt + req.max_tokens - 1))
        )
        logits = self.model.forward(req.prompt_tokens, cache)
        context = list(req.prompt_tokens)
        text = _TextState(IncrementalDetokenizer(self.tokenizer), StopStringMatcher(req.stop))
        want_logprobs = req.logprobs or req.top_logprobs > 0
        n_generated = 0
        while True:
            step = sampler.step(logits, context, want_logprobs)
            context.append(step.token_id)
            n_generated += 1
            event = self._event(req, step.token_id, step.logprobs, text, n_generated, cancel)
            yield event
            if event.finish_reason is not None:
                return
            logits = self.model.forward([step.token_id], cache)

    def _event(
        self,
        req: GenerationRequest,
        token_id: int,
        logprobs: np.ndarray | None,
        text: _TextState,
        n_generated: int,
        cancel: threading.Event | None,
    ) -> TokenEvent:
        finish = self._finish_reason(req, token_id, n_generated, cancel)
        if finish == "stop":  # a stop token: its own text is never shown
            piece, _ = text.finish()
        else:
            piece, stopped = text.push(token_id)
            if stopped:
                finish = "stop"
            elif finish is not None:
                tail, stopped = text.finish()
                piece += tail
                finish = "stop" if stopped else finish
        lp, tops = self._logprobs(token_id, logprobs, req.top_logprobs)
        return TokenEvent(token_id, piece, lp, tops, finish)

    def _finish_reason(
        self,
        req: GenerationRequest,
        token_id: int,
        n_generated: int,
        cancel: threading.Event | None,
    ) -> str | None:
        if token_id in req.stop_token_ids and not req.ignore_eos:
            return "stop"
        if (
            n_generated >= req.max_tokens
            or len(req.prompt_tokens) + n_generated >= self.context_length
        ):
            return "length"
        if cancel is not None and cancel.is_set():
            return "cancelled"
        return None

    def _logprobs(
        self, token_id: int, logprobs: np.ndarray | None, top_n: int
    ) -> tuple[float | None, tuple[TopLogprob, ...]]:
        if logprobs is None:
            return None, ()
        tops = tuple(
            TopLogprob(tid, self.token_text(tid), lp) for tid, lp in top_logprobs(logprobs, top_n)
        )
        return float(logprobs[token_id]), tops

    def token_text(self, token_id: int) -> str:
        """One token's text as shown in logprobs (control tokens by name)."""
        return self.tokenizer.decode([token_id], skip_special=False)

    def complete(
        self, req: GenerationRequest, cancel: threading.Event | None = None
    ) -> GenerationResult:
        """Run :meth:`generate` to the end and gather the result."""
        events = list(self.generate(req, cancel))
        finish = events[-1].finish_reason if events else "length"
        return GenerationResult(
            text="".join(e.text for e in events),
            token_ids=[e.token_id for e in events],
            finish_reason=finish or "length",
            prompt_tokens=len(req.prompt_tokens),
            completion_tokens=len(events),
            events=events,
        )

    def prompt_logprobs(self, tokens: Sequence[int], top_n: int = 0) -> list[PromptLogprob]:
        """Logprob of each prompt token under the model given the tokens before it, with the
        ``top_n`` most likely alternatives at that position (no bias, no penalties).
        The first token has logprob ``None`` and no alternatives."""
        validate_top_logprobs(top_n)
        if len(tokens) > self.context_length:
            raise ContextLengthError(len(tokens), self.context_length)
        if not tokens:
            return []
        out = [PromptLogprob(int(tokens[0]), None, [])]
        cache = self.model.new_cache(len(tokens))
        for start in range(0, len(tokens), PROMPT_LOGPROBS_CHUNK):
            chunk = list(tokens[start : start + PROMPT_LOGPROBS_CHUNK])
            logits = self.model.forward(chunk, cache, all_logits=True)  # [T, vocab]
            for row, target in zip(
                logits, tokens[start + 1 : start + 1 + len(chunk)], strict=False
            ):
                lp = log_softmax(row)
                top = [TopLogprob(t, self.token_text(t), v) for t, v in top_logprobs(lp, top_n)]
                out.append(PromptLogprob(int(target), float(lp[target]), top))
        return out
