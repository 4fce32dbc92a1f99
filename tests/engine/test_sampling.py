"""Sampling functions on hand-built logits: each filter, each penalty, greedy, seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bitserve.engine.sampling import (
    Sampler,
    SamplingParamError,
    apply_logit_bias,
    apply_penalties,
    apply_temperature,
    greedy,
    log_softmax,
    make_rng,
    min_p_filter,
    recent_window,
    sample_from,
    top_k_filter,
    top_logprobs,
    top_p_filter,
    truncated_candidates,
    validate_params,
    validate_top_logprobs,
)
from bitserve.engine.types import SamplingParams


def logits_of(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def kept(x: np.ndarray) -> list[int]:
    return np.flatnonzero(np.isfinite(x)).tolist()


def draw(
    params: SamplingParams, logits: np.ndarray, n: int, context: list[int] | None = None
) -> list[int]:
    sampler = Sampler.create(params)
    return [sampler.step(logits, context or [], want_logprobs=False).token_id for _ in range(n)]


# ---- greedy and temperature ---------------------------------------------------------------


def test_greedy_picks_max_and_breaks_ties_by_lowest_id() -> None:
    assert greedy(logits_of(0.0, 3.0, 1.0)) == 1
    assert greedy(logits_of(0.0, 5.0, 2.0, 5.0, 5.0)) == 1


def test_temperature_zero_is_greedy_and_does_not_touch_the_rng() -> None:
    sampler = Sampler.create(SamplingParams(temperature=0.0, seed=7))
    state = sampler.rng.bit_generator.state
    tokens = {sampler.step(logits_of(1.0, 2.0, 2.0, 0.5), [], False).token_id for _ in range(5)}
    assert tokens == {1}
    assert sampler.rng.bit_generator.state == state


def test_temperature_scales_logits() -> None:
    np.testing.assert_allclose(apply_temperature(logits_of(1.0, -2.0, 4.0), 0.5), [2.0, -4.0, 8.0])
    with pytest.raises(ValueError):
        apply_temperature(logits_of(1.0), 0.0)


def test_low_temperature_concentrates_and_high_temperature_spreads() -> None:
    logits = logits_of(2.0, 1.0, 0.0, -1.0)
    base = dict(top_k=0, top_p=1.0, seed=3)
    cold = draw(SamplingParams(temperature=0.05, **base), logits, 200)  # type: ignore[arg-type]
    hot = draw(SamplingParams(temperature=2.0, **base), logits, 400)  # type: ignore[arg-type]
    assert set(cold) == {0}
    assert set(hot) == {0, 1, 2, 3}


# ---- seeds ----------------------------------------------------------------------------------


def test_same_seed_same_tokens_different_seeds_differ_on_flat_distribution() -> None:
    flat = np.zeros(1000, dtype=np.float32)
    params = dict(temperature=1.0, top_k=0, top_p=1.0)
    a = draw(SamplingParams(seed=42, **params), flat, 50)  # type: ignore[arg-type]
    b = draw(SamplingParams(seed=42, **params), flat, 50)  # type: ignore[arg-type]
    c = draw(SamplingParams(seed=43, **params), flat, 50)  # type: ignore[arg-type]
    assert a == b
    assert a != c
    assert len(set(a)) > 30  # a flat distribution really is sampled across the vocabulary


def test_no_seed_gives_fresh_entropy() -> None:
    flat = np.zeros(1000, dtype=np.float32)
    params = dict(temperature=1.0, top_k=0, top_p=1.0)
    runs = {tuple(draw(SamplingParams(**params), flat, 20)) for _ in range(3)}  # type: ignore[arg-type]
    assert len(runs) == 3


def test_negative_and_huge_seeds_are_accepted_and_reproducible() -> None:
    for seed in (-1, 2**70):
        assert make_rng(seed).random() == make_rng(seed).random()


def test_sample_from_follows_the_distribution() -> None:
    rng = np.random.default_rng(0)
    logits = np.log(np.array([0.7, 0.2, 0.1, 1e-12], dtype=np.float64)).astype(np.float32)
    counts = np.bincount([sample_from(logits, rng) for _ in range(4000)], minlength=4)
    np.testing.assert_allclose(counts / 4000, [0.7, 0.2, 0.1, 0.0], atol=0.03)


def test_sample_from_never_picks_a_filtered_token() -> None:
    rng = np.random.default_rng(1)
    logits = logits_of(-np.inf, 0.0, -np.inf, 0.0, -np.inf)
    assert {sample_from(logits, rng) for _ in range(300)} == {1, 3}


# ---- truncation filters ---------------------------------------------------------------------


def test_top_k_keeps_k_largest() -> None:
    x = logits_of(0.1, 3.0, -1.0, 2.0, 2.5)
    assert kept(top_k_filter(x, 2)) == [1, 4]
    assert kept(top_k_filter(x, 0)) == [0, 1, 2, 3, 4]
    assert kept(top_k_filter(x, 10)) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(x, logits_of(0.1, 3.0, -1.0, 2.0, 2.5))  # input untouched


def test_top_k_keeps_all_ties_at_the_cut() -> None:
    assert kept(top_k_filter(logits_of(1.0, 2.0, 2.0, 0.0), 2)) == [1, 2]
    assert kept(top_k_filter(logits_of(1.0, 3.0, 2.0, 2.0), 2)) == [1, 2, 3]


def test_top_p_keeps_smallest_prefix_reaching_p() -> None:
    x = np.log(np.array([0.1, 0.5, 0.3, 0.1])).astype(np.float32)
    assert kept(top_p_filter(x, 0.5)) == [1]
    assert kept(top_p_filter(x, 0.6)) == [1, 2]
    assert kept(top_p_filter(x, 0.75)) == [1, 2]
    assert kept(top_p_filter(x, 0.85)) == [0, 1, 2]  # of the two 0.1s, the lower id comes first
    assert kept(top_p_filter(x, 0.95)) == [0, 1, 2, 3]
    assert kept(top_p_filter(x, 0.0)) == [1]  # at least one token survives
    assert kept(top_p_filter(x, 1.0)) == [0, 1, 2, 3]


def test_min_p_is_relative_to_the_top_probability() -> None:
    x = np.log(np.array([0.5, 0.3, 0.15, 0.05])).astype(np.float32)
    assert kept(min_p_filter(x, 0.2)) == [0, 1, 2]  # threshold 0.1
    assert kept(min_p_filter(x, 0.5)) == [0, 1]  # threshold 0.25
    assert kept(min_p_filter(x, 1.0)) == [0]
    assert kept(min_p_filter(x, 0.0)) == [0, 1, 2, 3]


def test_filters_restrict_what_the_sampler_draws() -> None:
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1])).astype(np.float32)
    off = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 0}
    for cut, expected in (
        ({"top_k": 2}, {0, 1}),
        ({"top_p": 0.65}, {0, 1}),
        ({"min_p": 0.45}, {0, 1, 2}),  # keeps p >= 0.18
        ({"top_k": 3, "top_p": 0.42}, {0}),  # top-p sees the top 3 renormalised: 0.4 → 0.44
        ({"top_p": 0.0}, {0}),  # the most likely token alone (was log(0): a 500)
        ({}, {0, 1, 2, 3}),
    ):
        params = SamplingParams(**{**off, **cut})  # type: ignore[arg-type]
        assert set(draw(params, logits, 300)) == expected, cut


# ---- bias and penalties --------------------------------------------------------------------


def test_logit_bias_adds_and_can_force_or_ban() -> None:
    x = logits_of(1.0, 2.0, 3.0)
    np.testing.assert_allclose(apply_logit_bias(x, {0: 0.5, 2: -1.0}), [1.5, 2.0, 2.0])
    assert draw(SamplingParams(temperature=1.0, logit_bias={0: 100.0}, seed=1), x, 20) == [0] * 20
    banned = draw(SamplingParams(temperature=1.0, logit_bias={2: -100.0}, seed=1), x, 100)
    assert 2 not in banned


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    x = logits_of(2.0, -2.0, 4.0, 1.0)
    out = apply_penalties(x, [0, 1, 0], repetition_penalty=2.0)
    np.testing.assert_allclose(out, [1.0, -4.0, 4.0, 1.0])  # count does not matter


def test_presence_is_flat_and_frequency_scales_with_count() -> None:
    x = logits_of(1.0, 1.0, 1.0)
    out = apply_penalties(x, [0, 0, 0, 1], presence_penalty=0.5, frequency_penalty=0.25)
    np.testing.assert_allclose(out, [1.0 - 0.5 - 0.75, 1.0 - 0.5 - 0.25, 1.0])


def test_penalty_window_only_sees_recent_tokens() -> None:
    assert list(recent_window([1, 2, 3, 4], 2)) == [3, 4]
    assert list(recent_window([1, 2, 3, 4], -1)) == [1, 2, 3, 4]
    assert list(recent_window([1, 2, 3, 4], 0)) == []
    sampler = Sampler.create(
        SamplingParams(temperature=0.0, repetition_penalty=4.0, repetition_window=2)
    )
    x = logits_of(3.0, 2.0, 1.0)
    assert sampler.step(x, [0, 2, 2], False).token_id == 0  # 0 is outside the window
    assert sampler.step(x, [2, 0], False).token_id == 1  # 0 inside: 3/4 < 2


def test_greedy_applies_bias_and_penalties() -> None:
    params = SamplingParams(temperature=0.0, frequency_penalty=1.0, repetition_window=-1)
    sampler = Sampler.create(params)
    assert sampler.step(logits_of(2.5, 2.0), [0], False).token_id == 1


# ---- logprobs -------------------------------------------------------------------------------


def test_log_softmax_normalises_and_is_stable() -> None:
    lp = log_softmax(logits_of(1000.0, 999.0, -1000.0))
    assert np.isfinite(lp).all()
    assert math.isclose(float(np.exp(lp.astype(np.float64)).sum()), 1.0, rel_tol=1e-6)
    assert math.isclose(float(lp[0] - lp[1]), 1.0, rel_tol=1e-6)


def test_top_logprobs_are_sorted_with_ties_by_id() -> None:
    lp = log_softmax(logits_of(0.0, 2.0, 1.0, 2.0, -1.0))
    top = top_logprobs(lp, 3)
    assert [t for t, _ in top] == [1, 3, 2]
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    assert top_logprobs(lp, 0) == []
    assert len(top_logprobs(lp, 20)) == 5


def test_reported_logprobs_ignore_temperature_and_truncation_but_see_bias() -> None:
    x = logits_of(1.0, 2.0, 3.0, 0.5)
    results = []
    for params in (
        SamplingParams(temperature=0.3, top_k=1, seed=0),
        SamplingParams(temperature=1.7, top_p=0.5, seed=0),
    ):
        res = Sampler.create(params).step(x, [], want_logprobs=True)
        assert res.logprobs is not None
        results.append(res.logprobs)
    np.testing.assert_array_equal(results[0], results[1])
    biased = Sampler.create(SamplingParams(logit_bias={0: 5.0})).step(x, [], True).logprobs
    assert biased is not None
    np.testing.assert_allclose(biased, log_softmax(logits_of(6.0, 2.0, 3.0, 0.5)), rtol=1e-6)


# ---- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", 2.5),
        ("temperature", float("nan")),
        ("top_p", 1.5),
        ("top_p", -0.1),
        ("min_p", 1.1),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("top_k", 1.5),
        ("repetition_window", -2),
        ("seed", "abc"),
    ],
)
def test_out_of_range_params_name_the_param(field: str, value: object) -> None:
    params = SamplingParams()
    setattr(params, field, value)
    with pytest.raises(SamplingParamError) as info:
        validate_params(params)
    assert info.value.param == field


def test_logit_bias_validation() -> None:
    validate_params(SamplingParams(logit_bias={3: 100.0}), vocab_size=4)
    for bias in ({4: 1.0}, {-1: 1.0}, {0: 101.0}):
        with pytest.raises(SamplingParamError) as info:
            validate_params(SamplingParams(logit_bias=bias), vocab_size=4)
        assert info.value.param == "logit_bias"


def test_top_logprobs_limit() -> None:
    validate_top_logprobs(20)
    with pytest.raises(SamplingParamError, match="top_logprobs"):
        validate_top_logprobs(21)


@pytest.mark.parametrize("top_k", [0, 50])
@pytest.mark.parametrize("top_p", [1.0, 0.3, 0.9, 0.999])
@pytest.mark.parametrize("min_p", [0.0, 0.01, 0.3])
def test_fast_truncation_equals_the_whole_vector_filter_chain(
    top_k: int, top_p: float, min_p: float
) -> None:
    rng = np.random.default_rng(top_k + int(top_p * 1000) + int(min_p * 100))
    for scale in (0.5, 3.0, 8.0):  # flat to peaked: nucleus from thousands of tokens to a few
        logits = (rng.standard_normal(20000) * scale).astype(np.float32)
        reference = min_p_filter(top_p_filter(top_k_filter(logits, top_k), top_p), min_p)
        ids, values = truncated_candidates(logits, top_k, top_p, min_p)
        assert sorted(ids.tolist()) == kept(reference)
        assert (np.diff(values) <= 0).all()
