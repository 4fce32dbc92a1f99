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

Injection safety: :meth:`ChatFormatter.encode` renders the template twice, with the
real contents and with opaque markers in their place, and lines the two up. Only the
template's own text is searched for control tokens; the contents (as the template left
them, e.g. trimmed) are spliced back in as ordinary text. So a user who writes
``<|eot_id|>`` gets the tokens of that text, never the control token, while the ids are
otherwise exactly those of encoding the rendered prompt with special tokens allowed.
A template that rewrites contents beyond trimming is accepted only if its output has the
same control tokens as its output without contents.

Tools and reasoning: ``encode``/``render`` take the request's ``tools`` and
``template_kwargs`` (``chat_template_kwargs``, e.g. ``enable_thinking``). Assistant messages
may carry ``tool_calls`` and ``reasoning_content``, and ``role="tool"`` messages answer a
call. Templates that know tools render all of it themselves; for the others
``tokenizer.tools.generic_tool_messages`` writes it as plain text first. Tool definitions,
calls and reasoning are rendered by the template as its own text, so they must not contain
control-token text (a ValueError otherwise): only contents are spliced in as markers.

Given token ids: a message may carry ``token_ids`` (the server's own stored replies: the
ids the model generated). They stand for that message's content verbatim, with no
stripping and no re-encoding, so the next turn's prompt starts with exactly the tokens the
model processed in the last one and the prefix cache can reuse them (BPE re-encoding of
generated text is often a different token sequence). The template renders an opaque
marker in that content's place and the ids are spliced in where the marker lands. Only
the server sets them: the HTTP layer never passes a client's ``token_ids`` on.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from jinja2 import TemplateError, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.ext import loopcontrols
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from bitserve.tokenizer.bpe import Tokenizer
from bitserve.tokenizer.messages import ChatMessage, validate_messages
from bitserve.tokenizer.tools import (
    ToolCallSyntax,
    generic_tool_messages,
    template_knows_tools,
    tool_call_syntax,
)

if TYPE_CHECKING:
    from jinja2 import Template

    from bitserve.gguf.reader import GGUFFile

log = logging.getLogger(__name__)

# names a request's chat_template_kwargs cannot set: the renderer's own variables
RESERVED_VARIABLES = frozenset(
    {"messages", "bos_token", "eos_token", "add_generation_prompt", "tools", "raise_exception"}
)
BROKEN_TEMPLATE_MARK = "BITNETAssistant:"

# private-use characters: never produced by a template, never special-token text
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"
_MARKER_RE = re.compile(f"{_MARK_OPEN}(\\d+){_MARK_CLOSE}")

# a prompt piece: template/content text, one control token id, or given ids (verbatim)
Segment = str | int | tuple[int, ...]


def _marker(i: int) -> str:
    return f"{_MARK_OPEN}{i}{_MARK_CLOSE}"


def is_bitnet_chat(template: str | None, arch: str | None) -> bool:
    """True if the model should use the BitNet-2B-4T format rather than its template."""
    if not template or BROKEN_TEMPLATE_MARK in template:
        return True
    return bool(arch and arch.startswith("bitnet-"))


def _raise_exception(message: str) -> NoReturn:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


# A template is code the model file carries. The sandbox keeps it from files and Python
# internals; these bounds keep it from taking the machine's memory or time with one
# expression ('x' * 10**10, a string doubled in a loop, ' '.center(10**10), 9**9**9) or
# with loops and recursion that never end in practice (nested loops over range(10**6), a
# macro calling itself twice): no chat prompt comes near them.
MAX_TEMPLATE_VALUE = 1 << 24  # characters (or items) of any value a template makes
MAX_TEMPLATE_EXPONENT = 1024
MAX_TEMPLATE_SECONDS = 2.0  # CPU time of one render (a real template takes milliseconds)
_FORMAT_SPEC = re.compile(r"%[-+ #0-9.]*")  # a printf conversion's flags, width, precision


def _too_big(value: Any) -> bool:
    return isinstance(value, str | list | tuple) and len(value) > MAX_TEMPLATE_VALUE


def _check_sizes(args: Sequence[Any]) -> None:
    """Refuse an integer argument that could make a value past the bound (a width, a
    repeat count) before the call allocates it."""
    for arg in args:
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > MAX_TEMPLATE_VALUE:
            raise SecurityError(f"the chat template used the number {arg}: too large")


def _checked_result(value: Any) -> Any:
    if _too_big(value):
        raise SecurityError(f"the chat template made a value of {len(value)} characters")
    return value


class _RenderClock(threading.local):
    """The CPU time the render running on this thread may still take. Every step whose
    cost can grow with a value ticks it: each loop item, call (macros included), filter,
    test, comparison, subscript (a slice copies), operator that can grow a value and ``~``.
    A template with no loop can still take minutes in a long run of them. A tick
    reads the wall clock (cheap), and the thread's CPU time (a system call) once per
    twentieth of the budget, so a render slowed by other threads holding the GIL is never
    stopped for their time."""

    cpu_deadline: float | None = None
    next_look = 0.0

    def run(self, render: Callable[[], str]) -> str:
        self.cpu_deadline = time.thread_time() + MAX_TEMPLATE_SECONDS
        self.next_look = time.monotonic() + MAX_TEMPLATE_SECONDS / 20
        try:
            return render()
        finally:
            self.cpu_deadline = None

    def tick(self) -> None:
        if self.cpu_deadline is None or time.monotonic() < self.next_look:
            return
        if time.thread_time() > self.cpu_deadline:
            raise SecurityError(f"the chat template ran for more than {MAX_TEMPLATE_SECONDS:g} s")
        self.next_look = time.monotonic() + MAX_TEMPLATE_SECONDS / 20


_CLOCK = _RenderClock()


class _BoundedCodeGenerator(CodeGenerator):
    def visit_Compare(self, node: nodes.Compare, frame: Frame) -> None:
        """A comparison (``==``, ``in``: as long as the values) ticks the clock first."""
        self.write("(environment.tick() or ")
        super().visit_Compare(node, frame)
        self.write(")")

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        """Every loop's items through :meth:`_ChatTemplateEnvironment.timed_items`."""
        timed = nodes.EnvironmentAttribute("timed_items", lineno=node.iter.lineno)
        node.iter = nodes.Call(timed, [node.iter], [], None, None, lineno=node.iter.lineno)
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        """``a ~ b`` through :meth:`_ChatTemplateEnvironment.bounded_join`."""
        self.write("environment.bounded_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _ChatTemplateEnvironment(ImmutableSandboxedEnvironment):
    """Hugging Face's sandboxed environment, with the bounds above on every operator
    that can grow a value, every call and filter, and ``~``."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})  # never folded at compile time
    code_generator_class = _BoundedCodeGenerator

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        self.globals["raise_exception"] = _raise_exception
        self.filters["tojson"] = _tojson
        self.filters = {name: _bounded(f) for name, f in self.filters.items()}
        self.tests = {name: _timed(f) for name, f in self.tests.items()}

    def tick(self) -> None:
        _CLOCK.tick()

    def getitem(self, obj: Any, argument: Any) -> Any:
        _CLOCK.tick()
        return super().getitem(obj, argument)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _CLOCK.tick()
        if operator == "**" and isinstance(right, int) and right > MAX_TEMPLATE_EXPONENT:
            raise SecurityError(f"the chat template raised a number to the power {right}")
        if operator == "%" and isinstance(left, str):  # '%0999999999d' % 1: widths first
            specs = _FORMAT_SPEC.findall(left)
            _check_sizes([int(n) for spec in specs for n in re.findall(r"\d+", spec)])
        if operator == "*":
            for count, seq in ((left, right), (right, left)):
                repeats = isinstance(count, int) and isinstance(seq, str | list | tuple)
                if repeats and count * len(seq) > MAX_TEMPLATE_VALUE:
                    raise SecurityError("the chat template repeated a value too many times")
        return _checked_result(super().call_binop(context, operator, left, right))

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _CLOCK.tick()
        _check_sizes([*args, *kwargs.values()])
        return _checked_result(super().call(__context, __obj, *args, **kwargs))

    def bounded_join(self, parts: Sequence[Any]) -> str:
        _CLOCK.tick()
        return _checked_result("".join(map(str, parts)))  # type: ignore[no-any-return]

    def timed_items(self, items: Iterable[Any]) -> Iterator[Any]:
        for item in items:
            _CLOCK.tick()
            yield item


def _bounded(f: Callable[..., Any]) -> Callable[..., Any]:
    """A filter that ticks the render's clock, with :func:`_check_sizes` on its arguments
    and a bounded result."""

    @functools.wraps(f)  # keeps jinja's pass_context marks
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _CLOCK.tick()
        _check_sizes([*args[1:], *kwargs.values()])
        return _checked_result(f(*args, **kwargs))

    return bounded


def _timed(f: Any) -> Callable[..., Any]:  # jinja types its tests as `function`
    """A test that ticks the render's clock (``x is in y`` reads all of ``y``)."""

    @functools.wraps(f)  # keeps jinja's pass_context marks
    def timed(*args: Any, **kwargs: Any) -> Any:
        _CLOCK.tick()
        return f(*args, **kwargs)

    return timed


def compile_template(source: str) -> Template:
    """Compile a chat template in a bounded sandbox (:class:`_ChatTemplateEnvironment`)."""
    if not isinstance(source, str):
        raise ValueError(f"tokenizer.chat_template is {type(source).__name__}, not text")
    try:
        return _ChatTemplateEnvironment().from_string(source)
    except (TemplateError, RecursionError) as e:
        raise ValueError(f"invalid chat template: {e}") from e


class ChatFormatter:
    """Messages (``{"role", "content"}`` dicts) → prompt ending with the generation prompt."""

    def __init__(
        self, tokenizer: Tokenizer, template: str | None, why_bitnet: str = "chosen"
    ) -> None:
        """``template=None`` selects the BitNet-2B-4T format (``why_bitnet`` says why, for
        :meth:`describe`)."""
        self.tokenizer = tokenizer
        self.template_source = template
        self._why_bitnet = why_bitnet
        self._template = compile_template(template) if template is not None else None
        self.knows_tools = template_knows_tools(template)
        self.tool_syntax: ToolCallSyntax = tool_call_syntax(template)
        # Qwen3-style reasoning: the model may open its reply with <think>…</think>
        self.reasons = template is not None and "<think>" in template
        self._bos = self._piece(tokenizer.bos_id)
        self._eos = self._piece(tokenizer.eos_id)
        eot = tokenizer.eot_id if tokenizer.eot_id is not None else tokenizer.eos_id
        self._eot = self._piece(eot)

    def _piece(self, token_id: int | None) -> str:
        return "" if token_id is None else self.tokenizer.id_to_piece(token_id)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], tokenizer: Tokenizer) -> ChatFormatter:
        template = metadata.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise ValueError(f"tokenizer.chat_template is {type(template).__name__}, not text")
        arch = metadata.get("general.architecture")
        if is_bitnet_chat(template, arch):
            if not template:
                why = "the file has no chat template"
            elif BROKEN_TEMPLATE_MARK in template:
                why = "the file's template is Microsoft's placeholder"
            else:
                why = f"architecture {arch}"
            chat = cls(tokenizer, None, why)
        else:
            chat = cls(tokenizer, template)
        log.info("chat: %s", chat.describe())
        return chat

    def describe(self) -> str:
        """Which format this is and why, in words (logged at load)."""
        source = self.template_source
        if source is None:
            return f"the BitNet-2B-4T format ({self._why_bitnet})"
        if "<|im_start|>" in source:
            kind = "ChatML with <think>" if self.reasons else "ChatML"
        elif "<|start_header_id|>" in source:
            kind = "LLaMA-3"
        elif "<|assistant|>" in source:
            kind = "Falcon3"
        else:
            kind = "custom"
        tools = "knows tools" if self.knows_tools else "generic tool format"
        return f"the file's chat template ({kind}, {tools})"

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, tokenizer: Tokenizer) -> ChatFormatter:
        """:meth:`from_metadata`; a template that cannot compile is a ``GGUFError``
        naming the file."""
        from bitserve.gguf.reader import GGUFError

        try:
            return cls.from_metadata(gguf.metadata, tokenizer)
        except ValueError as e:
            raise GGUFError(gguf.path, str(e)) from e

    @property
    def is_bitnet_format(self) -> bool:
        return self._template is None

    # -- rendering ---------------------------------------------------------------------

    def _render(
        self,
        messages: list[ChatMessage],
        contents: list[str],
        add_generation_prompt: bool,
        extra: Mapping[str, Any],
    ) -> str:
        """The prompt text with ``contents[i]`` standing for message i's content;
        ``extra``: more template variables (``tools``, ``chat_template_kwargs``)."""
        template = self._template
        if template is None:
            turns = [
                f"{m.role.capitalize()}: {c}{self._eot}"
                for m, c in zip(messages, contents, strict=True)
            ]
            tail = "Assistant: " if add_generation_prompt else ""
            return self._bos + "".join(turns) + tail
        variables = {
            **extra,
            "messages": [m.template_value(c) for m, c in zip(messages, contents, strict=True)],
            "bos_token": self._bos,
            "eos_token": self._eos,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return _CLOCK.run(lambda: template.render(**variables))
        except TemplateError as e:
            raise ValueError(f"chat template failed: {e}") from e
        except (ArithmeticError, MemoryError, RecursionError, TypeError, LookupError) as e:
            # a template's own bug (range(10**9), a missing key): the file's, said as such
            raise ValueError(f"chat template failed: {type(e).__name__}: {e}") from e

    def _contents(self, messages: list[ChatMessage]) -> list[str]:
        if self._template is None:
            return [m.content.strip() for m in messages]
        return [m.content for m in messages]

    def _encoding_contents(self, messages: list[ChatMessage]) -> list[str]:
        """Contents for :meth:`encode`: a message with ``token_ids`` keeps its marker in
        the real rendering too, so its ids can be spliced in where the marker lands."""
        contents = self._contents(messages)
        return [
            _marker(i) if m.token_ids is not None else c
            for i, (m, c) in enumerate(zip(messages, contents, strict=True))
        ]

    def _prepare(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None,
        template_kwargs: Mapping[str, Any] | None,
    ) -> tuple[list[ChatMessage], dict[str, Any]]:
        """Validated messages (tools written as text for formats that do not know them)
        and the extra template variables."""
        checked = validate_messages(messages)
        extra: dict[str, Any] = {}
        for key, value in (template_kwargs or {}).items():
            if key in RESERVED_VARIABLES:
                raise ValueError(f"chat_template_kwargs: {key!r} cannot be set")
            extra[key] = value
        uses_tools = bool(tools) or any(m.tool_calls or m.role == "tool" for m in checked)
        if uses_tools and not self.knows_tools:
            checked = generic_tool_messages(checked, tools)  # tools and calls: contents now
        elif tools:
            extra["tools"] = [dict(t) for t in tools]
        self._check_template_text(checked, extra)
        return checked, extra

    def _check_template_text(self, messages: list[ChatMessage], extra: dict[str, Any]) -> None:
        """What the template renders as its own text must not spell control tokens."""
        texts = [json.dumps(extra, ensure_ascii=False)] if extra else []
        for m in messages:
            if m.reasoning_content or m.tool_call_id or m.tool_calls:
                texts += [m.reasoning_content or "", m.tool_call_id or ""]
                texts += [c.name + c.arguments for c in m.tool_calls]
        for text in texts:
            if any(isinstance(p, int) for p in self.tokenizer.split_special(text)):
                raise ValueError(
                    "tools, tool calls, reasoning and chat_template_kwargs must not contain "
                    "control-token text"
                )

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt as text (for display and debugging; use :meth:`encode` for ids)."""
        checked, extra = self._prepare(messages, tools, template_kwargs)
        return self._render(checked, self._contents(checked), add_generation_prompt, extra)

    # -- encoding ----------------------------------------------------------------------

    def encode(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """Token ids of the prompt; message contents can never become control tokens.

        A message's ``token_ids`` replace its content's encoding verbatim (see the module
        docstring); ids outside the vocabulary are a ValueError. ``tools`` (OpenAI's tool
        objects) and ``template_kwargs`` are passed to the template (module docstring)."""
        checked, extra = self._prepare(messages, tools, template_kwargs)
        self._check_ids(checked)
        contents = self._encoding_contents(checked)
        real = self._render(checked, contents, add_generation_prompt, extra)
        # an empty content has nothing to hide, and templates test contents for truth
        # (Qwen3 writes a newline before a call only after text): it stays empty
        markers = [_marker(i) if c else "" for i, c in enumerate(contents)]
        marked = self._render(checked, markers, add_generation_prompt, extra)
        segments = self._align(real, marked, contents, checked)
        if segments is None:
            if any(m.token_ids is not None for m in checked):
                raise ValueError(
                    "this chat template rewrites message contents, so messages with "
                    "token_ids cannot be encoded"
                )
            segments = self._segments_unaligned(real, marked)
        ids = self._encode_segments(segments)
        bos = self.tokenizer.bos_id
        if self.tokenizer.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def _check_ids(self, messages: list[ChatMessage]) -> None:
        vocab = self.tokenizer.vocab_size
        for i, m in enumerate(messages):
            if m.token_ids is not None and any(t >= vocab for t in m.token_ids):
                raise ValueError(f"message {i}: token_ids outside the vocabulary ({vocab})")

    def _align(
        self, real: str, marked: str, contents: list[str], messages: list[ChatMessage]
    ) -> list[Segment] | None:
        """Split ``real`` into the template's own text (searched for control tokens) and
        the contents (kept as text, or a message's given ids), using ``marked`` to tell
        them apart.

        A template may trim contents, so each content may appear stripped; None when
        ``real`` cannot be rebuilt exactly that way (the template rewrote a content).
        """
        pieces = _MARKER_RE.split(marked)  # template text, index, template text, ...
        segments: list[Segment] = []
        pos = 0
        for k, piece in enumerate(pieces):
            if k % 2 == 0:
                if _MARK_OPEN in piece or _MARK_CLOSE in piece or not real.startswith(piece, pos):
                    return None
                segments.extend(self.tokenizer.split_special(piece))
                pos += len(piece)
                continue
            content = contents[int(piece)]
            after = pieces[k + 1]
            for candidate in (content, content.strip(), content.lstrip(), content.rstrip()):
                end = pos + len(candidate)
                if real.startswith(candidate, pos) and real.startswith(after, end):
                    break
            else:
                return None
            given = messages[int(piece)].token_ids
            if given is not None and candidate != content:
                return None  # the template rewrote the marker standing for given ids
            segments.append(candidate if given is None else given)
            pos = end
        return segments if pos == len(real) else None

    def _segments_unaligned(self, real: str, marked: str) -> list[Segment]:
        """For templates that rewrite contents: accept the rendered prompt only if it has
        the same control tokens as the template with contents left out."""
        segments: list[Segment] = list(self.tokenizer.split_special(real))
        own = [p for p in self.tokenizer.split_special(marked) if isinstance(p, int)]
        if [p for p in segments if isinstance(p, int)] != own:
            raise ValueError(
                "a message contains control-token text and this chat template rewrites "
                "message contents, so the prompt cannot be encoded safely"
            )
        return segments

    def _encode_segments(self, segments: list[Segment]) -> list[int]:
        """Encode runs of text as ordinary text (allow_special=False) between control ids
        and given id sequences (both copied as they are)."""
        ids: list[int] = []
        text: list[str] = []
        for segment in [*segments, ()]:
            if isinstance(segment, str):
                text.append(segment)
                continue
            if text:
                ids += self.tokenizer.encode("".join(text), allow_special=False)
                text = []
            if isinstance(segment, int):
                ids.append(segment)
            else:
                ids.extend(segment)
        return ids
