"""The forward pass of every ternary family (spec §4): norms, RoPE and residuals in numpy,
the heavy operations (ternary matmuls, attention, LM head) through a
:class:`~bitserve.kernels.Backend`.

One forward serves BitNet b1.58, LLaMA-, Qwen3- and MiniCPM-shaped ternary models: the
model's :class:`~bitserve.model.arch.Architecture` decides which optional steps exist
(sub-norms, per-head q/k norms, MiniCPM's scales), which the weights reflect (a missing
norm is ``None``), and ``config.activation`` picks the gated activation. With the numpy
backend this is the oracle the C kernels are tested against, so it is kept plain: one
function per step of the spec, shapes in the comments. Numeric choices: RMSNorm
accumulates the mean of squares in float64 and returns float32; RoPE tables are computed
in float64 and stored as float32; everything else runs in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bitserve.gguf.reader import GGUFFile, read_gguf
from bitserve.kernels import Backend, get_backend
from bitserve.kernels.decode import DecodeLayer, DecodeShape
from bitserve.model.arch import PROJECTIONS
from bitserve.model.config import ModelConfig
from bitserve.model.kv_cache import ContextFullError, KVCache, KVMemory
from bitserve.model.resident import resident_weights
from bitserve.model.weights import LayerWeights, ModelWeights, check_head_finite


def rope_tables(n_positions: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """``cos, sin``: float32 ``[n_positions, head_dim/2]``, angle ``pos · theta^(-2i/head_dim)``."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # [D/2]
    angles = np.outer(np.arange(n_positions, dtype=np.float64), inv_freq)  # [P, D/2]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class RopeTables:
    """:func:`rope_tables` for positions ``0..n-1``, grown on demand (doubling, up to
    ``limit``) instead of sized by the context up front: a model claiming 2^31 positions
    costs only the positions used. Every entry is computed on its own, so a table's values
    never depend on its size."""

    def __init__(self, head_dim: int, theta: float, limit: int, initial: int = 4096) -> None:
        self.head_dim = head_dim
        self.theta = theta
        self.limit = limit
        self.cos, self.sin = rope_tables(min(initial, limit), head_dim, theta)

    def upto(self, end: int) -> tuple[np.ndarray, np.ndarray]:
        """``cos, sin [n >= end, D/2]`` (``end <= limit``)."""
        if end > len(self.cos):
            size = min(self.limit, max(end, 2 * len(self.cos)))
            self.cos, self.sin = rope_tables(size, self.head_dim, self.theta)
        return self.cos, self.sin


def relu_squared(x: np.ndarray) -> np.ndarray:
    """``max(x, 0)²`` (BitNet b1.58's FFN activation)."""
    out: np.ndarray = np.square(np.maximum(x, np.float32(0)))
    return out


def silu(x: np.ndarray) -> np.ndarray:
    """``x · sigmoid(x)``, written with tanh so that no input overflows ``exp``."""
    out: np.ndarray = x * (np.float32(0.5) * (np.float32(1) + np.tanh(np.float32(0.5) * x)))
    return out


@dataclass(slots=True)
class BatchItem:
    """One sequence's share of a batched step: ``tokens`` (``T >= 1`` new ids) to append at
    positions ``cache.length..``; ``want_logits``: return the last token's logits."""

    tokens: Sequence[int] | np.ndarray
    cache: KVCache
    want_logits: bool = True


@dataclass(slots=True)
class _Step:
    """The layout of one batched step: item ``j`` owns rows ``los[j]:his[j]`` of the
    ``[ΣT, ...]`` activations; ``ids [ΣT]`` and the RoPE angles ``cos``/``sin [ΣT, D/2]``
    of every row's own position, gathered once for all layers; ``decoding``: the items with
    one new token, whose rows are ``decode_rows``."""

    items: Sequence[BatchItem]
    ids: np.ndarray
    los: list[int]
    his: list[int]
    cos: np.ndarray
    sin: np.ndarray
    decoding: list[BatchItem] = field(default_factory=list)
    decode_rows: list[int] = field(default_factory=list)

    @classmethod
    def build(cls, items: Sequence[BatchItem], ids: list[np.ndarray], rope: RopeTables) -> _Step:
        his = np.cumsum([len(i) for i in ids]).tolist()
        los = [0, *his[:-1]]
        if len(items) == 1:  # one sequence: contiguous positions, table views, no copies
            start = items[0].cache.length
            end = start + len(ids[0])
            rope_cos, rope_sin = rope.upto(end)
            return cls(items, ids[0], los, his, rope_cos[start:end], rope_sin[start:end])
        pairs = zip(items, ids, strict=True)
        positions = np.concatenate([np.arange(len(i)) + it.cache.length for it, i in pairs])
        rope_cos, rope_sin = rope.upto(int(positions.max()) + 1)
        decoding = [(it, lo) for it, lo, hi in zip(items, los, his, strict=True) if hi - lo == 1]
        return cls(
            items, np.concatenate(ids), los, his, rope_cos[positions], rope_sin[positions],
            [it for it, _ in decoding], [lo for _, lo in decoding],
        )  # fmt: skip


class BitNetModel:
    """A loaded model of any supported family: ``config``, ``weights`` (views of ``gguf``,
    which stays open until :meth:`close`), ``backend``. :meth:`forward` is the only
    compute entry point."""

    def __init__(
        self, gguf: GGUFFile, config: ModelConfig, weights: ModelWeights, backend: Backend
    ) -> None:
        self.gguf = gguf
        self.config = config
        self.weights = weights
        self.backend = backend
        # relu(gate)² * up or silu(gate) * up, fused in C on the native backends
        self.gated = backend.relu2_mul if config.activation == "relu2" else backend.silu_mul
        # cos/sin: [positions used so far, head_dim/2], shared by every layer and every cache
        self.rope = RopeTables(config.head_dim, config.rope_theta, config.context_length)
        # one token of one sequence: every block in one native call (None: block by block)
        self.decode_plan = backend.decode_plan(
            [decode_layer(layer) for layer in weights.layers], decode_shape(config)
        )

    @classmethod
    def load(
        cls,
        path: str | Path,
        backend: Backend | str | None = None,
        activation: str | None = None,
        mmap: bool = False,
    ) -> BitNetModel:
        """Open ``path`` and check every tensor; ``backend`` is an instance or a kernel name
        (``None``: ``get_backend()``); ``activation`` overrides the file's FFN activation.
        The weights a decode step streams are read into private huge-page memory
        (:mod:`bitserve.model.resident`), unless ``mmap``: then they stay views of the
        file's map, shared with every process that maps the same file."""
        if backend is None or isinstance(backend, str):
            backend = get_backend(backend)
        gguf = read_gguf(path)
        try:
            config = ModelConfig.from_gguf(gguf, activation)
            weights = ModelWeights.from_gguf(gguf, config)
            if not mmap:  # an int8 head is made from the F16 one: only its rows are read after
                head = not backend.int8_head(weights.head)
                weights = resident_weights(
                    weights, gguf, head, backend.tiles_heads, backend.tiles_ternary
                )
            check_head_finite(gguf, weights.head_name, weights.head)
            return cls(gguf, config, weights, backend)
        except BaseException:
            gguf.close()
            raise

    def close(self) -> None:
        """Close the file; the model must not be used afterwards."""
        self.gguf.close()

    def __enter__(self) -> BitNetModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def new_cache(
        self,
        max_seq: int | None = None,
        dtype: np.dtype | type = np.float32,
        memory: KVMemory | None = None,
    ) -> KVCache:
        """An empty cache for up to ``max_seq`` tokens (default and maximum: context_length);
        memory is taken as positions are written. ``dtype`` float32 or float16; ``memory``
        counts its bytes."""
        if max_seq is not None and max_seq > self.config.context_length:
            raise ValueError(
                f"max_seq {max_seq} exceeds the model's context length {self.config.context_length}"
            )
        return KVCache(self.config, max_seq, dtype, memory)

    def forward(
        self, tokens: Sequence[int] | np.ndarray, cache: KVCache, all_logits: bool = False
    ) -> np.ndarray:
        """Run ``tokens`` (``T >= 1``) at positions ``cache.length..cache.length+T-1``, causally,
        and append their keys/values to ``cache``. Returns float32 logits of the last token
        ``[vocab]``, or of every new token ``[T, vocab]`` with ``all_logits``.

        Raises :class:`ContextFullError` (cache untouched) when the tokens do not fit.
        """
        x, _ = self._hidden([BatchItem(tokens, cache)])  # [T, dim]
        if not all_logits:
            x = x[-1:]  # only the last position needs the (large) head
        logits = self._head(x)  # [T or 1, vocab]
        return logits if all_logits else logits[0]

    def forward_batch(self, items: Sequence[BatchItem]) -> list[np.ndarray | None]:
        """One step for several sequences: every item's ``tokens`` are appended to its own
        cache (at its own positions) and all of them go through each bitlinear as one
        ``[ΣT, dim]`` activation, so the weights are read once per step for the batch.

        Returns, in item order, the float32 logits ``[vocab]`` of each item's last token
        when ``item.want_logits``, else ``None``. A token's values do not depend on what
        else is in the batch (every operation is per row; attention per sequence).
        Raises :class:`ContextFullError` (no cache touched) when an item does not fit.
        """
        if not items:
            return []
        x, step = self._hidden(items)  # [ΣT, dim]
        rows = [hi - 1 for hi, it in zip(step.his, items, strict=True) if it.want_logits]
        out: list[np.ndarray | None] = [None] * len(items)
        if rows:
            logits = self._head(x[rows])  # [n_rows, vocab]
            wanted = (i for i, it in enumerate(items) if it.want_logits)
            for i, row in zip(wanted, logits, strict=True):
                out[i] = row
        return out

    def _hidden(self, items: Sequence[BatchItem]) -> tuple[np.ndarray, _Step]:
        """The residual stream after the last block for all new tokens, ``[ΣT, dim]``,
        and the step's layout; every item's cache advanced by its ``T``. Everything is
        checked before any cache is written."""
        ids = [self._check_tokens(it.tokens) for it in items]
        for it, item_ids in zip(items, ids, strict=True):
            self._check_cache(it.cache, len(item_ids))
        if len({id(it.cache) for it in items}) != len(items):
            raise ValueError("each item of a batch needs its own cache")
        step = _Step.build(items, ids, self.rope)
        for it, lo, hi in zip(items, step.los, step.his, strict=True):
            it.cache.reserve(it.cache.length + hi - lo)  # the attention kernels write them
        c = self.config
        x = self.weights.token_embd.rows(step.ids)  # x: [ΣT, dim] float32
        if c.embedding_scale != 1.0:  # MiniCPM
            x *= np.float32(c.embedding_scale)
        if self.decode_plan is not None and len(step.ids) == 1:  # one token, one sequence
            cache = items[0].cache
            self.backend.decode_token(
                self.decode_plan, x, cache.k, cache.v, cache.length, step.cos[0], step.sin[0]
            )
            layers: Sequence[LayerWeights] = ()  # done: the same bits as the loop below
        else:
            layers = self.weights.layers
        for i, layer in enumerate(layers):
            if c.residual_scale == 1.0:
                x += self._attention(i, layer, x, step)
                x += self._feed_forward(layer, x)
            else:  # MiniCPM: each branch scaled before its residual add
                x += self._attention(i, layer, x, step) * np.float32(c.residual_scale)
                x += self._feed_forward(layer, x) * np.float32(c.residual_scale)
        for it, lo, hi in zip(items, step.los, step.his, strict=True):
            it.cache.advance(hi - lo)
        return x, step

    def _head(self, x: np.ndarray) -> np.ndarray:
        h = self.backend.rmsnorm(x, self.weights.output_norm, self.config.norm_eps)  # [N, dim]
        logits = self.backend.head(h, self.weights.head)  # [N, vocab]
        if self.config.logit_scale != 1.0:  # MiniCPM
            logits /= np.float32(self.config.logit_scale)
        return logits

    def _attention(self, i: int, layer: LayerWeights, x: np.ndarray, step: _Step) -> np.ndarray:
        """Block ``i``'s attention branch for ``x [ΣT, dim]`` → ``[ΣT, dim]`` (before the
        residual); writes this block's keys/values of every item into its cache."""
        c, n_rows = self.config, x.shape[0]
        h = self.backend.rmsnorm(x, layer.attn_norm, c.norm_eps)  # [ΣT, dim]
        q = self.backend.bitlinear(h, layer.attn_q).reshape(n_rows, c.n_heads, c.head_dim)
        k = self.backend.bitlinear(h, layer.attn_k).reshape(n_rows, c.n_kv_heads, c.head_dim)
        v = self.backend.bitlinear(h, layer.attn_v).reshape(n_rows, c.n_kv_heads, c.head_dim)
        if layer.attn_q_norm is not None and layer.attn_k_norm is not None:  # Qwen3
            q = self._head_norm(q, layer.attn_q_norm)  # RMSNorm of each head, before RoPE
            k = self._head_norm(k, layer.attn_k_norm)
        q, k = self.backend.rope(q, step.cos, step.sin), self.backend.rope(k, step.cos, step.sin)
        if len(step.items) == 1:  # the common single-sequence case: no gather/scatter
            a = self._attend(i, step.items[0], q, k, v)
        else:
            a = self._attend_batch(i, step, q, k, v)
        a = a.reshape(n_rows, c.q_dim)
        if layer.attn_sub_norm is not None:  # BitNet: sub-norm BEFORE o_proj
            a = self.backend.rmsnorm(a, layer.attn_sub_norm, c.norm_eps)
        return self.backend.bitlinear(a, layer.attn_output)  # [ΣT, dim]

    def _head_norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """RMSNorm of every head of ``x [T, H, D]`` by ``weight [D]`` → ``[T, H, D]``."""
        n_rows, n_heads, head_dim = x.shape
        flat = self.backend.rmsnorm(
            x.reshape(n_rows * n_heads, head_dim), weight, self.config.norm_eps
        )
        return flat.reshape(n_rows, n_heads, head_dim)

    def _attend(
        self, i: int, item: BatchItem, q: np.ndarray, k: np.ndarray, v: np.ndarray
    ) -> np.ndarray:
        """One sequence's attention in block ``i``: store ``k``/``v [T, KVH, D]`` at its
        positions, attend ``q [T, H, D]`` over its cache → ``[T, H, D]``."""
        start = item.cache.length
        k_all, v_all = item.cache.view(i, start + q.shape[0])  # [S, KVH, D]
        return self.backend.attention(q, k_all, v_all, start, k, v)

    def _attend_batch(
        self, i: int, step: _Step, q: np.ndarray, k: np.ndarray, v: np.ndarray
    ) -> np.ndarray:
        """:meth:`_attend` for every item of ``step``; the items with one new token (the
        decoding sequences) in one backend call, which shares their work among the
        threads, the others one by one. ``q [ΣT, H, D]`` → ``[ΣT, H, D]``."""
        dec = step.decode_rows
        caches = [it.cache.view(i, it.cache.length + 1) for it in step.decoding]
        if len(dec) == len(step.items):  # all decoding (the steady state): no gather/scatter
            return self.backend.attention_decode(q, caches, k, v)
        a = np.empty_like(q)
        for it, lo, hi in zip(step.items, step.los, step.his, strict=True):
            if hi - lo > 1:
                a[lo:hi] = self._attend(i, it, q[lo:hi], k[lo:hi], v[lo:hi])
        if dec:
            a[dec] = self.backend.attention_decode(q[dec], caches, k[dec], v[dec])
        return a

    def _feed_forward(self, layer: LayerWeights, x: np.ndarray) -> np.ndarray:
        """The FFN branch: ``act(gate) * up``, sub-norm, down projection. ``[T, dim]`` → same."""
        eps = self.config.norm_eps
        h = self.backend.rmsnorm(x, layer.ffn_norm, eps)  # [T, dim]
        gate = self.backend.bitlinear(h, layer.ffn_gate)  # [T, ffn_dim]
        up = self.backend.bitlinear(h, layer.ffn_up)  # [T, ffn_dim]
        f = self.gated(gate, up)  # [T, ffn_dim]
        if layer.ffn_sub_norm is not None:  # BitNet: sub-norm BEFORE down_proj
            f = self.backend.rmsnorm(f, layer.ffn_sub_norm, eps)
        return self.backend.bitlinear(f, layer.ffn_down)  # [T, dim]

    def _check_tokens(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        ids = np.asarray(tokens)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"forward needs a non-empty 1-D token sequence, got shape {ids.shape}")
        if ids.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got {ids.dtype}")
        bad = (ids < 0) | (ids >= self.config.vocab_size)
        if bad.any():
            last = self.config.vocab_size - 1
            raise ValueError(f"token id {int(ids[bad][0])} is outside the vocabulary (0..{last})")
        return ids.astype(np.int64)

    def _check_cache(self, cache: KVCache, n_new: int) -> None:
        c = self.config
        expected = (c.n_layers, c.n_kv_heads, c.head_dim)
        if cache.layout != expected:
            raise ValueError(f"cache of layout {cache.layout} does not fit this model {expected}")
        cache.check_room(n_new)
        if cache.length + n_new > c.context_length:
            raise ContextFullError(cache.length, n_new, c.context_length)


def decode_layer(layer: LayerWeights) -> DecodeLayer:
    """``layer`` as the native decode step reads it."""
    norms = (layer.attn_norm, layer.attn_sub_norm, layer.ffn_norm, layer.ffn_sub_norm,
             layer.attn_q_norm, layer.attn_k_norm)  # fmt: skip
    return DecodeLayer(norms, tuple(getattr(layer, p) for p in PROJECTIONS))


def decode_shape(c: ModelConfig) -> DecodeShape:
    return DecodeShape(
        n_layers=c.n_layers, dim=c.dim, q_dim=c.q_dim, kv_dim=c.kv_dim, n_heads=c.n_heads,
        n_kv_heads=c.n_kv_heads, head_dim=c.head_dim, ffn_dim=c.ffn_dim, eps=c.norm_eps,
        residual_scale=c.residual_scale, silu=c.activation != "relu2",
    )  # fmt: skip
