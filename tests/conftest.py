"""Session-wide test setup: every cache (the demo model, bench models) goes to a temporary
directory, so tests never touch the user's ~/.cache and never see a stale file."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    previous = os.environ.get("BITSERVE_CACHE")
    os.environ["BITSERVE_CACHE"] = str(tmp_path_factory.mktemp("bitserve-cache"))
    yield
    if previous is None:
        os.environ.pop("BITSERVE_CACHE", None)
    else:
        os.environ["BITSERVE_CACHE"] = previous


# ---- chat families: tokenizers with each family's control tokens and its real template ----

TEMPLATES = Path(__file__).parent / "tokenizer" / "templates"

# family → (control tokens, user-defined tokens, BOS, EOS, add BOS); templates are the
# published ones (tests/tokenizer/templates/*.jinja, see README.md there)
FAMILIES: dict[str, tuple[list[str], list[str], str | None, str, bool]] = {
    "qwen3": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
         "</tool_response>"],
        None, "<|im_end|>", False,
    ),
    "falcon3": (
        ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"], [], None,
        "<|endoftext|>", False,
    ),
    "llama3": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
         "<|eot_id|>"],
        [], "<|begin_of_text|>", "<|end_of_text|>", True,
    ),
}  # fmt: skip


def family_tokenizer_metadata(family: str) -> dict[str, Any]:
    """GGUF tokenizer keys of a small tokenizer with ``family``'s special tokens and its
    published chat template: the demo model's trained BPE, then the family's tokens."""
    from bitserve.model.demo import train_demo_bpe
    from bitserve.tokenizer.bpe import TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_USER_DEFINED

    control, user_defined, bos, eos, add_bos = FAMILIES[family]
    tokens, merges = train_demo_bpe()
    pieces = tokens + control + user_defined
    types = (
        [TOKEN_NORMAL] * len(tokens)
        + [TOKEN_CONTROL] * len(control)
        + [TOKEN_USER_DEFINED] * len(user_defined)
    )
    metadata: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": pieces,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": pieces.index(eos),
        "tokenizer.ggml.add_bos_token": add_bos,
        "tokenizer.chat_template": (TEMPLATES / f"{family}.jinja").read_text("utf-8"),
    }
    if bos is not None:
        metadata["tokenizer.ggml.bos_token_id"] = pieces.index(bos)
    return metadata


@pytest.fixture(scope="session")
def family_metadata() -> Callable[[str], dict[str, Any]]:
    """``family_metadata("qwen3" | "falcon3" | "llama3")`` → tokenizer + template keys."""
    return family_tokenizer_metadata
