"""``Sequence``: the state of one request between forward passes.

Everything a generation keeps from token to token lives here, so that one loop
(``Generator``, the CLI path) or a scheduler stepping many sequences at once (the server)
can drive it the same way: feed it the logits of its last computed token with
:meth:`Sequence.on_logits` and get the next :class:`TokenEvent`.

Token bookkeeping (nano-vllm's): ``tokens`` is the prompt followed by every sampled token;
``num_computed_tokens`` of them have keys/values in the sequence's cache (of which
``num_cached_tokens`` came from the prefix cache instead of a forward pass). The tokens
still to run are ``tokens[num_computed_tokens:]``: the rest of the prompt while prefilling,
then exactly one (the last sampled) while decoding.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from bitserve.engine.sampling import Sampler, top_logprobs
from bitserve.engine.types import GenerationRequest, TokenEvent, TopLogprob
from bitserve.tokenizer import IncrementalDetokenizer

if TYPE_CHECKING:
    from bitserve.model.kv_cache import KVCache
    from bitserve.tokenizer import Tokenizer


class ModelOutputError(RuntimeError):
    """The model's logits for a sequence are not finite (NaN or inf): whatever the cause
    (corrupt weights, an overflow), no token can be sampled from them honestly."""


@dataclass(slots=True)
class StopStringMatcher:
    """Cuts generated text at the first stop string, holding back possible beginnings.

    Invariant: ``held`` is the longest suffix of the text fed so far that is a proper
    prefix of some stop string (or of ``until``); everything before it has been returned
    by :meth:`feed`. Hence no stop string can begin inside text already returned.

    ``until``: stop strings apply only to the text before it (a tool call's opening tag:
    a stop string must not cut a call's JSON); from it on, everything passes.
    """

    stops: SequenceOf[str]
    until: str = ""
    held: str = ""
    passing: bool = False  # ``until`` has come
    _stops: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self._stops = [s for s in self.stops if s]

    def feed(self, text: str) -> tuple[str, str | None]:
        """``(text safe to emit, the stop string found or None)``; once one is found, the
        rest must be discarded. The earliest in the text wins (ties: the first listed)."""
        if self.passing:
            return text, None
        buf = self.held + text
        mark = buf.find(self.until) if self.until else -1
        # where ``until`` begins, or may still begin: stop strings count only before it
        limit = mark if mark >= 0 else len(buf) - _longest_partial(buf, [self.until])
        hits = [(i, s) for s in self._stops if 0 <= (i := buf.find(s)) < limit]
        if hits:
            self.held = ""
            index, stop = min(hits, key=lambda hit: hit[0])
            return buf[:index], stop
        if mark >= 0:
            self.held, self.passing = "", True
            return buf, None
        keep = max(_longest_partial(buf, self._stops), len(buf) - limit)
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], None

    def flush(self) -> str:
        """Generation ended without a stop string: release the held text."""
        text, self.held = self.held, ""
        return text


def _longest_partial(buf: str, strings: SequenceOf[str]) -> int:
    """The length of the longest suffix of ``buf`` that is a proper prefix of one of
    ``strings``."""
    best = 0
    for string in strings:
        for k in range(min(len(string) - 1, len(buf)), best, -1):
            if buf.endswith(string[:k]):
                best = k
                break
    return best


@dataclass(slots=True)
class TextState:
    """Bytes → text → stop-string cut for one generation."""

    detok: IncrementalDetokenizer
    stops: StopStringMatcher

    def push(self, token_id: int) -> tuple[str, str | None]:
        """The token's text to show, and the stop string that ended the text (or None)."""
        return self.stops.feed(self.detok.push(token_id))

    def finish(self) -> tuple[str, str | None]:
        """Generation ends here: flush partial characters and held text."""
        text, stop = self.stops.feed(self.detok.flush())
        return (text, stop) if stop is not None else (text + self.stops.flush(), None)


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """One token's text as shown in logprobs (control tokens by name)."""
    return tokenizer.decode([token_id], skip_special=False)


@dataclass(slots=True, eq=False)
class Sequence:
    """One request being generated. Build it with :meth:`create` (the request must have
    been validated: ``Generator.check_request``)."""

    request: GenerationRequest
    sampler: Sampler
    tokenizer: Tokenizer
    context_length: int
    cancel: threading.Event | None = None
    tokens: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_generated: int = 0
    finish_reason: str | None = None
    cache: KVCache | None = None  # owned by whoever runs the forward passes
    text: TextState = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = list(self.request.prompt_tokens)
        stops = StopStringMatcher(self.request.stop, self.request.stop_until)
        self.text = TextState(IncrementalDetokenizer(self.tokenizer), stops)

    @classmethod
    def create(
        cls,
        req: GenerationRequest,
        sampler: Sampler,
        tokenizer: Tokenizer,
        context_length: int,
        cancel: threading.Event | None = None,
    ) -> Sequence:
        return cls(req, sampler, tokenizer, context_length, cancel)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_tokens)

    @property
    def num_pending_tokens(self) -> int:
        """Tokens still to run through the model before the next logits."""
        return len(self.tokens) - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """True while prompt tokens remain to be computed."""
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def on_logits(self, logits: np.ndarray) -> TokenEvent:
        """Sample the next token from the logits ``[vocab]`` of the last token of
        ``tokens`` (all of them computed) and return its event; the last event of the
        sequence carries ``finish_reason`` (also stored on ``self``)."""
        if self.num_pending_tokens != 0:
            raise RuntimeError(f"{self.num_pending_tokens} tokens are not computed yet")
        if not np.isfinite(logits).all():  # argmax would pick a NaN; sampling would raise
            raise ModelOutputError(
                f"the model produced non-finite logits (NaN or inf) after {len(self.tokens)} tokens"
            )
        want_logprobs = self.request.logprobs or self.request.top_logprobs > 0
        step = self.sampler.step(logits, self.tokens, want_logprobs)
        self.tokens.append(step.token_id)
        self.num_generated += 1
        event = self._event(step.token_id, step.logprobs)
        self.finish_reason = event.finish_reason
        return event

    def _event(self, token_id: int, logprobs: np.ndarray | None) -> TokenEvent:
        finish = self._finish_reason(token_id)
        if finish == "stop" and token_id in self.request.stop_token_ids:
            # a stop token: its own text is never shown
            piece, stop_string = self.text.finish()
        else:
            piece, stop_string = self.text.push(token_id)
            if stop_string is not None:
                finish = "stop"
            elif finish is not None:
                tail, stop_string = self.text.finish()
                piece += tail
                finish = "stop" if stop_string is not None else finish
        lp, tops = self._logprobs(token_id, logprobs)
        return TokenEvent(token_id, piece, lp, tops, finish, stop_string)

    def _finish_reason(self, token_id: int) -> str | None:
        req = self.request
        if token_id in req.stop_token_ids and not req.ignore_eos:
            return "stop"
        constraint = self.sampler.constraint
        if constraint is not None and constraint.is_finished:
            return "stop"  # the grammar is complete: nothing but a stop token could follow
        if (
            self.num_generated >= req.max_tokens
            or self.num_prompt_tokens + self.num_generated >= self.context_length
        ):
            return "length"
        if self.cancelled:
            return "cancelled"
        return None

    def _logprobs(
        self, token_id: int, logprobs: np.ndarray | None
    ) -> tuple[float | None, tuple[TopLogprob, ...]]:
        if logprobs is None:
            return None, ()
        tops = tuple(
            TopLogprob(tid, token_text(self.tokenizer, tid), lp)
            for tid, lp in top_logprobs(logprobs, self.request.top_logprobs)
        )
        return float(logprobs[token_id]), tops
