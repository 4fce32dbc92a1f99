"""The pre-tokenizers of byte-level BPE vocabularies, by ``tokenizer.ggml.pre``.

Each entry says what llama.cpp (src/llama-vocab.cpp) does for that name and what the
family's published ``tokenizer.json`` does: the split regexes (applied in turn, every
piece, matched or not, kept), whether a whole pre-token found in the vocabulary is taken
before any merge (``ignore_merges``), whether a BOS is added when the file does not say,
and the Unicode normalization. A missing ``pre`` means LLaMA-3 (spec §5: the official
BitNet-2B-4T file has none; llama.cpp would fall back to ``default``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from tokenizers import Regex, normalizers, pre_tokenizers

# LLaMA-3's tokenizer.json split pattern, exactly as in spec §5 (Falcon3, Falcon-E and
# Llama3-8B-1.58 use it too)
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2/Qwen3's (Ternary-Bonsai): LLaMA-3's with single digits
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_SPLIT_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEFAULT: four splits in turn
DEFAULT_SPLIT_PATTERNS = (
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
)


@dataclass(frozen=True, slots=True)
class PreTokenizerSpec:
    """How one ``tokenizer.ggml.pre`` value turns text into pre-tokens."""

    patterns: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False  # llama.cpp's default when tokenizer.ggml.add_bos_token is absent
    nfc: bool = False  # the published tokenizer.json normalizes to NFC first

    def build(self) -> tuple[pre_tokenizers.PreTokenizer, normalizers.Normalizer | None]:
        splits: list[pre_tokenizers.PreTokenizer] = [
            pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in self.patterns
        ]
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level])
        return pre_tokenizer, (normalizers.NFC() if self.nfc else None)


_LLAMA3 = PreTokenizerSpec((LLAMA3_SPLIT_PATTERN,), ignore_merges=True, add_bos=True)
_QWEN2 = PreTokenizerSpec((QWEN2_SPLIT_PATTERN,), nfc=True)
_GPT2 = PreTokenizerSpec((GPT2_SPLIT_PATTERN,))
_DEFAULT = PreTokenizerSpec(DEFAULT_SPLIT_PATTERNS)

PRE_TOKENIZERS: Mapping[str, PreTokenizerSpec] = MappingProxyType(
    {
        "llama-bpe": _LLAMA3,  # LLaMA-3, Llama3-8B-1.58
        "llama3": _LLAMA3,
        "llama-v3": _LLAMA3,
        "falcon3": _LLAMA3,  # Falcon3-*-1.58bit
        "falcon_e": _LLAMA3,  # Falcon-E (bitnet.cpp's converter; llama.cpp lacks it)
        "smaug-bpe": _LLAMA3,
        "dbrx": _LLAMA3,
        "qwen2": _QWEN2,  # Qwen2/Qwen3, Ternary-Bonsai
        "deepseek-r1-qwen": _QWEN2,
        "gpt-2": _GPT2,
        "default": _DEFAULT,
    }
)

# kept for callers of the old mapping (pattern of each LLaMA-3-style name)
PRE_TOKENIZER_PATTERNS: Mapping[str, str] = MappingProxyType(
    {name: spec.patterns[0] for name, spec in PRE_TOKENIZERS.items() if len(spec.patterns) == 1}
)


def pre_tokenizer_spec(pre: str | None) -> PreTokenizerSpec:
    """The spec for a ``tokenizer.ggml.pre`` value (None: LLaMA-3, spec §5)."""
    if pre is None:
        return _LLAMA3
    spec = PRE_TOKENIZERS.get(pre)
    if spec is None:
        supported = ", ".join(sorted(PRE_TOKENIZERS))
        raise ValueError(
            f"unsupported tokenizer.ggml.pre {pre!r} (the pre-tokenizer of this vocabulary); "
            f"supported: {supported}"
        )
    return spec
