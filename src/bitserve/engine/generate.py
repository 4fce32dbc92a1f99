"""Generation for one request at a time: prompt once, then token by token.

``Generator(model, tokenizer).generate(req)`` runs the whole prompt through
``model.forward`` in one call, then samples, emits and forwards one token per step. Every
event's ``text`` is whole UTF-8 characters (``IncrementalDetokenizer``) and never contains
a stop string or anything after it: text that could still be the start of a stop string is
held back until it cannot be (or generation ends).
"""

from __future__ import annotations

import threading
from collections.abc import Generator as Pieces
from collections.abc import Iterator
from collections.abc import Sequence as SequenceOf
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from bitserve.engine.sampling import (
    Sampler,
    SamplingParamError,
    log_softmax,
    top_logprobs,
    validate_top_logprobs,
)
from bitserve.engine.sequence import Sequence, StopStringMatcher, TextState, token_text
from bitserve.engine.types import GenerationRequest, GenerationResult, TokenEvent, TopLogprob

if TYPE_CHECKING:
    from bitserve.model.bitnet import BitNetModel
    from bitserve.tokenizer import Tokenizer

__all__ = [
    "ContextLengthError",
    "Generator",
    "PromptLogprob",
    "Sequence",
    "StopStringMatcher",
    "TextState",
]

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
        return self._run(self.start_sequence(req, cancel))

    def start_sequence(
        self, req: GenerationRequest, cancel: threading.Event | None = None
    ) -> Sequence:
        """Validate ``req`` and return its :class:`Sequence` (no model work yet)."""
        sampler = self.check_request(req)
        return Sequence.create(req, sampler, self.tokenizer, self.context_length, cancel)

    def _run(self, seq: Sequence) -> Iterator[TokenEvent]:
        req = seq.request
        if req.max_tokens == 0:
            return
        n_prompt = len(req.prompt_tokens)
        cache = self.model.new_cache(
            max(n_prompt, min(self.context_length, n_prompt + req.max_tokens - 1))
        )
        logits = self.model.forward(req.prompt_tokens, cache)
        seq.num_computed_tokens = n_prompt
        while True:
            event = seq.on_logits(logits)
            yield event
            if event.finish_reason is not None:
                return
            logits = self.model.forward([event.token_id], cache)
            seq.num_computed_tokens += 1

    def token_text(self, token_id: int) -> str:
        """One token's text as shown in logprobs (control tokens by name)."""
        return token_text(self.tokenizer, token_id)

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

    def prompt_logprobs(
        self, tokens: SequenceOf[int], top_n: int = 0, kv_dtype: str = "float32"
    ) -> list[PromptLogprob]:
        """Logprob of each prompt token under the model given the tokens before it, with the
        ``top_n`` most likely alternatives at that position (no bias, no penalties), the
        keys and values kept as ``kv_dtype`` (the server's batch keeps float16: scoring
        then reads what generation would). The first token has logprob ``None`` and no
        alternatives."""
        pieces = self.score_prompt(tokens, top_n, kv_dtype)
        while True:
            try:
                next(pieces)
            except StopIteration as done:
                result: list[PromptLogprob] = done.value
                return result

    def score_prompt(
        self, tokens: SequenceOf[int], top_n: int = 0, kv_dtype: str = "float32"
    ) -> Pieces[None, None, list[PromptLogprob]]:
        """:meth:`prompt_logprobs` in pieces: yields after each forward pass of
        ``PROMPT_LOGPROBS_CHUNK`` tokens and returns the list (the server's engine runs
        its batch between pieces: ``EngineLoop.call_in_steps``)."""
        validate_top_logprobs(top_n)
        if len(tokens) > self.context_length:
            raise ContextLengthError(len(tokens), self.context_length)
        if not tokens:
            return []
        out = [PromptLogprob(int(tokens[0]), None, [])]
        cache = self.model.new_cache(len(tokens), np.dtype(kv_dtype))
        for start in range(0, len(tokens), PROMPT_LOGPROBS_CHUNK):
            if start:
                yield
            chunk = list(tokens[start : start + PROMPT_LOGPROBS_CHUNK])
            logits = self.model.forward(chunk, cache, all_logits=True)  # [T, vocab]
            for row, target in zip(
                logits, tokens[start + 1 : start + 1 + len(chunk)], strict=False
            ):
                lp = log_softmax(row)
                top = [TopLogprob(t, self.token_text(t), v) for t, v in top_logprobs(lp, top_n)]
                out.append(PromptLogprob(int(target), float(lp[target]), top))
        return out
