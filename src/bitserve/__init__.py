"""bitserve: a fast, CPU-first chat server for 1-bit (BitNet b1.58) language models."""

__version__ = "0.1.0"
