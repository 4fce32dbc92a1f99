"""Every family's tiny fixture, in its published layout, against a naive float64 reading.

Each fixture (``bitserve.model.fixtures``) is written by the project's writer in one of the
ternary types its family publishes: TQ1_0/TQ2_0 are packed by the PyPI ``gguf`` package
(an independent packer), I2_S by bitserve's. The reference (``naive_reference``) follows
llama.cpp's graph for the architecture, RoPE applied to q/k as the file stores them; the
model must agree with it as the spec expects of two roundings (§4: a few percent of
relative L2 on random models, the same argmax almost everywhere), and every native
kernel path must agree with the numpy oracle as on 2B-4T.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from naive_reference import compare, naive_forward, naive_load

from bitserve.gguf.constants import GGMLType
from bitserve.kernels.native import NativeBackend, available_kernels
from bitserve.model import BitNetModel
from bitserve.model.fixtures import FAMILIES, gguf_package_packer, write_family_fixture

MIN_ARGMAX_AGREEMENT = 0.95
MAX_RELATIVE_L2 = 0.03
N_TOKENS = 16

# (family, ternary type, untied head type or None): each published ternary type with the
# family's first head type, then each other head type with its first ternary type
CASES = [(family, t, (spec.output_types or (None,))[0])
         for family, spec in FAMILIES.items() for t in spec.ternary_types]  # fmt: skip
CASES += [(family, spec.ternary_types[0], o)
          for family, spec in FAMILIES.items() for o in spec.output_types[1:]]  # fmt: skip
Case = tuple[str, GGMLType, "GGMLType | None"]


@pytest.fixture(scope="session")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> dict[Case, Path]:
    folder = tmp_path_factory.mktemp("families")
    return {
        (family, t, o): write_family_fixture(
            folder / f"{family}-{t.name}-{getattr(o, 'name', 'tied')}.gguf",
            family,
            t,
            seed=7,
            pack=gguf_package_packer(t),
            output=o,
        )
        for family, t, o in CASES
    }


def default(family: str) -> Case:
    spec = FAMILIES[family]
    return family, spec.ternary_types[0], (spec.output_types or (None,))[0]


def prompt(seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 2000, N_TOKENS)]


def logits_of(path: Path, backend: str | NativeBackend, tokens: list[int]) -> np.ndarray:
    """All logits of a prompt, then 4 decoded tokens one at a time: ``[T + 4, vocab]``."""
    with BitNetModel.load(path, backend=backend) as model:
        cache = model.new_cache()
        first = model.forward(tokens[:-4], cache, all_logits=True)
        steps = [
            model.forward(tokens[i : i + 1], cache) for i in range(len(tokens) - 4, len(tokens))
        ]
    return np.concatenate([first, np.stack(steps)])


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: "-".join(getattr(v, "name", str(v)) for v in c)
)
def test_family_matches_the_naive_reference(case: Case, family_models: dict[Case, Path]) -> None:
    family = case[0]
    path = family_models[case]
    tokens = prompt(len(family))
    logits = logits_of(path, "numpy", tokens)
    agreement, rel_l2 = compare(logits, naive_forward(naive_load(path), tokens))
    assert agreement >= MIN_ARGMAX_AGREEMENT, (agreement, rel_l2)
    assert rel_l2 <= MAX_RELATIVE_L2, (agreement, rel_l2)


def test_prismml_early_q2_0_of_128_matches_the_reference(tmp_path: Path) -> None:
    """Type 42's older variant (a scale per 128 weights, PrismML's first Bonsai files),
    embedding and tied head included, runs like the current one."""
    path = write_family_fixture(tmp_path / "g128.gguf", "qwen3", seed=9, q2_0_block=128)
    tokens = prompt(9)
    with BitNetModel.load(path, backend="numpy") as model:
        assert model.gguf.q2_0_block == 128
        assert model.weights.layers[0].attn_q.group == 128
    logits = logits_of(path, "numpy", tokens)
    agreement, rel_l2 = compare(logits, naive_forward(naive_load(path), tokens))
    assert agreement >= MIN_ARGMAX_AGREEMENT and rel_l2 <= MAX_RELATIVE_L2, (agreement, rel_l2)
    if available_kernels():
        native = logits_of(path, NativeBackend(available_kernels()[0], threads=2), tokens)
        assert np.linalg.norm(native - logits) / np.linalg.norm(logits) <= 0.01


@pytest.mark.parametrize("family", ["llama", "minicpm"])
def test_reference_sees_a_missing_unpermutation(
    family: str, family_models: dict[Case, Path]
) -> None:
    """The q/k rows of llama/minicpm files are in NORM-RoPE order: a reference that runs
    NEOX RoPE on them as stored (the bug of serving them without un-permuting) disagrees."""
    import naive_reference

    path = family_models[default(family)]
    tokens = prompt(3)
    logits = logits_of(path, "numpy", tokens)
    saved = naive_reference.NAIVE_ARCHS[family]
    naive_reference.NAIVE_ARCHS[family] = (*saved[:3], True, saved[4])  # NEOX on the file
    try:
        wrong = naive_forward(naive_load(path), tokens)
    finally:
        naive_reference.NAIVE_ARCHS[family] = saved
    agreement, rel_l2 = compare(logits, wrong)
    assert agreement < MIN_ARGMAX_AGREEMENT or rel_l2 > MAX_RELATIVE_L2, (agreement, rel_l2)


@pytest.mark.parametrize("kernel", available_kernels())  # every path, as the README says
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: "-".join(getattr(v, "name", str(v)) for v in c)
)
def test_native_matches_the_numpy_oracle(
    case: Case, kernel: str, family_models: dict[Case, Path]
) -> None:
    path = family_models[case]
    tokens = prompt(11)
    want = logits_of(path, "numpy", tokens)
    got = logits_of(path, NativeBackend(kernel, threads=2), tokens)
    assert (got.argmax(axis=1) == want.argmax(axis=1)).mean() >= 0.99
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 0.01


def test_each_family_loads_as_published(family_models: dict[Case, Path]) -> None:
    """What each layout holds, seen through the loaded model."""
    for (family, ternary, output), path in family_models.items():
        with BitNetModel.load(path, backend="numpy") as model:
            arch, layer = model.config.architecture, model.weights.layers[0]
            assert model.config.arch == family and arch.name == family
            assert (layer.attn_sub_norm is not None) == arch.sub_norms, family
            assert (layer.attn_q_norm is not None) == arch.qk_norm, family
            assert (model.weights.output is not None) == (output is not None), family
            if output is not None:
                assert model.weights.head.source == output
            assert layer.attn_q.n_out == model.config.q_dim, (family, ternary)
            assert layer.attn_q.source == ternary
    with BitNetModel.load(family_models[default("qwen3")], backend="numpy") as qwen:
        assert (qwen.config.q_dim, qwen.config.dim, qwen.config.head_dim) == (512, 256, 128)
        assert qwen.weights.token_embd.kind == "ternary"  # Q2_0, the tied head too
        assert qwen.weights.layers[0].ffn_up.blocked and qwen.weights.layers[0].ffn_up.group == 64
    with BitNetModel.load(family_models[default("bitnet")], backend="numpy") as bitnet:
        assert bitnet.config.activation == "silu"  # 1bitLLM: not LLaMA-3's vocabulary


def test_upstream_bitnet_projection_scales_multiply_the_output(
    family_models: dict[Case, Path], tmp_path: Path
) -> None:
    """Upstream's bitnet graph multiplies a projection by an optional one-float
    ``blk.N.<proj>.scale`` tensor; the reference does the same from the file."""
    from bitserve.gguf.reader import read_gguf
    from bitserve.gguf.writer import GGUFWriter

    src = family_models["bitnet", GGMLType.I2_S, None]
    w = GGUFWriter()
    with read_gguf(src) as g:
        for key, value in g.metadata.items():
            w.add(key, value, g.metadata_types[key], g.metadata_array_types.get(key))
        for name, info in g.tensors.items():
            w.add_tensor(name, g.raw(name).tobytes(), info.ggml_type, info.dims)
    for name, value in (("blk.0.attn_v.scale", 0.5), ("blk.1.ffn_down.scale", 3.0)):
        w.add_tensor(name, np.array([value], np.float32).tobytes(), GGMLType.F32, (1,))
    path = tmp_path / "scaled.gguf"
    w.write(path)
    tokens = prompt(5)
    scaled, plain = logits_of(path, "numpy", tokens), logits_of(src, "numpy", tokens)
    assert compare(scaled, plain)[1] > MAX_RELATIVE_L2  # the scales change the model
    agreement, rel_l2 = compare(scaled, naive_forward(naive_load(path), tokens))
    assert agreement >= MIN_ARGMAX_AGREEMENT and rel_l2 <= MAX_RELATIVE_L2, (agreement, rel_l2)


@pytest.mark.parametrize(
    ("family", "extra"),
    [
        ("llama", "blk.0.attn_sub_norm.weight"),  # a BitNet sub-norm in a llama file
        ("qwen3", "blk.2.attn_norm.weight"),  # a layer past block_count
        ("bitnet-b1.58", "blk.0.attn_q_norm.weight"),  # Qwen3's q norm in a BitNet file
    ],
)
def test_a_tensor_the_architecture_does_not_use_is_refused(
    family: str, extra: str, family_models: dict[Case, Path], tmp_path: Path
) -> None:
    from bitserve.gguf.reader import GGUFError, read_gguf
    from bitserve.gguf.writer import GGUFWriter

    w = GGUFWriter()
    with read_gguf(family_models[default(family)]) as g:
        for key, value in g.metadata.items():
            w.add(key, value, g.metadata_types[key], g.metadata_array_types.get(key))
        for name, info in g.tensors.items():
            w.add_tensor(name, g.raw(name).tobytes(), info.ggml_type, info.dims,
                         q2_0_block=g.q2_0_block)  # fmt: skip
    w.add_tensor(extra, (1 + np.arange(256, dtype=np.float32)).tobytes(), GGMLType.F32, (256,))
    w.write(tmp_path / "extra.gguf")
    with pytest.raises(GGUFError) as e:
        BitNetModel.load(tmp_path / "extra.gguf", backend="numpy")
    assert f"tensor {extra!r} is not part of the {family!r} layout" in str(e.value)
