"""Sampling fields shared by every generating route, and their conversion to the engine's
``SamplingParams`` (the one place JSON values become engine dataclasses).

Pydantic checks only types (a wrong type is a 422); ranges are checked here and by the
engine's ``validate_params`` and answered with 400 + ``param``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pydantic import Field

from bitserve.api.errors import InvalidParameterError
from bitserve.api.wire import RequestModel
from bitserve.engine.sampling import MAX_LOGIT_BIAS, SamplingParamError, validate_params
from bitserve.engine.types import SamplingParams

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_LLAMA_STOP_STRINGS = 128  # llama.cpp sets none; each is matched at every token
MAX_N = 8

THREADS_DOC = (
    "Accepted for compatibility with the BitNet API guide (which lists `threads`, default 4) "
    "and otherwise IGNORED: the server's CPU thread count is fixed when it starts "
    "(`bitserve serve --threads`, default: the machine's physical cores) and shared by every "
    "request. Must be an integer >= 1 when given."
)

# engine parameter names → the names clients send
_WIRE_NAMES = {"repetition_penalty": "repeat_penalty", "repetition_window": "repeat_last_n"}


class SamplingFields(RequestModel):
    """Fields every generating request accepts (OpenAI names plus llama.cpp extensions);
    ``null`` means the default (:class:`RequestModel`)."""

    temperature: float = Field(0.7, description="0-2; 0 is greedy.")
    top_p: float = Field(0.95, description="Nucleus sampling mass, 0-1 (1 disables).")
    top_k: int = Field(40, description="Keep the k most likely tokens (0 disables). Extension.")
    min_p: float = Field(
        0.0, description="Drop tokens below min_p times the top probability. Extension."
    )
    repeat_penalty: float = Field(
        1.0, description="llama.cpp repetition penalty (> 0, 1 disables). Extension."
    )
    repeat_last_n: int = Field(64, description="Tokens the penalties look back over (-1: all).")
    presence_penalty: float = Field(0.0, description="-2 to 2.")
    frequency_penalty: float = Field(0.0, description="-2 to 2.")
    logit_bias: dict[str, float | bool] | list[list[float | bool]] | None = Field(
        None,
        description="Token id (as a string) → bias added to its logit, -100 to 100; or "
        "llama.cpp's [[id, bias], ...]. A bias of false bans the token (as -100), true is "
        "no bias (as llama.cpp reads them).",
    )
    seed: int | None = Field(None, description="Makes sampling reproducible.")
    threads: int | None = Field(None, description=THREADS_DOC)


def parse_logit_bias(
    bias: dict[str, float | bool] | list[list[float | bool]] | None,
) -> dict[int, float]:
    """OpenAI's ``{"id": bias}`` or llama.cpp's ``[[id, bias], ...]`` as ``{id: bias}``;
    a bias of ``false`` bans the token (-100), ``true`` is none (llama.cpp's reading)."""
    pairs = list(bias.items()) if isinstance(bias, dict) else [tuple(p) for p in bias or []]
    out = {}
    for pair in pairs:
        try:
            key, value = pair
            token = int(key)
            if isinstance(key, bool) or (isinstance(key, float) and key != token):
                raise ValueError(key)
            if value is True:
                continue
            out[token] = -MAX_LOGIT_BIAS if value is False else float(value)
        except (TypeError, ValueError):
            raise InvalidParameterError(
                f"logit_bias: {pair!r} is not a (token id, bias) pair", param="logit_bias"
            ) from None
    return out


def to_sampling_params(
    fields: SamplingFields, vocab_size: int | None, seed: int | None = None
) -> SamplingParams:
    """``fields`` as engine ``SamplingParams`` (``seed`` overrides ``fields.seed``); 400 on
    out-of-range values, naming the field as the client spelled it (``vocab_size``: when
    known, bounds ``logit_bias``'s token ids)."""
    if fields.threads is not None and fields.threads < 1:
        raise InvalidParameterError(f"threads: must be >= 1, got {fields.threads}", "threads")
    params = SamplingParams(
        temperature=fields.temperature,
        top_k=fields.top_k,
        top_p=fields.top_p,
        min_p=fields.min_p,
        repetition_penalty=fields.repeat_penalty,
        repetition_window=fields.repeat_last_n,
        presence_penalty=fields.presence_penalty,
        frequency_penalty=fields.frequency_penalty,
        logit_bias=parse_logit_bias(fields.logit_bias),
        seed=fields.seed if seed is None else seed,
    )
    with wire_names():
        validate_params(params, vocab_size)
    return params


@contextmanager
def wire_names(renames: dict[str, str] | None = None) -> Iterator[None]:
    """Re-raise the engine's ``SamplingParamError`` as a 400 with the client's field names."""
    names = {**_WIRE_NAMES, **(renames or {})}
    try:
        yield
    except SamplingParamError as exc:
        param = names.get(exc.param, exc.param)
        raise InvalidParameterError(f"{param}: {exc.message}", param) from exc


def normalize_stop(
    stop: str | list[str] | None, param: str = "stop", limit: int = MAX_STOP_STRINGS
) -> list[str]:
    """``stop`` as a list of at most ``limit`` non-empty strings."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > limit:
        message = f"{param}: at most {limit} stop strings, got {len(stops)}"
        raise InvalidParameterError(message, param)
    if any(s == "" for s in stops):
        raise InvalidParameterError(f"{param}: stop strings must not be empty", param)
    return stops


def check_n(n: int) -> None:
    if not 1 <= n <= MAX_N:
        raise InvalidParameterError(f"n: must be between 1 and {MAX_N}, got {n}", "n")
