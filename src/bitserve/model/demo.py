"""The demo model: a tiny random BitNet b1.58 GGUF with a real (small) tokenizer.

``bitserve serve`` and friends fall back to it when no model is given, so every command
works out of the box; its replies are gibberish, and commands say so with
:data:`DEMO_NOTICE`. The file is built once, deterministically, and cached:

- tokenizer: byte-level BPE trained with ``tokenizers`` on ``bitserve/data/demo_corpus.txt``
  using the LLaMA-3 split pattern (spec §5): 2000 trained tokens, then LLaMA-3's block of
  256 control tokens (``<|begin_of_text|>``, ``<|end_of_text|>``, ``<|eot_id|>``...);
- chat: the BitNet-2B-4T format (spec §6), with the broken placeholder template stored
  like the official file does;
- weights: random ternary, 4 layers, dim 256, FFN 640, 4 heads, 1 KV head (GQA 4:1 like
  2B-4T), context 2048.

:func:`llama3_tokenizer_metadata` pads the same trained tokenizer to LLaMA-3's shape
(128256 tokens, BOS 128000, EOS 128001, EOT 128009) for 2B-4T-shaped random models.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from bitserve.model.synthetic import ModelShape, write_synthetic_model
from bitserve.tokenizer.bpe import LLAMA3_SPLIT_PATTERN, TOKEN_CONTROL, TOKEN_NORMAL
from bitserve.tokenizer.fixtures import llama3_special_tokens, train_byte_level_bpe

DEMO_NOTICE = "demo model: random weights; pass -m for a real model"

# bump when anything below changes: the cached file name carries it, so a new recipe
# regenerates instead of reusing a stale file
DEMO_VERSION = 1
DEMO_SEED = 1158
DEMO_TRAINED_VOCAB = 2000
N_LLAMA3_SPECIAL = 256

# like the template Microsoft's converter stores in ggml-model-i2_s.gguf: never ends a
# turn and uses role names the model was not trained on; ChatFormatter recognises it
BROKEN_BITNET_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ 'Human: ' + message['content'] + "
    "'\\n\\nBITNETAssistant: ' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def demo_shape(vocab_size: int) -> ModelShape:
    return ModelShape(
        n_layers=4,
        dim=256,
        ffn_dim=640,  # 5 * 128: not a power of two, but I2_S rows must be whole blocks
        n_heads=4,
        n_kv_heads=1,
        vocab_size=vocab_size,
        context_length=2048,
    )


def train_demo_bpe() -> tuple[list[str], list[str]]:
    """(tokens, merges) of the demo's byte-level BPE: :data:`DEMO_TRAINED_VOCAB` tokens
    trained on the shipped corpus with the LLaMA-3 split pattern (cached, shared: do not
    change the lists)."""
    return train_byte_level_bpe(LLAMA3_SPLIT_PATTERN, vocab_size=DEMO_TRAINED_VOCAB)


def _tokenizer_metadata(
    tokens: list[str], types: list[int], merges: list[str], bos_id: int
) -> dict[str, Any]:
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": bos_id,
        "tokenizer.ggml.eos_token_id": bos_id + 1,
        "tokenizer.ggml.eot_token_id": bos_id + 9,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": BROKEN_BITNET_TEMPLATE,
    }


def demo_tokenizer_metadata() -> dict[str, Any]:
    """GGUF tokenizer keys of the demo model: 2000 trained tokens + 256 control tokens."""
    tokens, merges = train_demo_bpe()
    types = [TOKEN_NORMAL] * len(tokens) + [TOKEN_CONTROL] * N_LLAMA3_SPECIAL
    return _tokenizer_metadata(tokens + llama3_special_tokens(), types, merges, len(tokens))


def llama3_tokenizer_metadata(vocab_size: int = 128256) -> dict[str, Any]:
    """The demo tokenizer padded to LLaMA-3's shape: ``vocab_size`` tokens, the 256
    LLaMA-3 control tokens last (BOS = vocab_size - 256, i.e. 128000 by default).

    The gap between the trained tokens and BOS is filled with further reserved control
    tokens, so a model with this table has 2B-4T's vocabulary size and special ids.
    """
    tokens, merges = train_demo_bpe()
    n_fill = vocab_size - len(tokens) - N_LLAMA3_SPECIAL
    if n_fill < 0:
        minimum = len(tokens) + N_LLAMA3_SPECIAL
        raise ValueError(f"vocab_size {vocab_size} is below the minimum {minimum}")
    first_fill = N_LLAMA3_SPECIAL - 5  # after <|reserved_special_token_250|>
    fill = [f"<|reserved_special_token_{first_fill + i}|>" for i in range(n_fill)]
    types = [TOKEN_NORMAL] * len(tokens) + [TOKEN_CONTROL] * (n_fill + N_LLAMA3_SPECIAL)
    bos_id = vocab_size - N_LLAMA3_SPECIAL
    return _tokenizer_metadata(tokens + fill + llama3_special_tokens(), types, merges, bos_id)


def cache_dir() -> Path:
    """``$BITSERVE_CACHE``, else ``$XDG_CACHE_HOME/bitserve``, else ``~/.cache/bitserve``."""
    explicit = os.environ.get("BITSERVE_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "bitserve"


def write_demo_model(path: str | Path) -> Path:
    """Write the demo model to ``path`` (the same bytes every time)."""
    metadata = demo_tokenizer_metadata()
    shape = demo_shape(len(metadata["tokenizer.ggml.tokens"]))
    return write_synthetic_model(
        path,
        shape,
        seed=DEMO_SEED,
        tokenizer_metadata=metadata,
        name=f"bitserve demo v{DEMO_VERSION} (random weights)",
    )


def demo_model_path() -> Path:
    """Path of the cached demo model, building it first if needed (atomic: a reader
    never sees a partial file, and concurrent builders each rename a complete one)."""
    directory = cache_dir()
    path = directory / f"demo-v{DEMO_VERSION}.gguf"
    if path.is_file():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".demo-", suffix=".gguf.partial", dir=directory)
    os.close(fd)
    try:
        write_demo_model(tmp_name)
        os.replace(tmp_name, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
    return path
