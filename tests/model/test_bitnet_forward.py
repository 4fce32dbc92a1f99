"""BitNetModel.forward through the KV cache: incremental decoding equals one full pass,
truncation, context-full errors, input checks; and the small numeric pieces (RoPE,
RMSNorm, activations) against their definitions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bitserve.kernels.reference import rmsnorm, rope_neox
from bitserve.model import BitNetModel, ContextFullError
from bitserve.model.bitnet import relu_squared, rope_tables, silu

# incremental and full passes differ only by float32 summation order in attention/head
INCREMENTAL_REL_L2 = 1e-5


@pytest.fixture(params=["model_gqa4", "model_gqa2"])
def model(request: pytest.FixtureRequest) -> Iterator[BitNetModel]:
    path: Path = request.getfixturevalue(request.param)
    with BitNetModel.load(path, backend="numpy") as m:
        yield m


def tokens_for(model: BitNetModel, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, model.config.vocab_size, n)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def assert_same_logits(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert rel_l2(a, b) <= INCREMENTAL_REL_L2
    np.testing.assert_array_equal(a.argmax(axis=-1), b.argmax(axis=-1))


def test_incremental_decoding_equals_one_full_pass(model: BitNetModel) -> None:
    tokens = tokens_for(model, 32)
    full = model.forward(tokens, model.new_cache(), all_logits=True)  # [32, vocab]
    cache = model.new_cache()
    steps = [model.forward(tokens[:8], cache, all_logits=True)]
    steps += [model.forward(tokens[t : t + 1], cache, all_logits=True) for t in range(8, 32)]
    assert cache.length == 32
    assert_same_logits(np.concatenate(steps), full)


def test_chunked_prefill_and_last_logits(model: BitNetModel) -> None:
    tokens = tokens_for(model, 32, seed=1)
    full = model.forward(tokens, model.new_cache(), all_logits=True)
    cache = model.new_cache()
    last = [model.forward(chunk, cache) for chunk in (tokens[:5], tokens[5:17], tokens[17:])]
    assert last[-1].shape == (model.config.vocab_size,) and last[-1].dtype == np.float32
    assert_same_logits(np.stack(last), full[[4, 16, 31]])


def test_truncate_then_continue_equals_a_fresh_pass(model: BitNetModel) -> None:
    first, second = tokens_for(model, 20, seed=2), tokens_for(model, 20, seed=3)
    cache = model.new_cache()
    model.forward(first, cache)
    cache.truncate(12)  # keep the shared prefix, drop the rest
    resumed = model.forward(second[12:], cache, all_logits=True)
    expected = model.forward(np.concatenate([first[:12], second[12:]]), model.new_cache(), True)
    assert_same_logits(resumed, expected[12:])


def test_context_full_leaves_the_cache_usable(model: BitNetModel) -> None:
    tokens = tokens_for(model, 10, seed=4)
    cache = model.new_cache(max_seq=10)
    model.forward(tokens[:8], cache)
    with pytest.raises(ContextFullError, match="context full"):
        model.forward(tokens_for(model, 3), cache)
    assert cache.length == 8
    last = model.forward(tokens[8:], cache)
    assert_same_logits(last, model.forward(tokens, model.new_cache()))


def test_default_cache_spans_the_context(model: BitNetModel) -> None:
    assert model.new_cache().max_seq == model.config.context_length
    with pytest.raises(ValueError, match="context length"):
        model.new_cache(max_seq=model.config.context_length + 1)


@pytest.mark.parametrize(
    "bad", [[], [[1, 2]], [-1], "vocab", [0.5]], ids=["empty", "2d", "negative", "vocab", "float"]
)
def test_bad_tokens_are_rejected(model: BitNetModel, bad: object) -> None:
    tokens = [model.config.vocab_size] if bad == "vocab" else bad
    cache = model.new_cache()
    with pytest.raises(ValueError):
        model.forward(tokens, cache)  # type: ignore[arg-type]
    assert cache.length == 0


def test_a_cache_of_another_shape_is_rejected(model_gqa4: Path, model_gqa2: Path) -> None:
    with (
        BitNetModel.load(model_gqa4) as a,
        BitNetModel.load(model_gqa2) as b,
        pytest.raises(ValueError, match="does not fit"),
    ):
        a.forward([1, 2], b.new_cache())


def test_unknown_backend_name_is_an_error(model_gqa2: Path) -> None:
    with pytest.raises(ValueError, match="unknown or unavailable kernel"):
        BitNetModel.load(model_gqa2, backend="no-such-kernel")


# ---- numeric pieces ---------------------------------------------------------------------------


def test_rope_is_a_rotation_by_relative_position() -> None:
    head_dim, theta = 64, 500000.0
    cos, sin = rope_tables(40, head_dim, theta)
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 1, 1, head_dim)).astype(np.float32)

    def at(x: np.ndarray, pos: int) -> np.ndarray:
        return rope_neox(x, cos[pos : pos + 1], sin[pos : pos + 1]).astype(np.float64)

    np.testing.assert_array_equal(at(q, 0), q)  # position 0: identity
    np.testing.assert_allclose(np.linalg.norm(at(q, 17)), np.linalg.norm(q), rtol=1e-5)
    # q(m)·k(n) depends only on m - n
    np.testing.assert_allclose(np.sum(at(q, 30) * at(k, 25)), np.sum(at(q, 5) * at(k, 0)), 1e-4)
    # pair (0, D/2) turns by exactly pos radians (theta^0 = 1); pair (1, 1+D/2) more slowly
    unit = np.zeros((1, 1, head_dim), np.float32)
    unit[..., 0] = 1
    rotated = at(unit, 3)[0, 0]
    np.testing.assert_allclose(rotated[[0, head_dim // 2]], [np.cos(3), np.sin(3)], atol=1e-6)
    assert np.count_nonzero(np.abs(rotated) > 1e-6) == 2


def test_rmsnorm_gives_unit_rms_times_weight() -> None:
    x = np.random.default_rng(1).standard_normal((3, 96)).astype(np.float32) * 50
    w = np.linspace(0.5, 2, 96, dtype=np.float32)
    out = rmsnorm(x, w, 1e-5)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.sqrt(np.mean((out / w) ** 2, axis=-1)), 1.0, rtol=1e-5)


def test_activations() -> None:
    x = np.array([-1e4, -3.0, -0.5, 0.0, 0.5, 3.0, 1e4], dtype=np.float32)
    np.testing.assert_array_equal(relu_squared(x), np.where(x > 0, x * x, 0))
    x64 = x.astype(np.float64)
    expected = x64 * np.exp(-np.logaddexp(0, -x64))  # x · sigmoid(x), stably
    np.testing.assert_allclose(silu(x), expected, rtol=1e-6, atol=1e-30)  # no overflow warning
