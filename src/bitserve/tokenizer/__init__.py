"""Tokenizers from GGUF metadata (byte-level BPE and SentencePiece), incremental
detokenizer, chat templates."""

from bitserve.tokenizer.bpe import Tokenizer
from bitserve.tokenizer.chat import ChatFormatter
from bitserve.tokenizer.detokenizer import IncrementalDetokenizer

__all__ = ["ChatFormatter", "IncrementalDetokenizer", "Tokenizer"]
