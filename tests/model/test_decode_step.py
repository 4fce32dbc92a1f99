"""The native decode step (kernels/decode.py, csrc/decode.c): one token of one sequence
through every block in one call gives the Python forward's bits, logits and KV cache, on
every family's fixture, every native kernel path and both cache dtypes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from bitserve.gguf.constants import GGMLType
from bitserve.kernels import NativeBackend, NumpyBackend, available_kernels
from bitserve.kernels.decode import DecodePlan, DecodeShape
from bitserve.model import BitNetModel
from bitserve.model.bitnet import BatchItem, decode_layer
from bitserve.model.fixtures import FAMILIES, write_family_fixture

CASES = [(family, t) for family, spec in FAMILIES.items() for t in spec.ternary_types]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, GGMLType], Path]:
    folder = tmp_path_factory.mktemp("decode")
    return {
        (family, t): write_family_fixture(folder / f"{family}-{t.name}.gguf", family, t, seed=9)
        for family, t in CASES
    }


def generate(model: BitNetModel, dtype: type, steps: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """A prompt, then ``steps`` greedy tokens one at a time: their logits and the cache."""
    cache = model.new_cache(dtype=dtype)
    logits = model.forward([3, 1, 4, 1, 5, 9], cache)
    out = []
    for _ in range(steps):
        logits = model.forward([int(np.argmax(logits))], cache)
        out.append(logits)
    n = cache.length
    return np.stack(out), np.concatenate([cache.k[:, :n].ravel(), cache.v[:, :n].ravel()])


@pytest.mark.parametrize("kernel", available_kernels())
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1].name}")
def test_the_decode_step_is_the_python_forward_bit_for_bit(
    case: tuple[str, GGMLType], kernel: str, fixtures: dict[tuple[str, GGMLType], Path]
) -> None:
    for dtype in (np.float32, np.float16):
        with BitNetModel.load(fixtures[case], backend=NativeBackend(kernel, threads=2)) as model:
            assert model.decode_plan is not None
            fused = generate(model, dtype)
            model.decode_plan = None  # block by block, through the Python forward
            python = generate(model, dtype)
        np.testing.assert_array_equal(fused[0], python[0])
        np.testing.assert_array_equal(fused[1], python[1])


def test_a_batch_or_a_prompt_takes_the_python_forward(tmp_path: Path) -> None:
    """Only one token of one sequence takes the step: a prompt, or a batch of decoding
    sequences (the weights read once for all), runs block by block."""
    path = write_family_fixture(tmp_path / "b.gguf", "bitnet-b1.58", GGMLType.I2_S, seed=1)
    with BitNetModel.load(path, backend=NativeBackend(available_kernels()[0])) as model:
        calls = []
        step = model.backend.decode_token

        def counted(*args: object) -> None:
            calls.append(args)
            step(*args)  # type: ignore[arg-type]

        model.backend.decode_token = counted  # type: ignore[method-assign]
        a, b = model.new_cache(), model.new_cache()
        model.forward([1, 2, 3], a)
        assert not calls
        model.forward([4], a)
        assert len(calls) == 1
        model.forward([1], b)
        assert len(calls) == 2  # one token of a fresh sequence: the step too
        model.forward_batch([BatchItem([5], a), BatchItem([6], b)])
        assert len(calls) == 2


def test_the_numpy_backend_has_no_decode_step(tmp_path: Path) -> None:
    path = write_family_fixture(tmp_path / "b.gguf", "bitnet-b1.58", GGMLType.I2_S, seed=1)
    with BitNetModel.load(path, backend=NumpyBackend()) as model:
        assert model.decode_plan is None


def test_the_plan_refuses_what_the_step_cannot_read(tmp_path: Path) -> None:
    path = write_family_fixture(tmp_path / "b.gguf", "bitnet-b1.58", GGMLType.I2_S, seed=1)
    with BitNetModel.load(path, backend=NativeBackend(available_kernels()[0])) as model:
        plan = model.decode_plan
        assert plan is not None
        layers = [decode_layer(layer) for layer in model.weights.layers]
        with pytest.raises(ValueError, match="layers for a shape"):
            DecodePlan(layers[:-1], plan.shape)
        swapped = dataclasses.replace(layers[0], projections=layers[0].projections[::-1])
        with pytest.raises(ValueError, match="projection 0 is"):
            DecodePlan([swapped, *layers[1:]], plan.shape)
        norm = model.weights.layers[0].attn_norm.astype(np.float64)
        f64 = dataclasses.replace(layers[0], norms=(norm, *layers[0].norms[1:]))
        with pytest.raises(ValueError, match="C-contiguous"):
            DecodePlan([f64, *layers[1:]], plan.shape)
        x = np.zeros((1, model.config.dim), np.float32)
        cache = model.new_cache()
        cos = np.ones(model.config.head_dim // 2, np.float32)
        with pytest.raises(ValueError, match="outside the cache"):
            model.backend.decode_token(plan, x, cache.k, cache.v, cache.max_seq, cos, cos)
        with pytest.raises(ValueError, match="x: axis 1"):
            model.backend.decode_token(plan, x[:, :-1], cache.k, cache.v, 0, cos, cos)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"q_dim": 100}, "heads times head_dim"),
        ({"n_kv_heads": 3, "kv_dim": 3 * 64}, "multiple of n_kv_heads"),
        ({"head_dim": 63, "q_dim": 4 * 63, "kv_dim": 2 * 63}, "head_dim even"),
        ({"ffn_dim": 0}, "positive"),
    ],
)
def test_an_inconsistent_shape_is_refused_before_any_c_runs(
    change: dict[str, int], message: str
) -> None:
    shape = dict(n_layers=1, dim=256, q_dim=256, kv_dim=128, n_heads=4, n_kv_heads=2,
                 head_dim=64, ffn_dim=512, eps=1e-5)  # fmt: skip
    DecodeShape(**shape)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        DecodeShape(**{**shape, **change})  # type: ignore[arg-type]


def test_a_norm_off_its_items_is_copied_for_the_step(tmp_path: Path) -> None:
    """The table holds addresses the C step reads floats at: a norm that is a view of bytes
    at an odd offset (a file of a small general.alignment) is taken as an aligned copy."""
    path = write_family_fixture(tmp_path / "b.gguf", "bitnet-b1.58", GGMLType.I2_S, seed=1)
    with BitNetModel.load(path, backend=NativeBackend(available_kernels()[0])) as model:
        plan = model.decode_plan
        assert plan is not None
        layers = [decode_layer(layer) for layer in model.weights.layers]
        norm = model.weights.layers[0].attn_norm
        buf = np.zeros(norm.nbytes + 1, np.uint8)
        odd = buf[1:].view(np.float32)
        odd[...] = norm
        assert not odd.flags.aligned
        moved = DecodePlan([dataclasses.replace(layers[0], norms=(odd, *layers[0].norms[1:])),
                            *layers[1:]], plan.shape)  # fmt: skip
        assert moved.table[0, 0] % 4 == 0
        runs = []
        for p in (plan, moved):
            x = model.weights.token_embd.rows([7])
            cache = model.new_cache()
            cos, sin = (
                np.ones(model.config.head_dim // 2, np.float32),
                np.zeros(model.config.head_dim // 2, np.float32),
            )
            model.backend.decode_token(p, x, cache.k, cache.v, 0, cos, sin)
            runs.append(x)
        np.testing.assert_array_equal(runs[0], runs[1])
