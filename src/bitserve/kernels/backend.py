"""The kernel interface the forward pass calls, and its numpy implementation (the oracle).

A backend computes the heavy operations of the forward pass; everything else (norms, RoPE,
residuals) is cheap numpy in ``bitserve.model``. Weights arrive as ``bitserve.kernels.tensors``
builds them: I2_S bytes straight from the memory map or block-scaled ternary repacked at load
(``TernaryWeight``), heads and embeddings of any type (``EmbeddingMatrix``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from bitserve.kernels import reference
from bitserve.kernels.decode import DecodeLayer, DecodePlan, DecodeShape
from bitserve.kernels.tensors import ActQuant, EmbeddingMatrix, TernaryWeight

__all__ = ["ActQuant", "Backend", "EmbeddingMatrix", "NumpyBackend", "TernaryWeight", "storing"]

HeadInput = EmbeddingMatrix | np.ndarray


def as_matrix(head: HeadInput) -> EmbeddingMatrix:
    """A head given as a plain F16/F32 array, or already an :class:`EmbeddingMatrix`."""
    return head if isinstance(head, EmbeddingMatrix) else EmbeddingMatrix.from_array(head)


def storing(k_new: np.ndarray | None, v_new: np.ndarray | None) -> bool:
    """Whether an attention call stores new keys/values (both given) or not (neither)."""
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new go together")
    return k_new is not None


class Backend(ABC):
    """Heavy operations of the forward pass. Inputs are float32 and C-contiguous."""

    name: str
    head_mode = "f16"  # "int8": an F16 head runs as int8 rows made from it (native only)
    tiles_heads = False  # head() reads f32/f16/bf16 rows fastest in the tiled layout
    tiles_ternary = False  # bitlinear() reads I2_S codes fastest in the tiled layout

    def int8_head(self, head: EmbeddingMatrix) -> bool:
        """True where :meth:`head` runs ``head`` as int8 rows made from its F16 values, so
        the F16 matrix itself is only read a row at a time (the input embedding)."""
        return self.head_mode == "int8" and head.kind == "f16"

    @abstractmethod
    def bitlinear(self, x: np.ndarray, w: TernaryWeight) -> np.ndarray:
        """``x [T, n_in]`` → ``[T, n_out]``: int8 activation quantization (``w.act_quant``),
        exact integer ternary dot products, then the scales: I2_S ``acc / s * w.scale``
        (spec §4), blocked :func:`reference.bitlinear_blocked`."""

    def bitlinear_many(self, x: np.ndarray, weights: Sequence[TernaryWeight]) -> list[np.ndarray]:
        """:meth:`bitlinear` of one input by several weights (q/k/v, gate/up): the same bits
        as separate calls; native backends quantize ``x`` once and run one task."""
        return [self.bitlinear(x, w) for w in weights]

    def decode_plan(self, layers: Sequence[DecodeLayer], shape: DecodeShape) -> DecodePlan | None:
        """The model's blocks for :meth:`decode_token`, or ``None`` where this backend runs
        the blocks one kernel at a time (numpy: the oracle's own order is the forward)."""
        return None

    def decode_token(
        self, plan: DecodePlan, x: np.ndarray, k: np.ndarray, v: np.ndarray, pos: int,
        cos: np.ndarray, sin: np.ndarray,
    ) -> None:  # fmt: skip
        """One token of one sequence through every block of ``plan``, in place: ``x
        [1, dim]`` (its embedding) becomes the residual stream after the last block; its
        keys/values go to position ``pos`` of the cache ``k``/``v`` ``[n_layers, max_seq,
        KVH, D]``; ``cos``/``sin`` ``[D/2]``: ``pos``'s RoPE angles."""
        raise NotImplementedError(f"the {self.name} backend has no decode step")

    @abstractmethod
    def head(self, x: np.ndarray, embedding: HeadInput) -> np.ndarray:
        """LM head: ``x [T, dim] @ embedding [vocab, dim]ᵀ`` → ``[T, vocab]`` float32.
        ``embedding``: an :class:`EmbeddingMatrix` of any type, or an F16/F32 array. Float and
        int8-block heads take ``x`` unquantized; a ternary head is a bitlinear (its
        ``act_quant``)."""

    @abstractmethod
    def attention(
        self,
        q: np.ndarray,
        k_cache: np.ndarray,
        v_cache: np.ndarray,
        start_pos: int,
        k_new: np.ndarray | None = None,
        v_new: np.ndarray | None = None,
    ) -> np.ndarray:
        """Causal GQA attention for ``T`` new tokens at positions ``start_pos..start_pos+T-1``.

        ``q [T, H, D]``; ``k_cache``/``v_cache [S, KVH, D]`` hold positions ``0..S-1`` with
        ``S = start_pos + T`` (the new tokens included). Query head ``h`` reads KV head
        ``h // (H // KVH)``; scores are scaled by ``1/sqrt(D)``. Returns ``[T, H, D]``.
        With ``k_new``/``v_new [T, KVH, D]`` float32, the new tokens' keys and values are
        first stored at their positions: the caches must then be the (writable, contiguous)
        cache memory itself, float32 or float16 (rounded as numpy's ``astype``).
        """

    def attention_decode(
        self,
        q: np.ndarray,
        caches: Sequence[tuple[np.ndarray, np.ndarray]],
        k_new: np.ndarray | None = None,
        v_new: np.ndarray | None = None,
    ) -> np.ndarray:
        """One new token for each of ``B`` sequences: ``q [B, H, D]``; ``caches[b]`` is
        sequence ``b``'s ``(k, v) [S_b, KVH, D]``, its new token at position ``S_b - 1``
        (stored there first from ``k_new``/``v_new [B, KVH, D]``, as :meth:`attention`).
        Returns ``[B, H, D]``: row ``b`` is :meth:`attention` of that sequence alone."""
        storing(k_new, v_new)
        rows = []
        for b, (k, v) in enumerate(caches):
            k_b = None if k_new is None else k_new[b : b + 1]
            v_b = None if v_new is None else v_new[b : b + 1]
            rows.append(self.attention(q[b : b + 1], k, v, k.shape[0] - 1, k_b, v_b))
        return np.concatenate(rows) if rows else np.empty_like(q)

    # Row-wise glue with a numpy default (the oracle); native backends run it in C, which
    # saves the temporaries and per-call overhead that dominate it in numpy.

    def rmsnorm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        """``x / sqrt(mean(x²) + eps) * weight`` per row: ``x [T, n]``, ``weight [n]`` →
        float32 ``[T, n]`` (mean in float64, as :func:`reference.rmsnorm`)."""
        return reference.rmsnorm(x, weight, eps)

    def relu2_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """``max(gate, 0)² * up`` for ``gate``, ``up [T, n]`` float32 → ``[T, n]``."""
        return reference.relu2_mul(gate, up)

    def silu_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """``silu(gate) * up`` (SwiGLU) for ``gate``, ``up [T, n]`` float32 → ``[T, n]``."""
        return reference.silu_mul(gate, up)

    def rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """NEOX RoPE of ``x [T, H, D]`` float32 by ``cos``/``sin [T, D/2]`` → ``[T, H, D]``."""
        return reference.rope_neox(x, cos, sin)


class NumpyBackend(Backend):
    name = "numpy"

    def bitlinear(self, x: np.ndarray, w: TernaryWeight) -> np.ndarray:
        if w.blocked:
            return reference.bitlinear_blocked(
                x, w.codes(), w.block_scales(), w.group, w.act_quant.value, w.scale
            )
        q, s = reference.quantize_activations(x)
        acc = q.astype(np.float32) @ w.ternary_f32().T  # exact: |sums| < 2**24
        y: np.ndarray = (acc / s[:, None] * np.float32(w.scale)).astype(np.float32)
        return y

    def head(self, x: np.ndarray, embedding: HeadInput) -> np.ndarray:
        m = as_matrix(embedding)
        if m.ternary is not None:
            return self.bitlinear(x, m.ternary)
        out = np.empty((x.shape[0], m.n_rows), dtype=np.float32)
        step = 16384  # widen the head in slices: never a full f32 copy of it
        for lo in range(0, m.n_rows, step):
            out[:, lo : lo + step] = x @ m.dense_slice(lo, lo + step).T
        return out

    def attention(
        self,
        q: np.ndarray,
        k_cache: np.ndarray,
        v_cache: np.ndarray,
        start_pos: int,
        k_new: np.ndarray | None = None,
        v_new: np.ndarray | None = None,
    ) -> np.ndarray:
        if storing(k_new, v_new):
            k_cache[start_pos:] = k_new
            v_cache[start_pos:] = v_new
        t, n_heads, head_dim = q.shape
        s, n_kv, _ = k_cache.shape
        group = n_heads // n_kv
        k = np.repeat(k_cache.astype(np.float32), group, axis=1)  # [S, H, D]
        v = np.repeat(v_cache.astype(np.float32), group, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.float32(np.sqrt(head_dim))  # [H, T, S]
        future = np.arange(s)[None, :] > (start_pos + np.arange(t))[:, None]  # [T, S]
        scores[:, future] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        out: np.ndarray = np.einsum("hts,shd->thd", p, v).astype(np.float32)
        return out
