"""Sampling as small pure functions over one logits vector ``[vocab]`` (float32).

The pipeline for one step (``Sampler.step``) is::

    adjusted = penalties(logit_bias(logits), recent tokens)     # the model's distribution
    logprobs = log_softmax(adjusted)                            # what logprobs report
    allowed  = constraint mask(adjusted)                        # -inf where the grammar says no
    temperature == 0  →  argmax(allowed)                        # greedy, ties → lowest id
    otherwise         →  temperature → top_k → top_p → min_p → draw with the request's RNG

Temperature is applied before the truncation filters (the order of vLLM and Hugging Face),
so ``top_p`` and ``min_p`` act on the distribution that is actually sampled from. Every
function returns a new array and never modifies its input.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bitserve.engine.constraint import TokenConstraint
from bitserve.engine.types import SamplingParams

MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values
MAX_TEMPERATURE = 2.0  # OpenAI's range
MAX_PRESENCE_FREQUENCY = 2.0  # OpenAI's range for presence/frequency penalties
SEED_MASK = (1 << 64) - 1  # any integer seed (negative too) maps onto numpy's uint64 seeds


class SamplingParamError(ValueError):
    """A request parameter is out of range. ``param`` is its API name (for a 400 reply)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


# ---- validation ---------------------------------------------------------------------------


def _check_range(param: str, value: float, lo: float, hi: float) -> None:
    if not (math.isfinite(value) and lo <= value <= hi):
        raise SamplingParamError(param, f"must be between {lo:g} and {hi:g}, got {value!r}")


def validate_params(params: SamplingParams, vocab_size: int | None = None) -> None:
    """Raise :class:`SamplingParamError` for the first out-of-range field.

    ``vocab_size`` (when known) bounds the token ids of ``logit_bias``.
    """
    _check_range("temperature", params.temperature, 0.0, MAX_TEMPERATURE)
    _check_range("top_p", params.top_p, 0.0, 1.0)
    _check_range("min_p", params.min_p, 0.0, 1.0)
    _check_range("presence_penalty", params.presence_penalty, -2.0, MAX_PRESENCE_FREQUENCY)
    _check_range("frequency_penalty", params.frequency_penalty, -2.0, MAX_PRESENCE_FREQUENCY)
    if not (math.isfinite(params.repetition_penalty) and params.repetition_penalty > 0):
        raise SamplingParamError(
            "repetition_penalty", f"must be a positive number, got {params.repetition_penalty!r}"
        )
    if isinstance(params.top_k, bool) or not isinstance(params.top_k, int):
        raise SamplingParamError("top_k", f"must be an integer, got {params.top_k!r}")
    if params.repetition_window < -1:
        raise SamplingParamError(
            "repetition_window", f"must be -1 (all tokens) or more, got {params.repetition_window}"
        )
    for token_id, bias in params.logit_bias.items():
        if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
            raise SamplingParamError("logit_bias", f"token id {token_id} is not in the vocabulary")
        _check_range("logit_bias", bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
    if params.seed is not None and (
        isinstance(params.seed, bool) or not isinstance(params.seed, int)
    ):
        raise SamplingParamError("seed", f"must be an integer, got {params.seed!r}")


def validate_top_logprobs(n: int) -> None:
    """``top_logprobs`` must be 0..20 (OpenAI's limit)."""
    if not 0 <= n <= MAX_TOP_LOGPROBS:
        raise SamplingParamError(
            "top_logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}, got {n}"
        )


def make_rng(seed: int | None) -> np.random.Generator:
    """The RNG of one request: seeded (reproducible) or from fresh OS entropy (``None``)."""
    return np.random.default_rng(None if seed is None else seed & SEED_MASK)


# ---- adjustments that define the model's distribution -------------------------------------


def apply_logit_bias(logits: np.ndarray, bias: dict[int, float]) -> np.ndarray:
    """``logits [vocab]`` + ``bias[token]`` for each biased token (OpenAI ``logit_bias``)."""
    out = np.array(logits, dtype=np.float32, copy=True)
    if bias:
        ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
        out[ids] += np.fromiter(bias.values(), dtype=np.float32, count=len(bias))
    return out


def recent_window(tokens: Sequence[int], window: int) -> Sequence[int]:
    """The last ``window`` tokens (``-1``: all of them, ``0``: none)."""
    if window < 0:
        return tokens
    return tokens[len(tokens) - window :] if window else ()


def apply_penalties(
    logits: np.ndarray,
    recent: Sequence[int],
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
) -> np.ndarray:
    """Penalise the tokens of ``recent`` (the context's last tokens, prompt included).

    - repetition (llama.cpp ``repeat_penalty``): a seen token's logit is divided by the
      penalty when positive and multiplied by it when negative;
    - presence (OpenAI): ``- presence_penalty`` once for every seen token;
    - frequency (OpenAI): ``- frequency_penalty * count`` of the token in ``recent``.
    """
    out = np.array(logits, dtype=np.float32, copy=True)
    if not recent or (
        repetition_penalty == 1.0 and presence_penalty == 0.0 and frequency_penalty == 0.0
    ):
        return out
    counts = Counter(recent)
    ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    n = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
    seen = out[ids]
    rp = np.float32(repetition_penalty)
    seen = np.where(seen > 0, seen / rp, seen * rp)
    seen = seen - np.float32(presence_penalty) - np.float32(frequency_penalty) * n
    out[ids] = seen
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """``log p`` of ``logits [..., vocab]`` in float32, computed stably (max subtracted,
    the normalising sum accumulated in float64)."""
    x = np.asarray(logits, dtype=np.float32)
    shifted = x - x.max(axis=-1, keepdims=True)
    total = np.exp(shifted).sum(axis=-1, keepdims=True, dtype=np.float64)
    out: np.ndarray = (shifted - np.log(total)).astype(np.float32)
    return out


def top_logprobs(logprobs: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The ``n`` most likely ``(token_id, logprob)`` of ``logprobs [vocab]``, most likely
    first; equal logprobs are ordered by token id."""
    if n <= 0:
        return []
    n = min(n, logprobs.shape[0])
    cand = np.argpartition(-logprobs, n - 1)[:n] if n < logprobs.shape[0] else np.arange(n)
    # widen ties at the cut so the order never depends on argpartition's choice
    cut = logprobs[cand].min()
    cand = np.flatnonzero(logprobs >= cut)
    order = np.lexsort((cand, -logprobs[cand]))[:n]
    return [(int(cand[i]), float(logprobs[cand[i]])) for i in order]


# ---- temperature and truncation -----------------------------------------------------------


def greedy(logits: np.ndarray) -> int:
    """The most likely token; ties go to the lowest id (``np.argmax`` takes the first)."""
    return int(np.argmax(logits))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``logits / temperature`` (``temperature > 0``; 0 means greedy and never gets here)."""
    if temperature <= 0:
        raise ValueError("temperature 0 is greedy decoding: call greedy()")
    out: np.ndarray = np.asarray(logits, dtype=np.float32) / np.float32(temperature)
    return out.astype(np.float32)


def sorted_candidates(logits: np.ndarray, k: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, values)`` of the finite logits, most likely first, ties by lower id.

    With ``0 < k < vocab`` only the ``k`` largest are kept (all ties at the k-th value
    too, so the set never depends on sort order). ``values`` is float64. This is the
    candidate list the truncation cuts work on: top-k costs one partition of the
    vocabulary, and the sort then touches only ``k`` entries.
    """
    x = np.asarray(logits, dtype=np.float32)
    n = x.shape[0]
    if 0 < k < n:
        kth = np.partition(x, n - k)[n - k]
        ids = np.flatnonzero(x >= kth)
    else:
        ids = np.flatnonzero(np.isfinite(x))
    order = np.argsort(-x[ids], kind="stable")  # ids ascending: stable keeps ties by id
    ids = ids[order]
    return ids, x[ids].astype(np.float64)


def logsumexp(values: np.ndarray) -> float:
    x = np.asarray(values, dtype=np.float64)
    m = float(x.max())
    return m + math.log(float(np.exp(x - m).sum()))


def top_p_keep(values: np.ndarray, top_p: float, log_norm: float | None = None) -> int:
    """How many of the sorted ``values`` the nucleus keeps: the shortest prefix whose
    probability reaches ``top_p`` (at least 1; ``top_p >= 1``: all).

    Probabilities are ``exp(values - log_norm)``; ``None`` normalises over ``values``
    themselves (top-p after top-k sees the renormalised top k). With the whole
    vocabulary's ``log_norm``, ``values`` may be just a prefix holding the nucleus.
    """
    if top_p >= 1.0:
        return int(values.shape[0])
    p = np.exp(values - (logsumexp(values) if log_norm is None else log_norm))
    before = np.cumsum(p) - p  # mass of the tokens strictly more likely than each one
    return max(1, int(np.count_nonzero(before < top_p)))


def min_p_keep(values: np.ndarray, min_p: float) -> int:
    """How many of the sorted ``values`` have probability ``>= min_p *`` the top one
    (``min_p <= 0``: all). On logits: ``log p_i - log p_max = l_i - l_max``."""
    if min_p <= 0.0:
        return int(values.shape[0])
    return int(np.count_nonzero(values >= values[0] + math.log(min_p)))


def _keep_only(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    out = np.full(np.shape(logits), -np.inf, dtype=np.float32)
    out[ids] = np.asarray(logits, dtype=np.float32)[ids]
    return out


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the ``k`` largest logits (``k <= 0``: all, ties at the cut kept), rest ``-inf``."""
    return _keep_only(logits, sorted_candidates(logits, k)[0])


def top_p_filter(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Nucleus filter over the whole vector (see :func:`top_p_keep`); the rest ``-inf``."""
    ids, values = sorted_candidates(logits)
    return _keep_only(logits, ids[: top_p_keep(values, top_p)])


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Min-p filter over the whole vector (see :func:`min_p_keep`); the rest ``-inf``."""
    ids, values = sorted_candidates(logits)
    return _keep_only(logits, ids[: min_p_keep(values, min_p)])


def draw_index(values: np.ndarray, rng: np.random.Generator) -> int:
    """Index drawn from ``softmax(values)`` with one ``rng.random()`` (inverse CDF).
    ``-inf`` entries have probability 0 and are never drawn."""
    x = np.asarray(values, dtype=np.float64)
    cdf = np.cumsum(np.exp(x - x.max()))
    u = rng.random() * cdf[-1]
    return int(min(np.searchsorted(cdf, u, side="right"), x.shape[0] - 1))


def sample_from(logits: np.ndarray, rng: np.random.Generator) -> int:
    """A token id drawn from ``softmax(logits)`` over the whole vector."""
    return draw_index(logits, rng)


def truncated_candidates(
    logits: np.ndarray, top_k: int, top_p: float, min_p: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, values)`` that survive top-k, then top-p on the renormalised rest, then
    min-p; most likely first. Equal to chaining the whole-vector filters, but without
    sorting the whole vocabulary when a prefix is known to hold the result."""
    x = np.asarray(logits, dtype=np.float32)
    if 0 < top_k < x.shape[0]:
        ids, values = sorted_candidates(x, top_k)
        log_norm = None  # renormalised over the top k
    else:
        ids, values, log_norm = _vocabulary_candidates(x, top_p, min_p)
    n = min(top_p_keep(values, top_p, log_norm), min_p_keep(values, min_p))
    return ids[:n], values[:n]


def sample_truncated(
    logits: np.ndarray, rng: np.random.Generator, top_k: int, top_p: float, min_p: float
) -> int:
    """Draw from what :func:`truncated_candidates` keeps."""
    if top_k <= 0 and top_p >= 1.0 and min_p <= 0.0:
        return sample_from(logits, rng)  # nothing to cut: no sort needed
    ids, values = truncated_candidates(logits, top_k, top_p, min_p)
    return int(ids[draw_index(values, rng)])


NUCLEUS_SEARCH = (256, 4096)  # prefix sizes tried before sorting the whole vocabulary


def _vocabulary_candidates(
    x: np.ndarray, top_p: float, min_p: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Without top-k: ``(ids, values, log_norm)``, a sorted prefix of the vocabulary that
    holds every token top-p and min-p can keep, and the log-normaliser of the whole.
    Sorting 128k logits costs ~15 ms a token; the prefix is usually far smaller."""
    log_norm = logsumexp(x)
    if min_p > 0.0:  # min-p survivors are few and bound the result on their own
        ids = np.flatnonzero(x >= float(x.max()) + math.log(min_p))
        ids = ids[np.argsort(-x[ids], kind="stable")]
        return ids, x[ids].astype(np.float64), log_norm
    for k in NUCLEUS_SEARCH:
        ids, values = sorted_candidates(x, k)
        # top_p 0 keeps one token, which any prefix holds (log(0) is undefined)
        if top_p <= 0.0 or logsumexp(values) - log_norm >= math.log(top_p):
            return ids, values, log_norm
    return (*sorted_candidates(x), log_norm)


# ---- one step -----------------------------------------------------------------------------


@dataclass(slots=True)
class SampleResult:
    token_id: int
    logprobs: np.ndarray | None  # [vocab] log_softmax of the adjusted logits, when asked


@dataclass(slots=True)
class Sampler:
    """The sampling state of one request: its params and its RNG.

    ``step(logits, context)`` picks the next token; ``context`` is every token so far
    (prompt and generated), of which the penalties see the last ``repetition_window``.
    Logprobs are those of the model's distribution after logit bias and penalties but
    before temperature and truncation (as llama.cpp's ``n_probs`` "post-penalty" and
    OpenAI report them), so they do not change with ``temperature`` or ``top_p``; a
    constraint's mask is a truncation too (the model's own distribution is reported).

    ``constraint`` (when the params carry one) is this request's position in its grammar:
    each step masks what the grammar forbids, then moves it on by the picked token.
    """

    params: SamplingParams
    rng: np.random.Generator
    constraint: TokenConstraint | None = None

    @classmethod
    def create(cls, params: SamplingParams, vocab_size: int | None = None) -> Sampler:
        validate_params(params, vocab_size)
        compiled = params.constraint
        if compiled is not None and vocab_size is not None and compiled.vocab_size != vocab_size:
            raise SamplingParamError("constraint", "was compiled for a different vocabulary")
        constraint = None if compiled is None else compiled.start()
        return cls(params, make_rng(params.seed), constraint)

    def adjust(self, logits: np.ndarray, context: Sequence[int]) -> np.ndarray:
        """Logit bias then penalties: the distribution that logprobs report."""
        p = self.params
        biased = apply_logit_bias(logits, p.logit_bias)
        recent = recent_window(context, p.repetition_window)
        return apply_penalties(
            biased, recent, p.repetition_penalty, p.presence_penalty, p.frequency_penalty
        )

    def pick(self, adjusted: np.ndarray) -> int:
        """Greedy at temperature 0 (no RNG use), else temperature → filters → draw."""
        p = self.params
        if p.temperature == 0:
            return greedy(adjusted)
        x = apply_temperature(adjusted, p.temperature)
        return sample_truncated(x, self.rng, p.top_k, p.top_p, p.min_p)

    def step(self, logits: np.ndarray, context: Sequence[int], want_logprobs: bool) -> SampleResult:
        adjusted = self.adjust(logits, context)
        if self.constraint is None:
            token = self.pick(adjusted)
        else:
            # picking among the allowed ids is picking from the masked vector (forbidden
            # tokens have probability 0; ids ascend, so ties still go to the lowest id and
            # the RNG draws the same token) without sorting ~128k -inf entries
            allowed = self.constraint.allowed_ids()
            token = int(allowed[self.pick(adjusted[allowed])])
            self.constraint.advance(token)
        return SampleResult(token, log_softmax(adjusted) if want_logprobs else None)
