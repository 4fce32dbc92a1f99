"""llama.cpp's GBNF, read as llama.cpp's parser reads it (``src/llama-grammar.cpp``) and
written in llguidance's Lark syntax.

llguidance ships a converter (``gbnf_to_lark``), but what it writes is not always what
llama.cpp reads: a repeated group that is itself repeated loses its brackets (``("a"*)+``
became ``"a"*+``, a syntax error); ``foo-bar``/``fooBar``, ``Ab``/``ab`` and a rule named
``start`` collided after renaming (a 400 for a valid grammar); ``.`` skipped newlines;
``\\u0000`` and ``\\U0001F600`` escapes came out unreadable; ``\\-`` was refused; ``&&``,
``--`` and ``~~`` inside a character class became Rust's class operators; ``{0}`` was
refused; ``_`` and non-ASCII letters were taken in names.

So this module parses GBNF itself, with llama.cpp's rules: names of ASCII letters, digits
and ``-``; escapes ``\\x..``, ``\\u....``, ``\\U........``, ``\\t \\r \\n \\\\ \\"
\\[ \\] \\-``; ``.`` is any character; ``[]`` and ``[^]`` match the empty string; a rule
defined twice keeps its last definition; ``{m,n}`` with llama.cpp's limits. Rules built
of characters only (and of such rules) become Lark terminals, as the library's converter
makes them: each is one lexeme, which keeps masks fast (a lexeme per character is more
Earley items than llguidance allows a mask on a real vocabulary). llguidance lexes
greedily, so where such a rule could stop early and the next item could begin, only the
longest match is taken (``root ::= num num`` with ``num ::= [0-9]+`` admits no output);
docs/api.md says so.

Not taken (a :class:`GbnfError`): token references (``<[id]>``, ``<|tok|>``, ``!<...>``),
code points that are not Unicode characters (surrogates, above U+10FFFF), ``{m,n}`` with
``n < m``. Taken though llama.cpp refuses it: left recursion (llguidance's Earley parser
handles it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

# The library's forcing off, as llama.cpp has none: its grammars mask tokens, never force
# the canonical tokens of bytes only one way of going on allows. With forcing, llguidance
# 1.9 never returned where a lexeme could only go on by a byte that also extends it
# (`root ::= x "x" | "z"` with `x ::= "x"+`, once an "x" was written): 30 characters of
# GBNF held the engine thread, and every generation, for good.
NO_FORCING = '%llguidance {"no_forcing": true}'
MAX_REPETITION = 2000  # llama.cpp's MAX_REPETITION_THRESHOLD

_ESCAPES = {"t": "\t", "r": "\r", "n": "\n", "\\": "\\", '"': '"', "[": "[", "]": "]", "-": "-"}
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}
_ANY = "/(?s:.)/"  # any character, newlines too
_NOTHING = "/[^\\x{0}-\\x{10FFFF}]/"  # no character at all


class GbnfError(ValueError):
    """A grammar llama.cpp would refuse (or bitserve cannot follow); one sentence."""


# -- the grammar, as parsed ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Literal:
    text: str


@dataclass(frozen=True, slots=True)
class CharClass:
    negated: bool
    ranges: tuple[tuple[int, int], ...]  # inclusive code point ranges


@dataclass(frozen=True, slots=True)
class AnyChar:
    pass


@dataclass(frozen=True, slots=True)
class RuleRef:
    name: str


@dataclass(frozen=True, slots=True)
class Group:
    alternatives: tuple[tuple[Item, ...], ...]


@dataclass(frozen=True, slots=True)
class Repeat:
    item: Item
    min_times: int
    max_times: int | None  # None: no upper bound


Item = Literal | CharClass | AnyChar | RuleRef | Group | Repeat
Alternatives = tuple[tuple[Item, ...], ...]


def _is_word_char(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c == "-")


class _Parser:
    """llama.cpp's recursive descent over the text; positions are string indexes."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.rules: dict[str, Alternatives] = {}
        self.refs: list[str] = []  # every rule referenced, in order
        self.symbols = 0  # llama.cpp's symbol count, for its repetition limit

    def at(self, pos: int, n: int = 1) -> str:
        return self.text[pos : pos + n]

    def where(self, pos: int) -> str:
        line = self.text.count("\n", 0, pos) + 1
        near = self.text[pos : pos + 20]
        return f"line {line}, at {near!r}" if near else f"line {line}, at the end"

    def fail(self, what: str, pos: int) -> GbnfError:
        return GbnfError(f"{what} ({self.where(pos)})")

    def space(self, pos: int, newline_ok: bool) -> int:
        while pos < len(self.text):
            c = self.text[pos]
            if c == "#":
                while pos < len(self.text) and self.text[pos] not in "\r\n":
                    pos += 1
            elif c in " \t" or (newline_ok and c in "\r\n"):
                pos += 1
            else:
                break
        return pos

    def name(self, pos: int) -> tuple[str, int]:
        end = pos
        while end < len(self.text) and _is_word_char(self.text[end]):
            end += 1
        if end == pos:
            raise self.fail("expecting a rule name (ASCII letters, digits and '-')", pos)
        return self.text[pos:end], end

    def integer(self, pos: int) -> tuple[int, int]:
        end = pos
        while end < len(self.text) and self.text[end] in "0123456789":
            end += 1
        if end == pos:
            raise self.fail("expecting an integer", pos)
        return int(self.text[pos:end]), end

    def char(self, pos: int) -> tuple[int, int]:
        """One character of a literal or a class: its code point and the next position."""
        if pos >= len(self.text):
            raise self.fail("unexpected end of input", pos)
        if self.text[pos] != "\\":
            return ord(self.text[pos]), pos + 1
        kind = self.at(pos + 1)
        if kind in _ESCAPES:
            return ord(_ESCAPES[kind]), pos + 2
        if kind in _HEX_DIGITS:
            size = _HEX_DIGITS[kind]
            digits = self.at(pos + 2, size)
            if len(digits) != size or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise self.fail(f"expecting {size} hex digits after \\{kind}", pos)
            return int(digits, 16), pos + 2 + size
        raise self.fail(f"unknown escape \\{kind}", pos)

    def parse(self) -> dict[str, Alternatives]:
        pos = self.space(0, True)
        while pos < len(self.text):
            pos = self.rule(pos)
        for ref in self.refs:
            if ref not in self.rules:
                raise GbnfError(f"rule '{ref}' is used but never defined")
        if "root" not in self.rules:
            raise GbnfError("no 'root' rule")
        return self.rules

    def rule(self, pos: int) -> int:
        name, pos = self.name(pos)
        self.symbols += 1
        pos = self.space(pos, False)
        if self.at(pos, 3) != "::=":
            raise self.fail("expecting ::=", pos)
        alternatives, pos = self.alternatives(self.space(pos + 3, True), False)
        self.rules[name] = alternatives  # defined again: the last definition counts
        if self.at(pos) == "\r":
            pos += 2 if self.at(pos + 1) == "\n" else 1
        elif self.at(pos) == "\n":
            pos += 1
        elif pos < len(self.text):
            raise self.fail("expecting the end of the line", pos)
        return self.space(pos, True)

    def alternatives(self, pos: int, nested: bool) -> tuple[Alternatives, int]:
        sequence, pos = self.sequence(pos, nested)
        found = [sequence]
        while self.at(pos) == "|":
            sequence, pos = self.sequence(self.space(pos + 1, True), nested)
            found.append(sequence)
        return tuple(found), pos

    def sequence(self, pos: int, nested: bool) -> tuple[tuple[Item, ...], int]:
        items: list[Item] = []
        sizes: list[int] = []  # llama.cpp's symbols per item, for its repetition limit
        while pos < len(self.text):
            c = self.text[pos]
            if c in "*+?{":
                if not items:
                    raise self.fail(f"'{c}' follows nothing", pos)
                items[-1], sizes[-1], pos = self.repeat(items[-1], sizes[-1], pos, nested)
                continue
            item: Item
            size = 1
            if c == '"':
                item, pos = self.literal(pos + 1)
            elif c == "[":
                item, pos = self.char_class(pos + 1)
            elif c == ".":
                item, pos = AnyChar(), pos + 1
            elif c in "<!":
                raise self.fail("token references (<...>) are not supported", pos)
            elif _is_word_char(c):
                name, pos = self.name(pos)
                self.refs.append(name)
                item = RuleRef(name)
            elif c == "(":
                before = self.symbols
                self.symbols += 1
                alternatives, pos = self.alternatives(self.space(pos + 1, True), True)
                if self.at(pos) != ")":
                    raise self.fail("expecting ')'", pos)
                item, size, pos = Group(alternatives), max(1, self.symbols - before), pos + 1
            else:
                break
            items.append(item)
            sizes.append(size)
            pos = self.space(pos, nested)
        return tuple(items), pos

    def literal(self, pos: int) -> tuple[Item, int]:
        chars: list[str] = []
        while self.at(pos) != '"':
            code, pos = self.char(pos)
            chars.append(_character(code, self, pos))
        return Literal("".join(chars)), pos + 1

    def char_class(self, pos: int) -> tuple[Item, int]:
        negated = self.at(pos) == "^"
        pos += negated
        ranges: list[tuple[int, int]] = []
        while self.at(pos) != "]":
            low, pos = self.char(pos)
            high = low
            if self.at(pos) == "-" and self.at(pos + 1) not in ("]", ""):
                high, pos = self.char(pos + 1)
            for code in (low, high):
                _character(code, self, pos)
            ranges.append((low, high))
        return CharClass(negated, tuple(ranges)), pos + 1

    def repeat(self, item: Item, size: int, pos: int, nested: bool) -> tuple[Item, int, int]:
        """``item`` followed by ``*``, ``+``, ``?`` or ``{m}``/``{m,}``/``{m,n}`` at ``pos``."""
        c = self.text[pos]
        low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}.get(c, (0, None))
        pos = self.space(pos + 1, nested)
        if c == "{":
            low, pos = self.integer(pos)
            pos = self.space(pos, nested)
            high = low
            if self.at(pos) == ",":
                pos = self.space(pos + 1, nested)
                high = None
                if self.at(pos).isdigit():
                    high, pos = self.integer(pos)
                    pos = self.space(pos, nested)
            if self.at(pos) != "}":
                raise self.fail("expecting '}'", pos)
            pos = self.space(pos + 1, nested)
            if low > MAX_REPETITION:
                raise self.fail(f"more than {MAX_REPETITION} repetitions", pos)
            if high is not None and high > MAX_REPETITION:
                high = None  # llama.cpp's reading: no upper bound
            if high is not None and high < low:
                raise self.fail(f"{{{low},{high}}}: the most is fewer than the least", pos)
        count = high if high else (low or 1)
        if size * count >= MAX_REPETITION:
            raise self.fail(
                f"a repetition expands to {MAX_REPETITION} rules or more (llama.cpp's limit)", pos
            )
        self.symbols += 1 if high is None else high - low
        return Repeat(item, low, high), size * count, pos


def _character(code: int, parser: _Parser, pos: int) -> str:
    if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
        raise parser.fail(f"U+{code:04X} is not a Unicode character", pos)
    return chr(code)


# -- the grammar, as written for llguidance ----------------------------------------------------


def _terminal_rules(rules: dict[str, Alternatives]) -> set[str]:
    """The rules other than ``root`` made of characters and such rules only, recursion
    apart: llguidance matches each as one lexeme (as ``gbnf_to_lark`` makes them), which
    keeps masks fast (a lexeme per character is too many Earley items for a real
    vocabulary: llguidance refuses the mask)."""

    def refs(item: Item) -> list[str]:
        if isinstance(item, RuleRef):
            return [item.name]
        if isinstance(item, Group):
            return [r for seq in item.alternatives for i in seq for r in refs(i)]
        return refs(item.item) if isinstance(item, Repeat) else []

    used = {name: {r for seq in alts for i in seq for r in refs(i)} for name, alts in rules.items()}
    terminal: set[str] = set()
    while True:
        more = {n for n, r in used.items() if n != "root" and n not in terminal and r <= terminal}
        if not more:
            return terminal
        terminal |= more


def _lark_names(rules: dict[str, Alternatives]) -> dict[str, str]:
    """Each rule's Lark name: unique whatever GBNF's names were (``a-b``, ``a_b``, ``Ab``
    and ``ab`` are four rules), never ``start``; upper case for :func:`_terminal_rules`."""
    terminal = _terminal_rules(rules)
    taken = {"start"}
    names = {}
    for name in rules:
        base = "g_" + re.sub(r"[^a-z0-9]", "_", name.lower())
        candidate, n = base, 1
        while candidate in taken:
            n += 1
            candidate = f"{base}_{n}"
        taken.add(candidate)
        names[name] = candidate.upper() if name in terminal else candidate
    return names


def _class_lexeme(item: CharClass) -> str:
    """Every character as ``\\x{...}``: nothing in the class reads as Rust's regex syntax
    (``&&``, ``--``, ``~~``, ``[:alpha:]``)."""

    def code(c: int) -> str:
        return f"\\x{{{c:X}}}"

    if not item.ranges:
        return '""'  # llama.cpp reads [] and [^] as no element at all
    ranges = [(lo, hi) for lo, hi in item.ranges if lo <= hi]  # [z-a] matches nothing
    body = "".join(code(lo) if lo == hi else f"{code(lo)}-{code(hi)}" for lo, hi in ranges)
    if not body:
        return _ANY if item.negated else _NOTHING
    return f"/[{'^' if item.negated else ''}{body}]/"


def _item(item: Item, names: dict[str, str]) -> str:
    if isinstance(item, Literal):
        return json.dumps(item.text, ensure_ascii=False)
    if isinstance(item, CharClass):
        return _class_lexeme(item)
    if isinstance(item, AnyChar):
        return _ANY
    if isinstance(item, RuleRef):
        return names[item.name]
    if isinstance(item, Group):
        return f"({_alternatives(item.alternatives, names)})"
    low, high = item.min_times, item.max_times
    if high == 0:
        return '""'  # {0} or {0,0}: nothing (llguidance refuses a range ending at 0)
    inner = f"({_item(item.item, names)})"  # always bracketed: ("a"*)+ stays a group
    suffix = {(0, None): "*", (1, None): "+", (0, 1): "?"}.get((low, high))
    return inner + (suffix or f"{{{low},{'' if high is None else high}}}")


def _alternatives(alternatives: Alternatives, names: dict[str, str]) -> str:
    return " | ".join(
        " ".join(_item(i, names) for i in sequence) if sequence else '""'
        for sequence in alternatives
    )


def gbnf_to_lark(text: str) -> str:
    """The GBNF grammar ``text`` in llguidance's Lark syntax; a :class:`GbnfError` for a
    grammar llama.cpp refuses or bitserve cannot follow."""
    rules = _Parser(text).parse()
    names = _lark_names(rules)
    lines = [NO_FORCING, f"start: {names['root']}"]
    lines += [f"{names[name]}: {_alternatives(alts, names)}" for name, alts in rules.items()]
    return "\n".join(lines) + "\n"
