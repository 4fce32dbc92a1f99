"""The weights the kernels take: ternary projections and embedding/head matrices of any type.

``TernaryWeight`` is one of two layouts:
- **I2_S** (``group == 0``): bitnet.cpp's bytes as on disk (zero copy from the memory map) and
  ONE f32 scale per tensor. TQ1_0/TQ2_0 tensors whose block scales are all the same value
  (BitNet conversions) are repacked into it: the fastest kernel, and exact. Its rows may be
  stored tiled (``tiled``: :func:`tile_rows`, each 4 rows' 64-byte lines in turn, the order
  the AVX-512 kernel reads them), which every reader here and in C understands.
- **blocked** (``group`` 64, 128 or 256): per-block f16 scales kept as they are, codes
  repacked once at load into super-blocks of 256 weights (64 bytes) laid out for the SIMD dot
  products: byte ``4L + i`` holds, in bits ``2j..2j+1``, the code of weight ``16L + 4j + i``,
  so 32-bit lane ``L`` of a 64-byte load sums weights ``16L..16L+15`` — one group scale and one
  32-activation block per lane. Q2_0 (either variant), TQ1_0/TQ2_0 with differing scales.
  Rows are padded with zero weights (and zero scales) to whole super-blocks.

Codes are ``weight + 1`` (0..3: Q2_0's fourth code, +2, is taken as it is).

``ActQuant`` says how a bitlinear quantizes its input, as the model was trained (or, for
weight-only ternary models, as close to float as int8 gets): ``PER_TOKEN`` one absmax int8
scale per token (BitNet b1.58: every BitNet-trained family); ``BLOCK32`` one scale per 32
activations (llama.cpp's Q8_0 path, which Ternary-Bonsai's authors ship: their model keeps
float activations, and a per-32 scale is far closer to float than a per-token one). The
default follows the type (:data:`DEFAULT_ACT_QUANT`); an architecture can say otherwise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from bitserve.gguf.constants import I2S_SCALE_PAD, TERNARY_TYPES, GGMLType
from bitserve.gguf.dense_quants import unpack_int8_blocks
from bitserve.gguf.quants import i2s_scale, pack_i2s, unpack_i2s_codes, unpack_ternary
from bitserve.gguf.reader import GGUFError, GGUFFile

try:  # the C repacking: seconds for an 8B model where numpy takes over a minute
    from bitserve.kernels import _native  # type: ignore[attr-defined]
except ImportError:  # not built: the numpy definitions below do the same, slowly
    _native = None

SUPER_BLOCK = 256  # weights per super-block of the blocked layout
SUPER_BYTES = 64
LANES = 16  # 32-bit lanes of a super-block: 16 weights each
ACT_BLOCK = 32  # activations per BLOCK32 scale

# The tiled layout of a float head and of I2_S codes (csrc/native.h: lm_head,
# TILE_ROWS): each TILE_ROWS rows stored as one run of their 64-byte lines in turn, so
# a kernel that reads those rows together reads one linear stream instead of TILE_ROWS
# interleaved ones; the last n_rows mod TILE_ROWS rows stay as they are.
TILE_ROWS = 4
LINE = 64


def can_tile(rows: np.ndarray) -> bool:
    """True when ``rows [n, dim]`` (C-contiguous) are whole 64-byte lines each."""
    return rows.ndim == 2 and rows.flags.c_contiguous and rows.shape[1] * rows.itemsize % LINE == 0


def _whole_tile_rows(n_rows: int) -> int:
    """Rows of an ``n_rows`` matrix that fall in whole tiles (the rest stay plain)."""
    return n_rows // TILE_ROWS * TILE_ROWS


def _tile_view(raw: np.ndarray) -> np.ndarray:
    """The whole tiles of uint8 ``raw [n, row_bytes]`` as ``[tile, line, row, 64]``."""
    n = _whole_tile_rows(raw.shape[0])
    return raw[:n].reshape(n // TILE_ROWS, raw.shape[1] // LINE, TILE_ROWS, LINE)


def tile_rows(rows: np.ndarray, out: np.ndarray) -> None:
    """``rows [n, dim]`` written into ``out`` (same shape and dtype, C-contiguous; ``rows``
    itself, or apart from it) in the tiled layout (by the C extension where built)."""
    if _native is not None:
        _native.tile_rows(rows.view(np.uint8), out.view(np.uint8))
    else:
        _tile_rows_numpy(rows, out)


def _tile_rows_numpy(rows: np.ndarray, out: np.ndarray) -> None:
    """:func:`tile_rows` without the C extension (the definition the C one meets)."""
    src, dst = rows.view(np.uint8), out.view(np.uint8)
    n = _whole_tile_rows(src.shape[0])
    tiles = src[:n].reshape(n // TILE_ROWS, TILE_ROWS, src.shape[1] // LINE, LINE)
    _tile_view(dst)[...] = tiles.transpose(0, 2, 1, 3)
    dst[n:] = src[n:]


def tiled_rows(tiled: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` of a matrix stored by :func:`tile_rows`, as plain rows."""
    raw = tiled.view(np.uint8)
    n_whole = _whole_tile_rows(raw.shape[0])
    out = np.empty((len(idx), raw.shape[1]), dtype=np.uint8)
    whole = idx < n_whole
    picked = idx[whole]
    tiles = _tile_view(raw)[picked // TILE_ROWS, :, picked % TILE_ROWS]  # [k, line, 64]
    out[whole] = tiles.reshape(len(picked), raw.shape[1])
    out[~whole] = raw[idx[~whole]]
    return out.view(tiled.dtype)


class ActQuant(str, Enum):
    """How a bitlinear quantizes its activations to int8 (module docstring)."""

    PER_TOKEN = "per_token"
    BLOCK32 = "block32"


# The activation quantization each ternary type's models were made for: Q2_0 is
# Ternary-Bonsai's (float-activation training, served by llama.cpp with Q8_0 activations);
# I2_S and TQ1_0/TQ2_0 hold BitNet b1.58 families (per-token absmax int8).
DEFAULT_ACT_QUANT: dict[GGMLType, ActQuant] = {
    GGMLType.I2_S: ActQuant.PER_TOKEN,
    GGMLType.TQ1_0: ActQuant.PER_TOKEN,
    GGMLType.TQ2_0: ActQuant.PER_TOKEN,
    GGMLType.Q2_0: ActQuant.BLOCK32,
}


@dataclass(eq=False, slots=True)
class TernaryWeight:
    """A BitLinear weight ``[n_out, n_in]`` (module docstring). I2_S: ``raw`` is
    ``n_out*n_in/4 + 32`` bytes, ``scale`` the tensor scale; with ``tiled`` its rows are in
    the tiled layout (:func:`tile_rows`, made by :meth:`tiled_copy`). Blocked: ``raw`` is the codes
    ``uint8 [n_out, 64·n_super]``, ``scales`` f16 ``[n_out, n_super·256/group]``, ``scale`` a
    factor on every output (1 unless :meth:`with_output_scale`)."""

    raw: np.ndarray
    n_out: int
    n_in: int
    scale: float
    scales: np.ndarray | None = None
    group: int = 0
    act_quant: ActQuant = ActQuant.PER_TOKEN
    source: GGMLType = GGMLType.I2_S
    tiled: bool = False
    _ternary_f32: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.group == 0 and self.act_quant != ActQuant.PER_TOKEN:
            raise ValueError("an I2_S weight quantizes activations per token only")
        if self.tiled and not self.can_tile:
            layout = "blocked" if self.blocked else "I2_S"
            raise ValueError(
                f"a tiled weight is I2_S with rows of whole 64-byte lines, "
                f"not [{self.n_out}, {self.n_in}] {layout}"
            )
        if self.group and (self.scales is None or self.group not in (64, 128, 256)):
            raise ValueError("a blocked weight needs scales and a group of 64/128/256 weights")

    @property
    def blocked(self) -> bool:
        return self.group != 0

    @property
    def can_tile(self) -> bool:
        """True for I2_S whose rows are whole 64-byte lines (the tiled layout can hold it)."""
        return not self.blocked and self.n_in % (4 * LINE) == 0

    @property
    def n_super(self) -> int:
        """Super-blocks per row (blocked layout)."""
        return -(-self.n_in // SUPER_BLOCK)

    @property
    def nbytes(self) -> int:
        """Bytes one pass over the weight reads (codes and scales)."""
        if not self.blocked:
            return self.n_out * self.n_in // 4
        assert self.scales is not None
        return int(self.raw.nbytes + self.scales.nbytes)

    @classmethod
    def from_gguf(
        cls,
        gguf: GGUFFile,
        name: str,
        n_out: int,
        n_in: int,
        row_order: np.ndarray | None = None,
        act_quant: ActQuant | None = None,
    ) -> TernaryWeight:
        """Tensor ``name`` of any ternary type as a weight ``[n_out, n_in]``.

        ``row_order``: output row ``i`` is the file's row ``row_order[i]`` (a permutation; e.g.
        to undo llama.cpp's q/k row permutation). ``act_quant``: default by type
        (:data:`DEFAULT_ACT_QUANT`). I2_S without ``row_order`` stays a zero-copy view;
        everything else is a copy made here. Raises :class:`GGUFError` naming the tensor.
        """
        info = gguf.tensor_info(name)
        if info.shape != (n_out, n_in):
            raise GGUFError(
                gguf.path, f"tensor {name!r} has shape {info.shape}, expected {(n_out, n_in)}"
            )
        gtype = info.ggml_type
        if gtype not in TERNARY_TYPES:
            allowed = ", ".join(t.name for t in TERNARY_TYPES)
            raise GGUFError(gguf.path, f"tensor {name!r} is {gtype.name}, not ternary ({allowed})")
        act = act_quant or DEFAULT_ACT_QUANT[gtype]
        order = _check_order(row_order, n_out, gguf, name)
        raw = gguf.raw(name)
        if gtype == GGMLType.I2_S:
            if act != ActQuant.PER_TOKEN:
                raise GGUFError(
                    gguf.path,
                    f"tensor {name!r}: I2_S holds one f32 scale per tensor; "
                    f"{act.value} activations need block-scaled weights",
                )
            scale = i2s_scale(raw, n_out, n_in)
            if order is not None:
                codes = raw[: n_out * n_in // 4].reshape(n_out, n_in // 4)[order]
                copied = np.concatenate([codes.reshape(-1), raw[n_out * n_in // 4 :]])
                gguf.release(raw)
                raw = copied
            return cls(raw, n_out, n_in, scale, source=gtype)
        if _native is None:
            return cls._from_raw_numpy(raw, gtype, n_out, n_in, gguf.q2_0_block, order, act)
        if gtype != GGMLType.Q2_0 and act == ActQuant.PER_TOKEN:
            one, bits = _native.ternary_scan(raw, int(gtype), n_out, n_in)
            if one:  # BitNet conversions: the I2_S path
                scale = float(np.array(bits, dtype=np.uint16).view(np.float16))
                out = np.empty(n_out * n_in // 4 + I2S_SCALE_PAD, dtype=np.uint8)
                _native.repack_tq_i2s(raw, int(gtype), n_out, n_in, order, out[: n_out * n_in // 4])
                out[n_out * n_in // 4 :] = pack_i2s(np.zeros((1, 128), np.int8), scale)[
                    -I2S_SCALE_PAD:
                ]
                gguf.release(raw)  # copied: the file's pages need not stay mapped
                return cls(out, n_out, n_in, scale, source=gtype)
        block = gguf.q2_0_block if gtype == GGMLType.Q2_0 else 256
        n_super = -(-n_in // SUPER_BLOCK)
        codes = np.empty((n_out, n_super * SUPER_BYTES), dtype=np.uint8)
        scales = np.empty((n_out, n_super * SUPER_BLOCK // block), dtype=np.float16)
        _native.repack_blocked(raw, int(gtype), block, n_out, n_in, order, codes, scales)
        gguf.release(raw)
        return cls(codes, n_out, n_in, 1.0, scales, block, act, gtype)

    @classmethod
    def _from_raw_numpy(
        cls,
        raw: np.ndarray,
        gtype: GGMLType,
        n_out: int,
        n_in: int,
        q2_0_block: int,
        order: np.ndarray | None,
        act: ActQuant,
    ) -> TernaryWeight:
        """:meth:`from_gguf` without the C extension (the definition the C repacking meets)."""
        values, scales = unpack_ternary(raw, gtype, n_out, n_in, q2_0_block)
        values[np.repeat(scales == 0, n_in // scales.shape[1], axis=1)] = 0  # d = 0: all zero
        if order is not None:
            values, scales = values[order], scales[order]
        one = _one_scale(values, scales)
        if act == ActQuant.PER_TOKEN and one is not None:  # BitNet conversions: the I2_S path
            return cls(pack_i2s(values, one), n_out, n_in, one, source=gtype)
        return cls.from_values(values, scales, act, source=gtype)

    @classmethod
    def from_values(
        cls,
        values: np.ndarray,
        scales: np.ndarray,
        act_quant: ActQuant = ActQuant.PER_TOKEN,
        source: GGMLType = GGMLType.Q2_0,
    ) -> TernaryWeight:
        """A blocked weight from ``values int8 [n_out, n_in]`` (-1..2) and block scales
        ``[n_out, n_in / group]`` (f16-representable; ``group`` 64, 128 or 256)."""
        n_out, n_in = values.shape
        group = n_in // scales.shape[1]
        if (
            scales.shape[0] != n_out
            or group * scales.shape[1] != n_in
            or group not in (64, 128, 256)
        ):
            raise ValueError(f"scales {scales.shape} do not split rows of {n_in} into 64/128/256")
        codes, lane_scales = repack_blocked(values, scales, group)
        return cls(codes, n_out, n_in, 1.0, lane_scales, group, act_quant, source)

    def with_output_scale(self, factor: float) -> TernaryWeight:
        """This weight with every output multiplied by ``factor`` (a file's separate
        per-tensor scale, e.g. upstream ``bitnet``'s ``blk.N.attn_q.scale``): I2_S folds it
        into its tensor scale, blocked weights multiply their outputs by ``scale``."""
        return dataclasses.replace(
            self, scale=float(np.float32(self.scale * factor)), _ternary_f32=None
        )

    def tiled_copy(self, out: np.ndarray | None = None) -> TernaryWeight:
        """This I2_S weight with its codes in the tiled layout, written into ``out`` (uint8,
        ``raw``'s size) or a new array; the bits of every product stay the same. ``out`` may
        be ``raw`` itself (in place, fastest: this weight is then no longer valid)."""
        if self.tiled or not self.can_tile:
            raise ValueError(f"[{self.n_out}, {self.n_in}] cannot be tiled (again)")
        out = np.empty_like(self.raw) if out is None else out
        if out.dtype != np.uint8 or out.shape != self.raw.shape or not out.flags.c_contiguous:
            raise ValueError(
                f"out must be C-contiguous uint8 {self.raw.shape}, not {out.dtype} {out.shape}"
            )
        n = self.n_out * self.n_in // 4
        tile_rows(self._plain_rows(), out[:n].reshape(self.n_out, -1))
        out[n:] = self.raw[n:]
        return dataclasses.replace(self, raw=out, tiled=True, _ternary_f32=None)

    def _plain_rows(self, ids: np.ndarray | None = None) -> np.ndarray:
        """I2_S codes as plain rows ``uint8 [n_out, n_in/4]`` (or rows ``ids``)."""
        row_bytes = self.n_in // 4
        rows = self.raw[: self.n_out * row_bytes].reshape(self.n_out, row_bytes)
        if self.tiled:
            return tiled_rows(rows, np.arange(self.n_out) if ids is None else ids)
        return rows if ids is None else rows[ids]

    def codes(self) -> np.ndarray:
        """Codes 0..3 (weight + 1) as uint8 ``[n_out, n_in]`` in natural order (oracle, tests)."""
        if not self.blocked:
            plain = self._plain_rows().reshape(-1)
            return (unpack_i2s_codes(plain, self.n_out, self.n_in) + 1).astype(np.uint8)
        return unpack_blocked(self.raw, self.n_out, self.n_super)[:, : self.n_in]

    def block_scales(self) -> np.ndarray:
        """f32 ``[n_out, n_in / group]`` (I2_S: ``[n_out, 1]`` of the tensor scale)."""
        if not self.blocked:
            return np.full((self.n_out, 1), self.scale, dtype=np.float32)
        assert self.scales is not None
        return self.scales.astype(np.float32)[:, : self.n_in // self.group]

    def dequantize_rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` as float32 ``[len(ids), n_in]`` (an embedding lookup)."""
        values = self._rows_codes(ids).astype(np.float32) - 1
        if self.blocked:  # only the rows asked for: a lookup must not touch the whole table
            assert self.scales is not None
            scales = self.scales[ids, : self.n_in // self.group].astype(np.float32)
        else:
            scales = np.full((len(ids), 1), self.scale, dtype=np.float32)
        group = self.group or self.n_in
        out: np.ndarray = values * np.repeat(scales, group, axis=1)
        return out

    def _rows_codes(self, ids: np.ndarray) -> np.ndarray:
        if not self.blocked:
            rows = self._plain_rows(np.asarray(ids)).reshape(-1)
            return (unpack_i2s_codes(rows, len(ids), self.n_in) + 1).astype(np.uint8)
        return unpack_blocked(self.raw[ids], len(ids), self.n_super)[:, : self.n_in]

    def ternary_f32(self) -> np.ndarray:
        """The weights -1/0/+1 as float32 ``[n_out, n_in]``, unpacked once (numpy I2_S path)."""
        if self._ternary_f32 is None:
            codes = unpack_i2s_codes(self._plain_rows().reshape(-1), self.n_out, self.n_in)
            self._ternary_f32 = codes.astype(np.float32)
        return self._ternary_f32


def _check_order(order: np.ndarray | None, n: int, gguf: GGUFFile, name: str) -> np.ndarray | None:
    if order is None:
        return None
    order = np.asarray(order)
    if order.shape != (n,) or not np.array_equal(np.sort(order), np.arange(n)):
        raise GGUFError(gguf.path, f"tensor {name!r}: row_order is not a permutation of {n} rows")
    return order.astype(np.int64)


def _one_scale(values: np.ndarray, scales: np.ndarray) -> float | None:
    """The scale every block holding a nonzero weight shares exactly, if there is one (and no
    code is +2); ``0.0`` for an all-zero tensor; ``None`` when the blocks differ."""
    n_rows, n_groups = scales.shape
    blocks = values.reshape(n_rows, n_groups, -1)
    if np.any(blocks > 1):
        return None
    active = scales[np.any(blocks != 0, axis=2)]
    if active.size == 0:
        return 0.0
    return float(active[0]) if np.all(active == active[0]) else None


# ---- the blocked layout (module docstring): numpy reference of the repacking ----------------


def repack_blocked(
    values: np.ndarray, scales: np.ndarray, group: int
) -> tuple[np.ndarray, np.ndarray]:
    """``values int8 [n, k]`` (-1..2), ``scales [n, k/group]`` → ``(codes uint8 [n, 64·S],
    scales f16 [n, S·256/group])`` with ``S = ceil(k/256)`` super-blocks, zero-padded."""
    n, k = values.shape
    n_super = -(-k // SUPER_BLOCK)
    codes = np.zeros((n, n_super * SUPER_BLOCK), dtype=np.uint8)
    codes[:, :k] = (values + 1).astype(np.uint8)
    # weight 16L + 4j + i → byte 4L + i, bits 2j: [n, S, L, j, i] → OR over j
    parts = codes.reshape(n, n_super, LANES, 4, 4) << (2 * np.arange(4, dtype=np.uint8))[:, None]
    packed = np.bitwise_or.reduce(parts, axis=3).reshape(n, n_super * SUPER_BYTES)
    padded = np.zeros((n, n_super * SUPER_BLOCK // group), dtype=np.float16)
    padded[:, : scales.shape[1]] = scales
    return packed, padded


def unpack_blocked(codes: np.ndarray, n: int, n_super: int) -> np.ndarray:
    """The inverse of :func:`repack_blocked`'s codes: uint8 ``[n, 256·n_super]`` (0..3)."""
    b = np.asarray(codes, dtype=np.uint8).reshape(n, n_super, LANES, 4)  # [n, S, L, i]
    out = np.empty((n, n_super, LANES, 4, 4), dtype=np.uint8)  # [n, S, L, j, i]
    for j in range(4):  # one plane at a time: 3.5x faster than one broadcast shift
        np.bitwise_and(b >> (2 * j), 3, out=out[:, :, :, j, :])
    return out.reshape(n, n_super * SUPER_BLOCK)


# ---- embeddings and LM heads -------------------------------------------------------------------

FLOAT_KINDS = {GGMLType.F32: "f32", GGMLType.F16: "f16", GGMLType.BF16: "bf16"}

INT8_BLOCK_TYPES = (GGMLType.Q8_0, GGMLType.Q6_K)
EMBEDDING_TYPES = (*FLOAT_KINDS, *INT8_BLOCK_TYPES, *TERNARY_TYPES)


@dataclass(eq=False, slots=True)
class EmbeddingMatrix:
    """Token embeddings or an LM head ``[n_rows, dim]`` of any type, as the head kernel reads it.

    ``kind``: ``"f32"``/``"f16"`` (``data``: a zero-copy view), ``"bf16"`` (``data``: the raw
    uint16 bits, zero copy), ``"int8"`` (Q8_0/Q6_K: the head reads :meth:`int8_rows`, uint8
    rows of ``dim`` int8 values then ``dim/block`` f32 scales, made on first use from the
    file's bytes ``raw``, so an embedding that is never a head costs no copy; ``data`` and
    ``scales`` are views of them once made), ``"ternary"`` (``ternary``: the head runs as a
    bitlinear).
    """

    kind: str
    n_rows: int
    dim: int
    source: GGMLType
    data: np.ndarray | None = None
    scales: np.ndarray | None = None
    block: int = 0
    ternary: TernaryWeight | None = None
    packed: np.ndarray | None = None  # int8: the rows as the kernel reads them (int8_rows)
    raw: np.ndarray | None = None  # int8 from a file: its Q8_0/Q6_K bytes
    tiled: bool = False  # f32/f16/bf16: ``data`` is in the tiled layout (tile_rows)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, self.dim)

    @property
    def nbytes(self) -> int:
        """Bytes one pass of the head reads."""
        if self.ternary is not None:
            return self.ternary.nbytes
        if self.kind == "int8":
            return self.n_rows * (self.dim + 4 * (self.dim // self.block))
        assert self.data is not None
        return int(self.data.nbytes)

    @classmethod
    def from_array(cls, array: np.ndarray) -> EmbeddingMatrix:
        """An F32/F16 ``[n_rows, dim]`` array as it is."""
        kinds = {np.dtype(np.float32): GGMLType.F32, np.dtype(np.float16): GGMLType.F16}
        source = kinds.get(array.dtype)
        if source is None or array.ndim != 2:
            raise ValueError(f"expected a float32/float16 matrix, got {array.dtype} {array.shape}")
        return cls(FLOAT_KINDS[source], array.shape[0], array.shape[1], source, data=array)

    @classmethod
    def from_gguf(
        cls,
        gguf: GGUFFile,
        name: str,
        n_rows: int,
        dim: int,
        act_quant: ActQuant | None = None,
    ) -> EmbeddingMatrix:
        """Tensor ``name`` (F32, F16, BF16, Q8_0, Q6_K or ternary) as ``[n_rows, dim]``;
        ``act_quant`` applies to a ternary head. Raises :class:`GGUFError` naming the tensor."""
        info = gguf.tensor_info(name)
        if info.shape != (n_rows, dim):
            raise GGUFError(
                gguf.path, f"tensor {name!r} has shape {info.shape}, expected {(n_rows, dim)}"
            )
        gtype = info.ggml_type
        if gtype in FLOAT_KINDS:
            raw = gguf.raw(name)
            data = raw.view("<u2") if gtype == GGMLType.BF16 else gguf.array(name)
            return cls(FLOAT_KINDS[gtype], n_rows, dim, gtype, data=data.reshape(n_rows, dim))
        if gtype in INT8_BLOCK_TYPES:
            block = 32 if gtype == GGMLType.Q8_0 else 16
            return cls("int8", n_rows, dim, gtype, block=block, raw=gguf.raw(name))
        if gtype in TERNARY_TYPES:
            w = TernaryWeight.from_gguf(gguf, name, n_rows, dim, act_quant=act_quant)
            return cls("ternary", n_rows, dim, gtype, ternary=w)
        allowed = ", ".join(t.name for t in EMBEDDING_TYPES)
        raise GGUFError(gguf.path, f"tensor {name!r} is {gtype.name}; supported: {allowed}")

    @classmethod
    def from_int8(cls, values: np.ndarray, scales: np.ndarray, source: GGMLType) -> EmbeddingMatrix:
        """int8 ``values [n_rows, dim]`` with f32 ``scales [n_rows, dim/block]`` (block 16 or
        32), packed row by row: values then scales, one stream per row for the head."""
        n_rows, dim = values.shape
        n_blocks = scales.shape[1]
        packed = np.empty((n_rows, dim + 4 * n_blocks), dtype=np.uint8)
        packed[:, :dim] = values.view(np.uint8)
        packed[:, dim:] = np.ascontiguousarray(scales, dtype="<f4").view(np.uint8)
        return cls._from_packed(packed, dim, dim // n_blocks, source)

    @classmethod
    def _from_packed(
        cls, packed: np.ndarray, dim: int, block: int, source: GGMLType
    ) -> EmbeddingMatrix:
        m = cls("int8", len(packed), dim, source, block=block)
        m._set_packed(packed)
        return m

    def _set_packed(self, packed: np.ndarray) -> None:
        self.packed = packed
        self.data, self.scales = (
            packed[:, : self.dim].view(np.int8),
            packed[:, self.dim :].view("<f4"),
        )

    def int8_rows(self) -> np.ndarray:
        """The int8 kind's rows as the head kernel reads them, made once (C at load speed)."""
        if self.packed is None:
            assert self.raw is not None
            if _native is None:
                values, scales = unpack_int8_blocks(self.raw, self.source, self.n_rows, self.dim)
                self._set_packed(EmbeddingMatrix.from_int8(values, scales, self.source).packed)  # type: ignore[arg-type]
            else:
                packed = np.empty((self.n_rows, self.dim + 4 * (self.dim // self.block)), np.uint8)
                _native.repack_int8_rows(self.raw, int(self.source), self.n_rows, self.dim, packed)
                self._set_packed(packed)
        assert self.packed is not None
        return self.packed

    def rows(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Rows ``ids`` as float32 ``[len(ids), dim]``: the embedding lookup."""
        idx = np.asarray(ids, dtype=np.int64)
        if self.ternary is not None:
            return self.ternary.dequantize_rows(idx)
        if self.kind == "int8" and self.packed is None:  # only these rows of the file
            assert self.raw is not None
            row_bytes = self.raw.nbytes // self.n_rows
            picked = self.raw.reshape(self.n_rows, row_bytes)[idx].reshape(-1)
            values, scales = unpack_int8_blocks(picked, self.source, len(idx), self.dim)
            return np.repeat(scales, self.block, axis=1) * values.astype(np.float32)
        assert self.data is not None
        picked = tiled_rows(self.data, idx) if self.tiled else self.data[idx]
        if self.kind == "bf16":
            out: np.ndarray = (picked.astype(np.uint32) << 16).view(np.float32)
            return out
        if self.kind == "int8":
            assert self.scales is not None
            scales = np.repeat(self.scales[idx], self.block, axis=1)
            return scales * picked.astype(np.float32)
        return picked.astype(np.float32)

    def dense_slice(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo..hi`` widened to float32 (the numpy head, slice by slice)."""
        return self.rows(np.arange(lo, min(hi, self.n_rows)))
