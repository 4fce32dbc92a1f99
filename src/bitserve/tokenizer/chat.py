"""Chat formatting: messages → prompt text → token ids, without control-token injection.

Two formats:

- BitNet-b1.58-2B-4T (spec §6), used when the model's ``tokenizer.chat_template`` is
  missing, is Microsoft's broken placeholder (it contains ``BITNETAssistant:``), or the
  architecture is ``bitnet-*``::

    <|begin_of_text|>System: {system}<|eot_id|>User: {user}<|eot_id|>Assistant:

  (the prompt ends with ``Assistant: ``, one space after the colon);

- any other model: its Jinja ``tokenizer.chat_template``, rendered in a sandbox with the
  variables Hugging Face provides (``messages``, ``bos_token``, ``eos_token``,
  ``add_generation_prompt``, ``raise_exception``).

Injection safety: :meth:`ChatFormatter.encode` renders the template with opaque markers
in place of message contents. Only the template's own text is searched for control
tokens; the contents are spliced back in as ordinary text. So a user who writes
``<|eot_id|>`` gets the tokens of that text, never the control token, while the ids are
otherwise exactly those of encoding the rendered prompt with special tokens allowed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from bitserve.tokenizer.bpe import Tokenizer

if TYPE_CHECKING:
    from jinja2 import Template

    from bitserve.gguf.reader import GGUFFile

ROLES = ("system", "user", "assistant")
BROKEN_TEMPLATE_MARK = "BITNETAssistant:"

# private-use characters: never produced by a template, never special-token text
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"
_MARKER_RE = re.compile(f"{_MARK_OPEN}(\\d+){_MARK_CLOSE}")


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """A validated message: ``role`` is one of :data:`ROLES`."""

    role: str
    content: str


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[ChatMessage]:
    """Check roles and contents; raise ValueError naming the first bad message."""
    if not messages:
        raise ValueError("a conversation needs at least one message")
    out = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(
                f"message {i}: unsupported role {role!r}; expected one of {', '.join(ROLES)}"
            )
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string")
        out.append(ChatMessage(role, content))
    return out


def is_bitnet_chat(template: str | None, arch: str | None) -> bool:
    """True if the model should use the BitNet-2B-4T format rather than its template."""
    if not template or BROKEN_TEMPLATE_MARK in template:
        return True
    return bool(arch and arch.startswith("bitnet-"))


def _raise_exception(message: str) -> NoReturn:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def compile_template(source: str) -> Template:
    """Compile a chat template in Hugging Face's sandboxed environment."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.globals["raise_exception"] = _raise_exception
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ValueError(f"invalid chat template: {e}") from e


class ChatFormatter:
    """Messages (``{"role", "content"}`` dicts) → prompt ending with the generation prompt."""

    def __init__(self, tokenizer: Tokenizer, template: str | None) -> None:
        """``template=None`` selects the BitNet-2B-4T format."""
        self.tokenizer = tokenizer
        self.template_source = template
        self._template = compile_template(template) if template is not None else None
        self._bos = self._piece(tokenizer.bos_id)
        self._eos = self._piece(tokenizer.eos_id)
        eot = tokenizer.eot_id if tokenizer.eot_id is not None else tokenizer.eos_id
        self._eot = self._piece(eot)

    def _piece(self, token_id: int | None) -> str:
        return "" if token_id is None else self.tokenizer.id_to_piece(token_id)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], tokenizer: Tokenizer) -> ChatFormatter:
        template = metadata.get("tokenizer.chat_template")
        arch = metadata.get("general.architecture")
        if is_bitnet_chat(template, arch):
            return cls(tokenizer, None)
        return cls(tokenizer, template)

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, tokenizer: Tokenizer) -> ChatFormatter:
        return cls.from_metadata(gguf.metadata, tokenizer)

    @property
    def is_bitnet_format(self) -> bool:
        return self._template is None

    # -- rendering ---------------------------------------------------------------------

    def _render(
        self, messages: list[ChatMessage], contents: list[str], add_generation_prompt: bool
    ) -> str:
        """The prompt text with ``contents[i]`` standing for message i's content."""
        if self._template is None:
            turns = [
                f"{m.role.capitalize()}: {c}{self._eot}"
                for m, c in zip(messages, contents, strict=True)
            ]
            tail = "Assistant: " if add_generation_prompt else ""
            return self._bos + "".join(turns) + tail
        variables = {
            "messages": [
                {"role": m.role, "content": c} for m, c in zip(messages, contents, strict=True)
            ],
            "bos_token": self._bos,
            "eos_token": self._eos,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._template.render(**variables)
        except TemplateError as e:
            raise ValueError(f"chat template failed: {e}") from e

    def _contents(self, messages: list[ChatMessage]) -> list[str]:
        if self._template is None:
            return [m.content.strip() for m in messages]
        return [m.content for m in messages]

    def render(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """The prompt as text (for display and debugging; use :meth:`encode` for ids)."""
        checked = validate_messages(messages)
        return self._render(checked, self._contents(checked), add_generation_prompt)

    # -- encoding ----------------------------------------------------------------------

    def encode(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of the prompt; message contents can never become control tokens."""
        checked = validate_messages(messages)
        contents = self._contents(checked)
        markers = [f"{_MARK_OPEN}{i}{_MARK_CLOSE}" for i in range(len(checked))]
        rendered = self._render(checked, markers, add_generation_prompt)
        segments = self._segments(rendered, contents)
        if segments is None:  # the template altered the markers: check contents instead
            segments = self._segments_unmarked(checked, contents, add_generation_prompt)
        ids = self._encode_segments(segments)
        bos = self.tokenizer.bos_id
        if self.tokenizer.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def _segments(self, rendered: str, contents: list[str]) -> list[str | int] | None:
        """Template text split at its control tokens, with contents spliced in as text;
        None if a marker was mangled by the template."""
        pieces = _MARKER_RE.split(rendered)
        segments: list[str | int] = []
        for i, piece in enumerate(pieces):
            if i % 2:
                segments.append(contents[int(piece)])
            elif _MARK_OPEN in piece or _MARK_CLOSE in piece:
                return None
            else:
                segments.extend(self.tokenizer.split_special(piece))
        return segments

    def _segments_unmarked(
        self, messages: list[ChatMessage], contents: list[str], add_generation_prompt: bool
    ) -> list[str | int]:
        for i, content in enumerate(contents):
            if any(isinstance(part, int) for part in self.tokenizer.split_special(content)):
                raise ValueError(
                    f"message {i} contains control-token text and this chat template "
                    "rewrites message contents, so it cannot be encoded safely"
                )
        return self.tokenizer.split_special(self._render(messages, contents, add_generation_prompt))

    def _encode_segments(self, segments: list[str | int]) -> list[int]:
        """Encode runs of text as ordinary text (allow_special=False) between control ids."""
        ids: list[int] = []
        text: list[str] = []
        for segment in [*segments, -1]:
            if isinstance(segment, str):
                text.append(segment)
                continue
            if text:
                ids += self.tokenizer.encode("".join(text), allow_special=False)
                text = []
            if segment >= 0:
                ids.append(segment)
        return ids
