"""What the engine sees: plain dataclasses, no JSON, no HTTP (STYLE.md: converted at seams)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bitserve.engine.constraint import CompiledConstraint


@dataclass(slots=True)
class SamplingParams:
    """How to pick each next token. ``temperature == 0`` means greedy.

    Defaults are the API guide's (temperature 0.7, top_p 0.95, top_k 40); penalties off.
    ``top_k <= 0`` and ``top_p >= 1`` and ``min_p <= 0`` disable those filters.
    ``constraint`` (structured output, tool calls): only tokens that keep the output a
    valid prefix of its grammar may be picked.
    """

    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # llama.cpp repeat_penalty: divides positive logits
    repetition_window: int = 64  # how many recent tokens the penalties look at (-1: all)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    constraint: CompiledConstraint | None = None


@dataclass(slots=True)
class GenerationRequest:
    """One generation: the full prompt as token ids and when to stop."""

    prompt_tokens: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 100
    stop: list[str] = field(default_factory=list)  # stop strings (not included in output)
    stop_until: str = ""  # stop strings apply only before this text (a tool call's tag)
    stop_token_ids: set[int] = field(default_factory=set)  # EOS/EOT etc. (added by the engine)
    ignore_eos: bool = False
    logprobs: bool = False  # report the chosen token's logprob
    top_logprobs: int = 0  # and this many alternatives (0-20)
    echo_logprobs: bool = False  # also logprobs of the prompt tokens (/v1/completions echo)
    # who may reuse this request's KV through the prefix cache: requests of the same
    # scope only (the API sets the caller's key fingerprint; "" without keys)
    cache_scope: str = ""


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token_id: int
    text: str
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token, as the client should see it.

    ``text`` is the new text this token completes (possibly "" while a UTF-8 character or a
    possible stop string is held back). ``finish_reason`` is set on the last event:
    "stop" (EOS/EOT, a stop string, or a constraint's grammar complete), "length"
    (max_tokens or context full), "cancelled". ``stop_string`` (last event only) is the
    stop string that cut the text, which then ends before it: the generated tokens say
    more than the text.
    """

    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: tuple[TopLogprob, ...] = ()
    finish_reason: str | None = None
    stop_string: str | None = None


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """The whole of one finished generation."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    events: list[TokenEvent] = field(default_factory=list)
