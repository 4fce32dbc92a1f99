"""Parity of ``BitNetModel.forward`` with a deliberately naive float64 reading of spec §4.

The reference below imports nothing from bitserve but the GGUF reader and the I2_S unpack:
it reads the weights itself and does the maths with loops and plain float64 matrices, its
own int8 quantization (``np.round``: half to even), and the naive RoPE and attention of
``naive_reference`` (the families' float64 reference, which never imports the model).
The two paths round differently (float32 vs float64), which flips an int8 rounding here
and there; the spec expects a few percent of relative L2 on random models, the same argmax
almost everywhere. Two deliberately wrong variants of the reference (SiLU for squared
ReLU, adjacent-pair RoPE for rotate-half) must fail the same comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from naive_reference import attention, rope

from bitserve.gguf.quants import unpack_i2s
from bitserve.gguf.reader import read_gguf
from bitserve.model import BitNetModel

MIN_ARGMAX_AGREEMENT = 0.95
MAX_RELATIVE_L2 = 0.03
N_TOKENS = 24


# ---- the naive reference --------------------------------------------------------------------


@dataclass
class NaiveModel:
    hp: dict[str, float]  # hyper-parameters straight from the metadata
    tensors: dict[str, np.ndarray]  # float64 copies; ternary matrices already times their scale
    ternary: dict[str, tuple[np.ndarray, float]]  # name → (-1/0/+1 matrix [out, in], scale)


def naive_load(path: Path) -> NaiveModel:
    with read_gguf(path) as g:
        arch = g.metadata["general.architecture"]
        hp = {
            key: float(g.metadata[f"{arch}.{key}"])
            for key in (
                "block_count",
                "embedding_length",
                "attention.head_count",
                "attention.head_count_kv",
                "rope.freq_base",
                "attention.layer_norm_rms_epsilon",
            )
        }
        tensors: dict[str, np.ndarray] = {}
        ternary: dict[str, tuple[np.ndarray, float]] = {}
        for name, info in g.tensors.items():
            if info.ggml_type.name == "I2_S":
                rows, cols = info.shape
                codes, scale = unpack_i2s(g.raw(name), rows, cols)
                ternary[name] = (codes.astype(np.float64), scale)
            else:
                tensors[name] = np.array(g.array(name), dtype=np.float64)
    return NaiveModel(hp, tensors, ternary)


def naive_rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    out = np.empty_like(x)
    for t in range(x.shape[0]):
        out[t] = x[t] / np.sqrt(np.mean(x[t] ** 2) + eps) * w
    return out


def naive_bitlinear(x: np.ndarray, weight: tuple[np.ndarray, float]) -> np.ndarray:
    ternary, scale = weight
    out = np.empty((x.shape[0], ternary.shape[0]))
    for t in range(x.shape[0]):
        s = 127.0 / max(np.max(np.abs(x[t])), 1e-5)
        q = np.clip(np.round(x[t] * s), -128, 127)  # np.round rounds half to even
        out[t] = (ternary @ q) / s * scale  # integer sums: exact in float64
    return out


def naive_forward(
    m: NaiveModel, tokens: list[int], activation: str = "relu2", neox: bool = True
) -> np.ndarray:
    """Logits ``[T, vocab]`` (float64) of ``tokens`` from an empty context."""
    n_heads, n_kv = int(m.hp["attention.head_count"]), int(m.hp["attention.head_count_kv"])
    d = int(m.hp["embedding_length"]) // n_heads
    eps, theta = m.hp["attention.layer_norm_rms_epsilon"], m.hp["rope.freq_base"]
    n = len(tokens)
    x = m.tensors["token_embd.weight"][tokens]
    for layer in range(int(m.hp["block_count"])):

        def w(name: str, layer: int = layer) -> np.ndarray:
            return m.tensors[f"blk.{layer}.{name}.weight"]

        def t(name: str, layer: int = layer) -> tuple[np.ndarray, float]:
            return m.ternary[f"blk.{layer}.{name}.weight"]

        h = naive_rmsnorm(x, w("attn_norm"), eps)
        q = rope(naive_bitlinear(h, t("attn_q")).reshape(n, n_heads, d), 0, theta, neox)
        k = rope(naive_bitlinear(h, t("attn_k")).reshape(n, n_kv, d), 0, theta, neox)
        v = naive_bitlinear(h, t("attn_v")).reshape(n, n_kv, d)
        a = attention(q, k, v).reshape(n, n_heads * d)
        x = x + naive_bitlinear(naive_rmsnorm(a, w("attn_sub_norm"), eps), t("attn_output"))
        h = naive_rmsnorm(x, w("ffn_norm"), eps)
        gate, up = naive_bitlinear(h, t("ffn_gate")), naive_bitlinear(h, t("ffn_up"))
        act = np.maximum(gate, 0) ** 2 if activation == "relu2" else gate / (1 + np.exp(-gate))
        f = naive_rmsnorm(act * up, w("ffn_sub_norm"), eps)
        x = x + naive_bitlinear(f, t("ffn_down"))
    return naive_rmsnorm(x, m.tensors["output_norm.weight"], eps) @ m.tensors["token_embd.weight"].T


# ---- the comparison ---------------------------------------------------------------------------


def compare(logits: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(fraction of positions with the same argmax, relative L2 of the difference)."""
    agreement = float(np.mean(logits.argmax(axis=-1) == reference.argmax(axis=-1)))
    rel_l2 = float(np.linalg.norm(logits - reference) / np.linalg.norm(reference))
    return agreement, rel_l2


def matches(logits: np.ndarray, reference: np.ndarray) -> bool:
    agreement, rel_l2 = compare(logits, reference)
    return agreement >= MIN_ARGMAX_AGREEMENT and rel_l2 <= MAX_RELATIVE_L2


def prompt(vocab_size: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, vocab_size, N_TOKENS)]


def model_logits(path: Path, tokens: list[int], activation: str | None = None) -> np.ndarray:
    with BitNetModel.load(path, backend="numpy", activation=activation) as model:
        return model.forward(tokens, model.new_cache(), all_logits=True)


# ---- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["model_gqa4", "model_gqa2"])
@pytest.mark.parametrize("activation", ["relu2", "silu"])
def test_forward_matches_naive_reference(
    which: str, activation: str, request: pytest.FixtureRequest
) -> None:
    path: Path = request.getfixturevalue(which)
    naive = naive_load(path)
    tokens = prompt(naive.tensors["token_embd.weight"].shape[0], seed=len(which))
    logits = model_logits(path, tokens, activation)
    assert logits.shape == (N_TOKENS, naive.tensors["token_embd.weight"].shape[0])
    assert logits.dtype == np.float32
    agreement, rel_l2 = compare(logits, naive_forward(naive, tokens, activation))
    assert agreement >= MIN_ARGMAX_AGREEMENT, (agreement, rel_l2)
    assert rel_l2 <= MAX_RELATIVE_L2, (agreement, rel_l2)


def test_comparison_sees_silu_instead_of_squared_relu(model_gqa4: Path) -> None:
    naive = naive_load(model_gqa4)
    tokens = prompt(naive.tensors["token_embd.weight"].shape[0], seed=3)
    logits = model_logits(model_gqa4, tokens)  # bitnet-b1.58: squared ReLU
    assert matches(logits, naive_forward(naive, tokens, "relu2"))
    wrong = naive_forward(naive, tokens, "silu")
    assert not matches(logits, wrong), compare(logits, wrong)


def test_comparison_sees_normal_rope_instead_of_neox(model_gqa4: Path) -> None:
    naive = naive_load(model_gqa4)
    tokens = prompt(naive.tensors["token_embd.weight"].shape[0], seed=4)
    logits = model_logits(model_gqa4, tokens)
    assert matches(logits, naive_forward(naive, tokens, neox=True))
    wrong = naive_forward(naive, tokens, neox=False)
    assert not matches(logits, wrong), compare(logits, wrong)
