"""Wire types of the text-completion routes: llama.cpp's ``/completion``, ``/tokenize``,
``/detokenize`` and OpenAI's legacy ``/v1/completions``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import Field, StrictInt

from bitserve.api.chat.protocol import DEFAULT_MAX_TOKENS, StreamOptions
from bitserve.api.sampling import SamplingFields
from bitserve.api.wire import ForeignConstraintFields, RequestModel

# token ids are integers, never booleans or numeric strings coerced into them
TokenIds = list[StrictInt]


class LlamaCompletionRequest(SamplingFields):
    """Body of ``POST /completion`` (llama.cpp server names and defaults, except
    ``n_predict`` whose default is the guide's 100)."""

    prompt: str | TokenIds = Field(description="Text (BOS added) or token ids (used as-is).")
    n_predict: int = Field(
        DEFAULT_MAX_TOKENS, description="Tokens to generate; -1 = until the context is full."
    )
    seed: int | None = Field(None, description="-1 or absent: random.")
    stop: list[str] = Field(default_factory=list, description="Up to 128 stop strings.")
    stream: bool = Field(False, description="Stream llama.cpp's objects as SSE `data:` lines.")
    n_probs: int = Field(0, description="0-20: top alternatives per token in "
                         "`completion_probabilities`.")  # fmt: skip
    return_tokens: bool = Field(False, description="Include generated token ids in `tokens`.")
    cache_prompt: bool = Field(
        True, description="Accepted for compatibility; the prefix cache is always on."
    )
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence tokens.")
    json_schema: dict[str, Any] | None = Field(
        None, description="Constrain the output to JSON valid against this schema."
    )
    grammar: str | None = Field(
        None, description="Constrain the output to this GBNF grammar (llama.cpp's syntax)."
    )
    # llama.cpp's samplers that bitserve does not implement: only their "off" values
    # (LLAMA_SAMPLERS_OFF), since ignoring them would sample another way than asked
    mirostat: int = Field(0, description="0 (off) only: Mirostat is not implemented.")
    typical_p: float = Field(1.0, description="1 or more (off) only: locally typical "
                             "sampling is not implemented.")  # fmt: skip
    dynatemp_range: float = Field(0.0, description="0 or less (off) only: dynamic "
                                  "temperature is not implemented.")  # fmt: skip
    xtc_probability: float = Field(0.0, description="0 or less (off) only: XTC is not "
                                   "implemented.")  # fmt: skip
    dry_multiplier: float = Field(0.0, description="0 (off) only: DRY is not implemented.")
    top_n_sigma: float = Field(-1.0, description="0 or less (off) only: top-n-sigma is not "
                               "implemented.")  # fmt: skip


# each unimplemented sampler's test of being off (llama.cpp: top-n-sigma is off at <= 0)
LLAMA_SAMPLERS_OFF: dict[str, Callable[[float], bool]] = {
    "mirostat": lambda v: v == 0,
    "typical_p": lambda v: v >= 1,
    "dynatemp_range": lambda v: v <= 0,
    "xtc_probability": lambda v: v <= 0,
    "dry_multiplier": lambda v: v == 0,
    "top_n_sigma": lambda v: v <= 0,
}


class CompletionRequest(SamplingFields, ForeignConstraintFields):
    """Body of ``POST /v1/completions`` (OpenAI legacy completions)."""

    model: str
    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(
        description="Text, token ids, or a batch of either (one choice set per prompt)."
    )
    max_tokens: int = Field(
        DEFAULT_MAX_TOKENS, description="0 with echo + logprobs scores the prompt only."
    )
    n: int = Field(1, description="Choices per prompt (1-8).")
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, description="0-20 alternatives per token (null: none).")
    echo: bool = Field(False, description="Prepend the prompt (and its logprobs) to the text.")
    suffix: str | None = Field(None, description="Not supported (must be null).")
    best_of: int | None = Field(None, description="Only null or equal to n is supported.")
    response_format: Any = Field(None, description="Not taken here (a 400): see /completion.")
    tools: Any = Field(None, description="Not taken here (a 400): see /v1/chat/completions.")
    user: str | None = None


class TokenizeRequest(RequestModel):
    content: str
    add_special: bool = Field(False, description="Prepend BOS as the model expects.")
    with_pieces: bool = Field(False, description="Return {id, piece} objects.")


class DetokenizeRequest(RequestModel):
    tokens: TokenIds
