"""Model hyper-parameters read from GGUF metadata (spec §3)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from bitserve.gguf.reader import GGUFError, GGUFFile

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("bitnet-b1.58", "bitnet-25", "bitnet")
LLAMA3_VOCAB_SIZE = 128256
ACTIVATIONS = ("relu2", "silu")
_ACTIVATION_ALIASES = {"relu2": "relu2", "relu_squared": "relu2", "silu": "silu", "swish": "silu"}


@dataclass(frozen=True, slots=True)
class ModelConfig:
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

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def gqa_group(self) -> int:
        """Query heads per KV head: query head j reads KV head j // gqa_group."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, activation: str | None = None) -> ModelConfig:
        """Read the config; ``activation`` overrides what the file says (tests use it)."""
        arch = gguf.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            supported = ", ".join(SUPPORTED_ARCHITECTURES)
            raise GGUFError(gguf.path, f"unsupported architecture {arch!r}; supported: {supported}")

        def key(name: str, default: Any = None) -> Any:
            value = gguf.get(f"{arch}.{name}", default)
            if value is None:
                raise GGUFError(gguf.path, f"missing metadata key {arch}.{name}")
            return value

        dim = int(key("embedding_length"))
        n_heads = int(key("attention.head_count"))
        vocab_size = _vocab_size(gguf, arch)
        if dim % n_heads:
            raise GGUFError(
                gguf.path, f"embedding_length {dim} is not divisible by {n_heads} heads"
            )
        n_kv_heads = int(key("attention.head_count_kv", n_heads))
        if n_heads % n_kv_heads:
            raise GGUFError(gguf.path, f"{n_heads} heads do not group over {n_kv_heads} KV heads")
        config = cls(
            arch=arch,
            n_layers=int(key("block_count")),
            dim=dim,
            ffn_dim=int(key("feed_forward_length")),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            vocab_size=vocab_size,
            context_length=int(key("context_length", 4096)),
            rope_dim=int(key("rope.dimension_count", dim // n_heads)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            activation=activation or _activation(gguf, arch, vocab_size),
        )
        if config.activation not in ACTIVATIONS:
            raise GGUFError(gguf.path, f"unknown activation {config.activation!r}")
        if config.rope_dim != config.head_dim:
            raise GGUFError(
                gguf.path, f"partial RoPE ({config.rope_dim} of {config.head_dim}) is not supported"
            )
        return config


def _vocab_size(gguf: GGUFFile, arch: str) -> int:
    size = gguf.get(f"{arch}.vocab_size")
    if size is None:
        tokens = gguf.get("tokenizer.ggml.tokens")
        if tokens is None:
            emb = gguf.tensor_info("token_embd.weight")
            return emb.dims[1]
        return len(tokens)
    return int(size)


def _activation(gguf: GGUFFile, arch: str, vocab_size: int) -> str:
    """Squared ReLU for bitnet-b1.58 / bitnet-25; for the ambiguous ``bitnet`` (spec §4):
    an explicit hidden_act key wins, else LLaMA-3 vocabulary → relu2, otherwise SiLU."""
    for name in ("hidden_act", "hidden_activation"):
        value = gguf.get(f"{arch}.{name}")
        if value is not None:
            if str(value).lower() not in _ACTIVATION_ALIASES:
                raise GGUFError(gguf.path, f"{arch}.{name} = {value!r} is not relu2 or silu")
            return _ACTIVATION_ALIASES[str(value).lower()]
    if arch != "bitnet":
        return "relu2"
    chosen = "relu2" if vocab_size == LLAMA3_VOCAB_SIZE else "silu"
    log.info("arch 'bitnet' without hidden_act: vocabulary %d → %s", vocab_size, chosen)
    return chosen
