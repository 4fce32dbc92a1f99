"""A reply's text → ``reasoning_content``, ``content`` and ``tool_calls``, as it streams.

Qwen3-style reasoning: a reply that opens with ``<think>`` (or a prompt that ends inside
one) keeps its text up to ``</think>`` as reasoning; the whitespace after ``</think>`` is
dropped. Then, when tools are active, a reply that opens with the family's call tag is
read as calls (``tools.ToolCallReader``); anything else is content. The same parser
serves a whole reply (``feed`` once, ``finish``) and a stream (``feed`` each token's text):
text that might still turn out to be a tag is held back until it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bitserve.api.chat.tools import ParsedCall, ToolCallDelta, ToolCallReader

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(slots=True)
class ReplyDelta:
    """New text of the reply, by field (empty strings and lists when nothing new)."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ReplyParser:
    """``reasoning``: the template reasons (look for ``<think>``); ``in_think``: the
    prompt already opened it; ``call_open``: the call tag when tools are active."""

    def __init__(
        self, reasoning: bool = False, in_think: bool = False, call_open: str | None = None
    ) -> None:
        self._stage = "think" if in_think else ("start" if reasoning else "body")
        self._call_open = call_open.rstrip("\n") if call_open else None
        self._held = ""
        self._skip_space = False
        self._cut = False
        self._thought = in_think  # the reply opened (or the prompt left open) <think>
        self.reasoning_tokens = 0  # tokens fed until </think> was read (feed one per token)
        self.reasoning = ""
        self.content = ""
        self.calls: ToolCallReader | None = None

    @property
    def has_reasoning(self) -> bool:
        return self._thought

    @property
    def tool_calls(self) -> list[ParsedCall]:
        """Every call whose name was read; a reply cut short (``length``) may end in one
        whose arguments are incomplete, as streaming has sent them."""
        return list(self.calls.calls) if self.calls is not None else []

    def feed(self, text: str, final: bool = False) -> ReplyDelta:
        """The reply's next text; ``final``: nothing follows (release what is held)."""
        delta = ReplyDelta()
        thinking_before = self._stage in ("start", "think")
        if thinking_before and not final:
            self.reasoning_tokens += 1  # undone below if the reply turns out not to reason
        buf, self._held = self._held + text, ""
        while True:
            step = getattr(self, f"_{self._stage}")
            rest = step(buf, delta, final)
            if rest is None:
                break
            buf = rest
        if thinking_before and self._stage not in ("start", "think") and not self._thought:
            self.reasoning_tokens = 0  # the reply did not open with <think> after all
        return delta

    def finish(self, cut: bool = False) -> ReplyDelta:
        """Release what is held; ``cut``: the reply ran out of tokens (``length``), so
        text that is the call tag's beginning was a call cut short, not content."""
        self._cut = cut
        return self.feed("", final=True)

    # each stage consumes what it can of buf; returns the rest for the next stage, or
    # None after holding back (in self._held) what it cannot decide yet

    def _start(self, buf: str, delta: ReplyDelta, final: bool) -> str | None:
        stripped = buf.lstrip()
        if stripped.startswith(THINK_OPEN):
            self._stage, self._thought = "think", True
            return stripped[len(THINK_OPEN) :].lstrip("\n")
        if THINK_OPEN.startswith(stripped) and not final:
            self._held = buf
            return None
        self._stage = "body"
        return buf

    def _think(self, buf: str, delta: ReplyDelta, final: bool) -> str | None:
        end = buf.find(THINK_CLOSE)
        if end >= 0:
            self._add_reasoning(buf[:end], delta)
            self._stage, self._skip_space = "body", True
            return buf[end + len(THINK_CLOSE) :]
        keep = 0 if final else _partial_suffix(buf, THINK_CLOSE)
        self._add_reasoning(buf[: len(buf) - keep], delta)
        self._held = buf[len(buf) - keep :]
        return None

    def _add_reasoning(self, text: str, delta: ReplyDelta) -> None:
        if not self.reasoning:
            text = text.lstrip("\n")
        self.reasoning += text
        delta.reasoning += text

    def _body(self, buf: str, delta: ReplyDelta, final: bool) -> str | None:
        if self._skip_space:
            buf = buf.lstrip()
            if not buf and not final:
                return None
            self._skip_space = False
        opening = self._call_open
        if opening is not None:
            if buf.startswith(opening):
                self._stage, self.calls = "calls", ToolCallReader()
                return buf
            if opening.startswith(buf) and not final:
                self._held = buf
                return None
            if opening.startswith(buf) and buf and self._cut:  # cut inside the call tag: a
                self._stage, self.calls = "calls", ToolCallReader()  # call, none readable
                return None
        self._stage = "content"
        return buf

    def _content(self, buf: str, delta: ReplyDelta, final: bool) -> str | None:
        self.content += buf
        delta.content += buf
        return None

    def _calls(self, buf: str, delta: ReplyDelta, final: bool) -> str | None:
        assert self.calls is not None
        delta.tool_calls += self.calls.feed(buf)
        return None
