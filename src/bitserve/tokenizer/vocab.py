"""What every GGUF vocabulary shares, whatever its model: token types and special ids.

Token types are llama.cpp's (``tokenizer.ggml.token_type``). Special ids come from the
``tokenizer.ggml.*_token_id`` keys; like llama.cpp, the end-of-generation set also takes
the tokens spelled like a known end of turn (``<|im_end|>``, ``<|endoftext|>``...), and an
end-of-turn token the file does not name is found by its text.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# llama.cpp token types
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

# types whose text is never produced from ordinary text and is hidden by skip_special
SPECIAL_TYPES = frozenset({TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_UNUSED})

# texts that end a turn, in the order an unnamed end-of-turn token is looked for
EOT_TEXTS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
)
# texts that end generation: llama.cpp's list for the families bitserve serves (it stops
# on Qwen's fill-in-the-middle pad, repository and file separators too)
EOG_TEXTS = frozenset(
    {*EOT_TEXTS, "<|eom_id|>", "</s>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}
)


def _token_id(metadata: Mapping[str, Any], name: str, n_tokens: int) -> int | None:
    value = metadata.get(f"tokenizer.ggml.{name}_token_id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"tokenizer.ggml.{name}_token_id is {value!r}, not a token id")
    check_id(name, value, n_tokens)
    return value


def check_id(name: str, token_id: int | None, n_tokens: int) -> None:
    if token_id is not None and not 0 <= token_id < n_tokens:
        raise ValueError(f"{name} token id {token_id} outside the vocabulary of {n_tokens}")


@dataclass(frozen=True, slots=True)
class SpecialIds:
    """The special ids a file names and the server uses (None where it names none).
    Unknown and padding ids are not read: nothing uses them, and files in the wild
    carry a padding id past their vocabulary, which llama.cpp ignores too."""

    bos: int | None = None
    eos: int | None = None
    eot: int | None = None
    eom: int | None = None

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], n_tokens: int) -> SpecialIds:
        bos, eos, eot, eom = (
            _token_id(metadata, n, n_tokens) for n in ("bos", "eos", "eot", "eom")
        )
        return cls(bos, eos, eot, eom)


def control_types(pieces: Sequence[str], types: Sequence[int]) -> tuple[int, ...]:
    """``types`` with every user-defined token spelled like an end of generation made a
    control token, as llama.cpp does: user text must never produce a stop token."""
    return tuple(
        TOKEN_CONTROL if t == TOKEN_USER_DEFINED and p in EOG_TEXTS else int(t)
        for p, t in zip(pieces, types, strict=True)
    )


def find_eot(pieces: Sequence[str], types: Sequence[int]) -> int | None:
    """The end-of-turn token of a vocabulary that does not name one: the first of
    :data:`EOT_TEXTS` it holds as a non-normal token."""
    found = {p: i for i, (p, t) in enumerate(zip(pieces, types, strict=True)) if t != TOKEN_NORMAL}
    return next((found[text] for text in EOT_TEXTS if text in found), None)


def eog_ids(
    pieces: Sequence[str], types: Sequence[int], named: Iterable[int | None]
) -> frozenset[int]:
    """Ids that end generation: the ``named`` ones and every non-normal token spelled
    like an end of turn (llama.cpp's rule; a Qwen3 file names ``<|im_end|>`` but stops
    on ``<|endoftext|>`` too)."""
    by_text = (
        i
        for i, (p, t) in enumerate(zip(pieces, types, strict=True))
        if t != TOKEN_NORMAL and p in EOG_TEXTS
    )
    return frozenset({*(i for i in named if i is not None), *by_text})
