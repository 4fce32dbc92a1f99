"""GGUF tokenizer metadata from a Hugging Face ``tokenizer.json`` and
``tokenizer_config.json``, as llama.cpp's converter writes it for byte-level BPE:
``tokenizer.ggml.model = gpt2``, tokens in id order, merges as ``"a b"`` strings, token
types (1 normal, 3 control for special added tokens, 4 user-defined for other added
tokens, 5 unused for ids the vocabulary leaves empty), ``tokenizer.ggml.pre`` named from
the pre-tokenizer's split pattern, special ids, ``add_bos_token`` and the chat template.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bitserve.convert.checkpoint import CheckpointError
from bitserve.tokenizer.pretokenizers import PRE_TOKENIZER_PATTERNS
from bitserve.tokenizer.vocab import TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNUSED, TOKEN_USER_DEFINED


def tokenizer_metadata(
    tokenizer: Mapping[str, Any],
    config: Mapping[str, Any],
    vocab_size: int,
    chat_template: str | None = None,
) -> dict[str, Any]:
    """The ``tokenizer.*`` GGUF keys. ``tokenizer`` is tokenizer.json, ``config``
    tokenizer_config.json, ``vocab_size`` the model's (the embedding's rows: ids past the
    tokenizer's are padding tokens); ``chat_template`` overrides the config's."""
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE" or (tokenizer.get("decoder") or {}).get("type") != "ByteLevel":
        kind = f"{model.get('type')} with a {(tokenizer.get('decoder') or {}).get('type')} decoder"
        raise CheckpointError(
            f"tokenizer.json is {kind}; bitserve converts byte-level BPE tokenizers only"
        )
    by_id: dict[int, tuple[str, int]] = {i: (t, TOKEN_NORMAL) for t, i in model["vocab"].items()}
    for added in tokenizer.get("added_tokens", []):
        added_type = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
        by_id[int(added["id"])] = (str(added["content"]), added_type)
    n_tokens = max(vocab_size, max(by_id) + 1)
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_tokens):
        token, token_type = by_id.get(i, (f"[PAD{i}]", TOKEN_UNUSED))
        tokens.append(token)
        types.append(token_type)
    ids = {t: i for i, t in reversed(list(enumerate(tokens)))}
    metadata: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre_tokenizer_name(tokenizer.get("pre_tokenizer")),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": [
            m if isinstance(m, str) else " ".join(m) for m in model["merges"]
        ],
    }
    for key in ("bos", "eos", "unk", "pad"):
        text = _token_text(config.get(f"{key}_token"))
        if text is not None and text in ids:
            name = "padding" if key == "pad" else "unknown" if key == "unk" else key
            metadata[f"tokenizer.ggml.{name}_token_id"] = ids[text]
    metadata["tokenizer.ggml.add_bos_token"] = _adds_bos(tokenizer, config)
    if "add_eos_token" in config:
        metadata["tokenizer.ggml.add_eos_token"] = bool(config["add_eos_token"])
    template = chat_template if chat_template is not None else _chat_template(config)
    if template:
        metadata["tokenizer.chat_template"] = template
    return metadata


def pre_tokenizer_name(pre: Mapping[str, Any] | None) -> str:
    """The ``tokenizer.ggml.pre`` value whose split pattern ``pre`` uses: GPT-2's own
    ByteLevel regex is ``gpt-2``; one ``Split`` regex followed by a regex-less ByteLevel
    is looked up among the patterns bitserve's tokenizer knows (LLaMA-3's is ``llama-bpe``)."""
    pre = pre or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (
        len(steps) == 2
        and steps[0].get("type") == "Split"
        and str(steps[0].get("behavior")).lower() == "isolated"
        and not steps[0].get("invert", False)
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex", True)
    ):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        names = [k for k, v in PRE_TOKENIZER_PATTERNS.items() if v == pattern]
        if names:
            return "llama-bpe" if "llama-bpe" in names else names[0]
        raise CheckpointError(
            f"tokenizer.json splits text with a pattern bitserve does not know: {pattern!r}"
        )
    raise CheckpointError(
        f"tokenizer.json's pre-tokenizer ({_describe(pre)}) is not one bitserve knows: "
        "expected GPT-2's ByteLevel, or one Split regex followed by ByteLevel"
    )


def _describe(pre: Mapping[str, Any]) -> str:
    if pre.get("type") == "Sequence":
        return " + ".join(str(step.get("type")) for step in pre.get("pretokenizers", []))
    return str(pre.get("type"))


def _token_text(value: Any) -> str | None:
    """A tokenizer_config special token: a string, or ``{"content": ...}``."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _adds_bos(tokenizer: Mapping[str, Any], config: Mapping[str, Any]) -> bool:
    """``add_bos_token`` from the config, else whether the post-processor's template
    starts with the BOS token (LLaMA-3's tokenizer.json does so)."""
    if "add_bos_token" in config:
        return bool(config["add_bos_token"])
    bos = _token_text(config.get("bos_token"))
    post = tokenizer.get("post_processor") or {}
    processors = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for processor in processors:
        if processor.get("type") == "TemplateProcessing":
            first = (processor.get("single") or [{}])[0]
            special = first.get("SpecialToken") if isinstance(first, Mapping) else None
            return special is not None and special.get("id") == bos
    return False


def _chat_template(config: Mapping[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return template if isinstance(template, str) else None
