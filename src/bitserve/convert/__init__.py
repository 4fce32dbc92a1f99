"""``bitserve convert``: Hugging Face ternary checkpoints (safetensors) → GGUF.

:mod:`~bitserve.convert.checkpoint` reads the folder, :mod:`~bitserve.convert.ternary`
the packed / master weight layouts, :mod:`~bitserve.convert.tokenizer_json` the
tokenizer, :mod:`~bitserve.convert.converter` writes the GGUF file.
"""

from bitserve.convert.checkpoint import Checkpoint, CheckpointError
from bitserve.convert.converter import ConvertReport, convert_checkpoint

__all__ = ["Checkpoint", "CheckpointError", "ConvertReport", "convert_checkpoint"]
