"""Read GGUF files (memory-mapped, zero copy), ternary codecs, and a writer for test files."""

from bitserve.gguf.constants import GGMLType, GGUFValueType
from bitserve.gguf.reader import GGUFError, GGUFFile, TensorInfo, read_gguf
from bitserve.gguf.writer import GGUFWriter

__all__ = [
    "GGMLType",
    "GGUFError",
    "GGUFFile",
    "GGUFValueType",
    "GGUFWriter",
    "TensorInfo",
    "read_gguf",
]
