"""The C kernels (``bitserve.kernels._native``) behind the :class:`Backend` interface.

``NativeBackend("avx512" | "avx2" | "scalar", threads, head="f16" | "int8")`` owns one
thread pool (created once, shared by every kernel) and writes into freshly allocated numpy
outputs. ``avx512`` is the AVX2 path with an AVX-512 VNNI ternary matmul. ``bitlinear``
equals :class:`NumpyBackend` bit for bit on every path; the head and the attention equal it
to float tolerance (different summation order). Every kernel is batch invariant: a token's
result is the same bits whatever T (tokens in the call) and the thread count.

``head="int8"`` quantizes the (F16) embedding once per row (the activation quantizer's
rule, per-row absmax) and reads 1 byte per weight instead of 2 for every generated token:
the head is the largest single read of a token. It changes logits slightly (top-1 agrees
almost always; see tests/kernels/test_head_attention.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from bitserve.kernels.backend import Backend, HeadInput, as_matrix, storing
from bitserve.kernels.decode import DecodeLayer, DecodePlan, DecodeShape
from bitserve.kernels.tensors import ActQuant, TernaryWeight

try:
    from bitserve.kernels import _native  # type: ignore[attr-defined]
except ImportError:  # not built: only the numpy backend is available
    _native = None

IMPLS = {"scalar": 0, "avx2": 1, "avx512": 2}
# EmbKind of the heads read through head_packed (native.h); int8: +1 for blocks of 32
PACKED_HEADS = {"bf16": 3, "int8": 4}
HEAD_MODES = ("f16", "int8")


def _c(a: np.ndarray | None, dtype: type | None = None) -> np.ndarray:
    """``a`` as the kernels take an array: C-contiguous, of ``dtype`` (if given) and aligned to
    its items (a copy only if it is not: numpy views of bytes at an odd offset are not, and
    the kernels reject them)."""
    a = np.ascontiguousarray(a, dtype=dtype)
    return a if a.flags.aligned else a.copy()


def _kv_inputs(k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """K/V caches as the kernels read them: float16 if they are, else float32. Arrays the
    kernels take as they are (one dtype, one layout, each head's values contiguous, any
    nonnegative position/head strides: a head-major KVCache view; aligned) are never copied."""
    dtype = np.float16 if k.dtype == np.float16 else np.float32
    as_is = k.dtype == dtype and v.dtype == dtype and k.strides == v.strides and k.ndim == 3
    whole = all(s >= 0 and s % k.itemsize == 0 for s in k.strides)  # in elements, forward
    if as_is and whole and k.strides[2] == k.itemsize and k.flags.aligned and v.flags.aligned:
        return k, v
    return _c(k, dtype), _c(v, dtype)


def _f32(x: np.ndarray | None) -> np.ndarray:
    return _c(x, np.float32)


MAX_FUSED = 8  # weights per fused call (POOL_MAX_FUSED in native.h)


def _fusable(a: TernaryWeight, b: TernaryWeight) -> bool:
    """Whether two weights can share one fused call: the same input width and layout."""
    same = a.n_in == b.n_in and a.blocked == b.blocked and a.tiled == b.tiled
    return same and (not a.blocked or (a.group == b.group and a.act_quant == b.act_quant))


def native_available() -> bool:
    """True when the C extension is built and importable."""
    return _native is not None


def available_kernels() -> list[str]:
    """Native paths that can run on this machine, fastest first."""
    if _native is None:
        return []
    fast = [("avx512", _native.cpu_has_avx512()), ("avx2", _native.cpu_has_avx2())]
    return [name for name, ok in fast if ok] + ["scalar"]


def default_threads() -> int:
    """Physical cores available to this process (one thread per core: the kernels are
    memory- or SIMD-bound, so SMT siblings add contention, not speed)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    try:
        with open("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list") as f:
            siblings = _count_cpus(f.read())
    except OSError:
        siblings = 1
    return max(1, cpus // max(1, siblings))


def _count_cpus(cpu_list: str) -> int:
    """Number of CPUs in a Linux cpu list such as ``"0,4"`` or ``"0-1"``."""
    count = 0
    for part in cpu_list.strip().split(","):
        lo, _, hi = part.partition("-")
        count += int(hi) - int(lo) + 1 if hi else 1
    return count


class NativeBackend(Backend):
    """The C kernels on one path (``kernel``) with one thread pool of ``threads`` threads."""

    def __init__(self, kernel: str = "avx2", threads: int | None = None, head: str = "f16") -> None:
        if _native is None:
            raise RuntimeError("the native kernels are not built (pip install -e . builds them)")
        if kernel not in IMPLS:
            raise ValueError(f"unknown native kernel {kernel!r}; expected one of {sorted(IMPLS)}")
        if kernel not in available_kernels():
            raise ValueError(f"kernel {kernel!r} cannot run on this CPU")
        if head not in HEAD_MODES:
            raise ValueError(f"head must be one of {HEAD_MODES}, got {head!r}")
        self.name = kernel
        self.head_mode = head
        self._impl = IMPLS[kernel]
        self.tiles_heads = kernel != "scalar"  # the AVX2/AVX-512 head blocks read tiles
        self.tiles_ternary = kernel == "avx512"  # its 4-row I2_S tiles do (AVX2 reads rows)
        self._pool: Any = _native.Pool(threads or default_threads())
        # int8 head: the source embedding (kept alive so identity stays meaningful) → (q, s)
        self._head_source: np.ndarray | None = None
        self._head_int8: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def threads(self) -> int:
        return int(self._pool.threads)

    def bitlinear(self, x: np.ndarray, w: TernaryWeight) -> np.ndarray:
        x = _c(x, np.float32)
        out = np.empty((x.shape[0], w.n_out), dtype=np.float32)
        if w.blocked:
            gps = 256 // w.group
            block32 = w.act_quant == ActQuant.BLOCK32
            self._pool.bitlinear_blocked(
                x, w.raw, _c(w.scales), w.n_out, gps, block32, w.scale, out, self._impl
            )
        else:
            self._pool.bitlinear(x, w.raw, w.tiled, w.n_out, w.scale, out, self._impl)
        return out

    def bitlinear_many(self, x: np.ndarray, weights: Sequence[TernaryWeight]) -> list[np.ndarray]:
        """One task for all the weights when they share a layout (and, blocked, a group size
        and activation mode): one quantization, one wake-up, one barrier."""
        first = weights[0] if weights else None
        if (
            first is None
            or len(weights) > MAX_FUSED
            or not all(_fusable(first, w) for w in weights)
        ):
            return super().bitlinear_many(x, weights)
        x = _c(x, np.float32)
        outs = tuple(np.empty((x.shape[0], w.n_out), dtype=np.float32) for w in weights)
        n_outs = tuple(w.n_out for w in weights)
        scales = tuple(w.scale for w in weights)
        if first.blocked:
            block32 = first.act_quant == ActQuant.BLOCK32
            codes, block_scales = (
                tuple(w.raw for w in weights),
                tuple(_c(w.scales) for w in weights),
            )
            self._pool.bitlinear_blocked_many(
                x,
                codes,
                block_scales,
                n_outs,
                256 // first.group,
                block32,
                scales,
                outs,
                self._impl,
            )
        else:
            self._pool.bitlinear_many(
                x, tuple(w.raw for w in weights), first.tiled, n_outs, scales, outs, self._impl
            )
        return list(outs)

    def head(self, x: np.ndarray, embedding: HeadInput) -> np.ndarray:
        m = as_matrix(embedding)
        if m.ternary is not None:
            return self.bitlinear(x, m.ternary)
        x = _c(x, np.float32)
        out = np.empty((x.shape[0], m.n_rows), dtype=np.float32)
        if m.kind == "int8":
            kind = PACKED_HEADS["int8"] + (m.block == 32)
            self._pool.head_packed(x, m.int8_rows(), kind, out, self._impl)
            return out
        assert m.data is not None
        if m.kind == "bf16":
            rows = m.data.view(np.uint8)
            self._pool.head_packed(x, rows, PACKED_HEADS["bf16"], out, self._impl, m.tiled)
        elif self.int8_head(m):
            if m.tiled:
                raise ValueError("an int8 head is made from plain F16 rows, not tiled ones")
            q, scale = self.prepare_head(m.data)
            self._pool.head(x, q, scale, out, self._impl)
        else:
            self._pool.head(x, _c(m.data), None, out, self._impl, m.tiled)
        return out

    def prepare_head(self, embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The int8 head of an F16 ``embedding [vocab, dim]``: ``(q int8 [vocab, dim],
        row scale f32 [vocab])`` with ``row ≈ q / scale``. Computed once per embedding (call
        it at load time to keep the ~1 s it takes for 2B-4T out of the first token)."""
        if self._head_int8 is None or self._head_source is not embedding:
            emb = _c(embedding, np.float16)
            q = np.empty(emb.shape, dtype=np.int8)
            scale = np.empty(emb.shape[0], dtype=np.float32)
            self._pool.quantize_f16_rows(emb, q, scale, self._impl)
            self._head_source, self._head_int8 = embedding, (q, scale)
        return self._head_int8

    def attention(
        self,
        q: np.ndarray,
        k_cache: np.ndarray,
        v_cache: np.ndarray,
        start_pos: int,
        k_new: np.ndarray | None = None,
        v_new: np.ndarray | None = None,
    ) -> np.ndarray:
        q = _c(q, np.float32)
        out = np.empty_like(q)
        if not storing(k_new, v_new):
            k, v = _kv_inputs(k_cache, v_cache)
            self._pool.attention(q, k, v, start_pos, out, self._impl)
        else:  # stored into the caches themselves: never a converted copy of them
            new = _f32(k_new), _f32(v_new)
            self._pool.attention(q, k_cache, v_cache, start_pos, out, self._impl, *new)
        return out

    def attention_decode(
        self,
        q: np.ndarray,
        caches: Sequence[tuple[np.ndarray, np.ndarray]],
        k_new: np.ndarray | None = None,
        v_new: np.ndarray | None = None,
    ) -> np.ndarray:
        """All the sequences in one task (their chunks shared by the threads)."""
        q = _c(q, np.float32)
        out = np.empty_like(q)
        if not storing(k_new, v_new):
            pairs = [_kv_inputs(k, v) for k, v in caches]
            ks, vs = tuple(k for k, _ in pairs), tuple(v for _, v in pairs)
            self._pool.attention_decode(q, ks, vs, out, self._impl)
        else:
            ks, vs = tuple(k for k, _ in caches), tuple(v for _, v in caches)
            new = _f32(k_new), _f32(v_new)
            self._pool.attention_decode(q, ks, vs, out, self._impl, *new)
        return out

    def decode_plan(self, layers: Sequence[DecodeLayer], shape: DecodeShape) -> DecodePlan:
        return DecodePlan(layers, shape)

    def decode_token(
        self, plan: DecodePlan, x: np.ndarray, k: np.ndarray, v: np.ndarray, pos: int,
        cos: np.ndarray, sin: np.ndarray,
    ) -> None:  # fmt: skip
        s = plan.shape
        self._pool.decode_token(
            plan.table,
            plan.shape_fields,
            float(s.eps),
            float(s.residual_scale),
            x,
            k,
            v,
            int(pos),
            _f32(cos),
            _f32(sin),
            self._impl,
        )

    def rmsnorm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        x = _c(x, np.float32)
        weight = _c(weight, np.float32)
        if x.ndim == 2:  # the per-layer decode case: no reshapes (~0.5 µs of 1.6 per call)
            out = np.empty_like(x)
            self._pool.rmsnorm(x, weight, float(eps), out, self._impl)
            return out
        rows = x.reshape(-1, x.shape[-1])
        out = np.empty(rows.shape, dtype=np.float32)
        self._pool.rmsnorm(rows, weight, float(eps), out, self._impl)
        return out.reshape(x.shape)

    def relu2_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return self._gate(self._pool.relu2_mul, gate, up)

    def silu_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return self._gate(self._pool.silu_mul, gate, up)

    def _gate(self, fn: Any, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        gate = _c(gate, np.float32)
        up = _c(up, np.float32)
        rows = gate.reshape(-1, gate.shape[-1])
        out = np.empty(rows.shape, dtype=np.float32)
        fn(rows, up.reshape(rows.shape), out, self._impl)
        return out.reshape(gate.shape)

    def rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        x = _c(x, np.float32)
        out = np.empty_like(x)
        self._pool.rope(
            x,
            _c(cos, np.float32),
            _c(sin, np.float32),
            out,
        )
        return out

    # --- kernels exposed for tests and the bench -----------------------------------

    def quantize(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(q int8 [T, K], scale f32 [T], Σq int32 [T])`` of ``x [T, K]``."""
        x = _c(x, np.float32)
        q = np.empty(x.shape, dtype=np.int8)
        scale = np.empty(x.shape[0], dtype=np.float32)
        total = np.empty(x.shape[0], dtype=np.int32)
        self._pool.quantize(x, q, scale, total, self._impl)
        return q, scale, total

    def ternary_int(self, q: np.ndarray, w: TernaryWeight) -> np.ndarray:
        """Exact int32 ``q [T, K] @ ternaryᵀ`` → ``[T, n_out]`` (the matmul before scaling)."""
        q = _c(q, np.int8)
        total = q.astype(np.int32).sum(axis=1, dtype=np.int32)
        acc = np.empty((q.shape[0], w.n_out), dtype=np.int32)
        self._pool.ternary_int(q, total, w.raw, w.tiled, w.n_out, acc, self._impl)
        return acc

    def read_memory(self, buffer: np.ndarray) -> int:
        """Read every cache line of ``buffer`` with all threads (bandwidth probe)."""
        return int(self._pool.read_memory(buffer, self._impl))
