"""Streaming detokenization that never emits half a character.

Tokens are byte strings: an emoji (4 UTF-8 bytes) may be spread over several byte-level
BPE tokens or SentencePiece byte-fallback tokens (``<0xF0>`` ``<0x9F>``...), and a token may
end in the middle of a character. The detokenizer keeps
the incomplete tail until the next token completes it, so every ``push`` returns only
whole characters and the concatenation of all pushes plus ``flush`` equals
``tokenizer.decode(ids)``.
"""

from __future__ import annotations

import codecs

from bitserve.tokenizer.bpe import Tokenizer


class IncrementalDetokenizer:
    """Turn a stream of token ids into a stream of complete UTF-8 text.

    Invalid bytes are replaced by U+FFFD as soon as they are known to be invalid; an
    incomplete character at the end is held back and replaced by ``flush()``.
    Control tokens are skipped unless ``skip_special=False``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        if self.skip_special and self.tokenizer.is_special(token_id):
            return ""
        return self._decoder.decode(self.tokenizer.token_bytes(token_id), final=False)

    def flush(self) -> str:
        """End of stream: return any held-back bytes (as U+FFFD) and reset."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text

    @property
    def pending_bytes(self) -> bytes:
        """Bytes held back because they do not yet form a whole character."""
        buffered, _ = self._decoder.getstate()
        return buffered
