"""Model hyper-parameters read from GGUF metadata (spec §3), each range-checked at load.

A file whose metadata cannot describe a model (a head count of 0 or typed as a float, a
NaN epsilon, no layers...) is refused here with one sentence naming the key, never later
with a ``ZeroDivisionError`` or an all-NaN forward. The context a model serves is the
file's ``context_length`` capped by what this machine can hold (:func:`machine_context`),
so a file claiming 2^31 positions does not make the server allocate for them.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from typing import Any

from bitserve.gguf.constants import GGUFValueType
from bitserve.gguf.reader import GGUFError, GGUFFile
from bitserve.model.arch import ARCHITECTURES, SUPPORTED_ARCHITECTURES, Architecture

log = logging.getLogger(__name__)

__all__ = ["ACTIVATIONS", "SUPPORTED_ARCHITECTURES", "ModelConfig", "machine_context"]

LLAMA3_VOCAB_SIZE = 128256
ACTIVATIONS = ("relu2", "silu")
_ACTIVATION_ALIASES = {"relu2": "relu2", "relu_squared": "relu2", "silu": "silu", "swish": "silu"}
_INTEGER_TYPES = frozenset(
    {
        GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
        GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64,
    }
)  # fmt: skip
_NUMBER_TYPES = _INTEGER_TYPES | {GGUFValueType.FLOAT32, GGUFValueType.FLOAT64}
_NO_ROPE_SCALING = ("none", "linear")  # linear with factor 1 (upstream bitnet writes it)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """``key_length`` is the file's ``attention.key_length`` (0: ``dim // n_heads``), so
    ``n_heads * head_dim`` may differ from ``dim`` (Qwen3). ``context_length`` is what the
    model serves; ``train_context_length`` the file's (0: the same). ``embedding_scale``,
    ``residual_scale``, ``logit_scale`` are MiniCPM's (1 elsewhere): embeddings are
    multiplied by the first, each block's branch outputs by the second, logits divided by
    the third."""

    arch: str
    n_layers: int
    dim: int  # embedding_length
    ffn_dim: int  # feed_forward_length
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    context_length: int
    rope_dim: int
    rope_theta: float
    norm_eps: float
    activation: str  # "relu2" (squared ReLU) or "silu"
    key_length: int = 0
    train_context_length: int = 0
    embedding_scale: float = 1.0
    residual_scale: float = 1.0
    logit_scale: float = 1.0

    @property
    def architecture(self) -> Architecture:
        return ARCHITECTURES[self.arch]

    @property
    def head_dim(self) -> int:
        return self.key_length or self.dim // self.n_heads

    @property
    def training_context(self) -> int:
        """The context length the file declares (``context_length`` may be less)."""
        return self.train_context_length or self.context_length

    @property
    def q_dim(self) -> int:
        """Width of the attention output before ``o_proj``: ``n_heads * head_dim``."""
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def gqa_group(self) -> int:
        """Query heads per KV head: query head j reads KV head j // gqa_group."""
        return self.n_heads // self.n_kv_heads

    @property
    def kv_bytes_per_position(self) -> int:
        """Bytes of one position's keys and values in every layer, in float32."""
        return 2 * self.n_layers * self.kv_dim * 4

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, activation: str | None = None) -> ModelConfig:
        """Read and check the config; ``activation`` overrides the file's (tests use it).
        Raises :class:`GGUFError` with one sentence for any key out of range."""
        arch_name = gguf.get("general.architecture")
        if arch_name not in ARCHITECTURES:
            supported = ", ".join(SUPPORTED_ARCHITECTURES)
            raise GGUFError(
                gguf.path, f"unsupported architecture {arch_name!r}; supported: {supported}"
            )
        arch = ARCHITECTURES[arch_name]
        keys = _Keys(gguf, arch_name)
        dim = keys.integer("embedding_length")
        n_heads = keys.integer("attention.head_count", maximum=dim)
        n_kv_heads = keys.integer("attention.head_count_kv", n_heads, maximum=n_heads)
        if n_heads % n_kv_heads:
            raise GGUFError(gguf.path, f"{n_heads} heads do not group over {n_kv_heads} KV heads")
        head_dim = _head_dim(gguf, keys, dim, n_heads)
        rope_dim = keys.integer("rope.dimension_count", head_dim)
        if rope_dim != head_dim:
            raise GGUFError(gguf.path, f"partial RoPE ({rope_dim} of {head_dim}) is not supported")
        _check_rope_scaling(gguf, keys)
        vocab_size = _vocab_size(gguf, keys)
        train_context = keys.integer("context_length", 4096)
        chosen = activation or _activation(gguf, arch, vocab_size)
        if chosen not in ACTIVATIONS:
            raise GGUFError(gguf.path, f"unknown activation {chosen!r}")
        scales = _scales(keys) if arch.scaled else (1.0, 1.0, 1.0)
        config = cls(
            arch=arch_name,
            n_layers=keys.integer("block_count"),
            dim=dim,
            ffn_dim=keys.integer("feed_forward_length"),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            vocab_size=vocab_size,
            context_length=train_context,
            rope_dim=rope_dim,
            rope_theta=keys.number("rope.freq_base", 10000.0, minimum=0.0),
            norm_eps=keys.number("attention.layer_norm_rms_epsilon", 1e-5, 0.0, maximum=1.0),
            activation=chosen,
            key_length=head_dim,
            embedding_scale=scales[0],
            residual_scale=scales[1],
            logit_scale=scales[2],
        )
        served = min(train_context, machine_context(config))
        if served < train_context:
            log.warning(
                "%s: context_length %d needs more KV memory than this machine has; "
                "serving %d positions",
                gguf.path.name, train_context, served,
            )  # fmt: skip
        return replace(config, context_length=served, train_context_length=train_context)


def machine_context(config: ModelConfig) -> int:
    """Positions whose float32 keys and values fit in this machine's physical memory
    (at least 1): the most one sequence could ever use here."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # not POSIX: assume 16 GiB
        memory = 16 * 2**30
    return max(1, memory // config.kv_bytes_per_position)


class _Keys:
    """Typed, range-checked reads of ``<arch>.<name>`` keys; every failure is one sentence."""

    def __init__(self, gguf: GGUFFile, arch: str) -> None:
        self.gguf = gguf
        self.arch = arch

    def _raw(self, name: str, default: Any, types: frozenset[GGUFValueType], what: str) -> Any:
        key = f"{self.arch}.{name}"
        if key not in self.gguf.metadata:
            if default is None:
                raise GGUFError(self.gguf.path, f"missing metadata key {key}")
            return default
        vtype = self.gguf.metadata_types.get(key)
        value = self.gguf.metadata[key]
        if vtype not in types:
            kind = vtype.name if vtype is not None else type(value).__name__
            raise GGUFError(self.gguf.path, f"{key} is {kind} {value!r}; expected {what}")
        return value

    def integer(
        self, name: str, default: int | None = None, minimum: int = 1, maximum: int | None = None
    ) -> int:
        """An integer from ``minimum`` to ``maximum`` (``maximum``: what the file's tensors
        allow, so no size read from metadata alone is ever allocated)."""
        value = int(self._raw(name, default, _INTEGER_TYPES, "an integer"))
        key = f"{self.arch}.{name}"
        if value < minimum:
            raise GGUFError(self.gguf.path, f"{key} is {value}; it must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise GGUFError(self.gguf.path, f"{key} is {value}; this file allows at most {maximum}")
        return value

    def number(
        self,
        name: str,
        default: float | None = None,
        minimum: float = 0.0,
        maximum: float = math.inf,
    ) -> float:
        """A finite number strictly between ``minimum`` and ``maximum``."""
        value = float(self._raw(name, default, _NUMBER_TYPES, "a number"))
        if not (math.isfinite(value) and minimum < value < maximum):
            key = f"{self.arch}.{name}"
            bound = f"below {maximum:g}" if math.isfinite(maximum) else "finite"
            raise GGUFError(
                self.gguf.path, f"{key} is {value!r}; it must be above {minimum:g} and {bound}"
            )
        return value


def _scales(keys: _Keys) -> tuple[float, float, float]:
    """MiniCPM's ``embedding_scale``, ``residual_scale`` and ``logit_scale`` (required)."""
    embedding, residual, logit = (
        keys.number(f"{name}_scale", minimum=0.0) for name in ("embedding", "residual", "logit")
    )
    return embedding, residual, logit


def _head_dim(gguf: GGUFFile, keys: _Keys, dim: int, n_heads: int) -> int:
    """``attention.key_length`` (= ``value_length``), else ``dim / n_heads``; even, for RoPE."""
    if f"{keys.arch}.attention.key_length" in gguf.metadata:
        head_dim = keys.integer("attention.key_length")
    elif dim % n_heads:
        raise GGUFError(gguf.path, f"embedding_length {dim} is not divisible by {n_heads} heads")
    else:
        head_dim = dim // n_heads
    value_dim = keys.integer("attention.value_length", head_dim)
    if value_dim != head_dim:
        raise GGUFError(
            gguf.path, f"value heads of {value_dim} differ from key heads of {head_dim}"
        )
    if head_dim % 2:
        raise GGUFError(gguf.path, f"head size {head_dim} is odd; RoPE needs pairs")
    return head_dim


def _check_rope_scaling(gguf: GGUFFile, keys: _Keys) -> None:
    """Refuse RoPE scaling this forward does not implement, rather than ignore it."""
    factor = gguf.get(f"{keys.arch}.rope.scaling.factor")
    if factor is None:  # the older key llama.cpp still reads
        factor = gguf.get(f"{keys.arch}.rope.scale_linear", 1.0)
    # a factor without a type is linear scaling to llama.cpp
    kind = str(gguf.get(f"{keys.arch}.rope.scaling.type", "linear")).lower()
    if kind not in _NO_ROPE_SCALING or (kind == "linear" and factor not in (0.0, 1.0)):
        raise GGUFError(gguf.path, f"RoPE scaling {kind!r} (factor {factor}) is not supported")
    for name in ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"):
        if name in gguf.tensors:  # LLaMA-3.1 scaling, LongRoPE (MiniCPM4-based files)
            raise GGUFError(gguf.path, f"per-frequency RoPE factors ({name}) are not supported")


def _vocab_size(gguf: GGUFFile, keys: _Keys) -> int:
    if f"{keys.arch}.vocab_size" in gguf.metadata:
        return keys.integer("vocab_size")
    tokens = gguf.get("tokenizer.ggml.tokens")
    if tokens is None:
        emb = gguf.tensor_info("token_embd.weight")
        return emb.dims[1]
    return len(tokens)


def _activation(gguf: GGUFFile, arch: Architecture, vocab_size: int) -> str:
    """The family's activation; for the ambiguous ``bitnet`` (spec §4): an explicit
    hidden_act key wins, else LLaMA-3 vocabulary → relu2, otherwise SiLU."""
    for name in ("hidden_act", "hidden_activation"):
        value = gguf.get(f"{arch.name}.{name}")
        if value is not None:
            if str(value).lower() not in _ACTIVATION_ALIASES:
                raise GGUFError(gguf.path, f"{arch.name}.{name} = {value!r} is not relu2 or silu")
            return _ACTIVATION_ALIASES[str(value).lower()]
    if arch.activation is not None:
        return arch.activation
    chosen = "relu2" if vocab_size == LLAMA3_VOCAB_SIZE else "silu"
    log.info("arch 'bitnet' without hidden_act: vocabulary %d → %s", vocab_size, chosen)
    return chosen
