"""Model config, weights and the BitNet b1.58 forward pass."""

from bitserve.model.bitnet import BitNetModel
from bitserve.model.config import ModelConfig
from bitserve.model.kv_cache import ContextFullError, KVCache
from bitserve.model.weights import LayerWeights, ModelWeights

__all__ = [
    "BitNetModel",
    "ContextFullError",
    "KVCache",
    "LayerWeights",
    "ModelConfig",
    "ModelWeights",
]
