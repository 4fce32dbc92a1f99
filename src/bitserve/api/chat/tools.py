"""OpenAI function calling: ``tools``, ``tool_choice`` and ``parallel_tool_calls`` → the
grammar the reply must follow, and the reply's text → ``tool_calls``.

The model writes calls in its family's syntax (``ChatFormatter.tool_syntax``: Hermes
``<tool_call>`` blocks, or Falcon3's single JSON array), each call the JSON object
``{"name": ..., "arguments": {...}}``. Decoding is constrained so that every call parses
and its arguments fit the function's ``parameters`` schema:

- ``"required"``: the whole reply is one call (several with ``parallel_tool_calls``);
- a named function: the same, with only that function;
- ``"auto"``: either calls, or text that does not start with the syntax's opening tag
  (a grammar alternation decided by the reply's first tokens);
- ``"none"``: no constraint and no parsing: the reply is text.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bitserve.api.errors import InvalidParameterError
from bitserve.engine.constraint import json_lark
from bitserve.tokenizer.tools import ToolCallSyntax

NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
CHOICES = ("none", "auto", "required")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _function(i: int, tool: Any) -> tuple[str, dict[str, Any]]:
    """``tools[i]`` → (name, parameters schema); 400 for anything else."""
    param = f"tools[{i}]"
    if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
        raise InvalidParameterError(f'{param}: must be {{"type": "function", ...}}', "tools")
    function = tool.get("function")
    if not isinstance(function, Mapping):
        raise InvalidParameterError(f"{param}.function: must be an object", "tools")
    name = function.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidParameterError(
            f"{param}.function.name: must be 1-64 letters, digits, '_' or '-'", "tools"
        )
    parameters = function.get("parameters", EMPTY_PARAMETERS)
    if not isinstance(parameters, Mapping):
        raise InvalidParameterError(f"{param}.function.parameters: must be an object", "tools")
    return name, _object_schema(parameters, f"{param}.function.parameters")


def _object_schema(parameters: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``parameters`` as a schema of objects only: arguments are a JSON object, as OpenAI's
    clients read them (``{}`` or a schema without ``type`` allowed any value: a number,
    ``true``). Another type is a 400."""
    kind = parameters.get("type", "object")
    if kind == "object" or (isinstance(kind, list) and "object" in kind):
        return {**parameters, "type": "object"}
    raise InvalidParameterError(
        f'{where}: must describe an object ("type": "object"), got "type": {json.dumps(kind)}',
        "tools",
    )


@dataclass(slots=True)
class ToolPlan:
    """What a request asked of tools: ``functions`` (name → parameters schema), ``choice``
    ("none", "auto", "required" or a function name), ``parallel`` calls allowed."""

    tools: list[dict[str, Any]]
    functions: dict[str, dict[str, Any]]
    choice: str
    parallel: bool
    syntax: ToolCallSyntax

    @property
    def active(self) -> bool:
        """False for ``"none"``: the reply is plain text, never parsed for calls."""
        return self.choice != "none"

    @property
    def forced(self) -> bool:
        """The reply must be calls (``"required"`` or a named function)."""
        return self.choice not in ("none", "auto")

    def call_schema(self) -> dict[str, Any]:
        """One call: ``{"name": <a function>, "arguments": <its parameters>}`` (name
        first: streaming reads it before the arguments). Each function's parameters live
        under ``$defs/<name>`` (:func:`_moved`), so their own ``$defs`` and anchors still
        resolve, each function's in its own."""
        names = list(self.functions) if self.choice in CHOICES else [self.choice]
        options = [
            {
                "type": "object",
                "properties": {"name": {"const": n}, "arguments": {"$ref": f"#/$defs/{n}"}},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for n in names
        ]
        defs = {n: _moved(n, self.functions[n]) for n in names}
        call = options[0] if len(options) == 1 else {"anyOf": options}
        return {**call, "$defs": defs}

    def calls_grammar(self) -> str:
        """Lark rules: ``calls`` (the reply's calls in the model's syntax)."""
        s = self.syntax
        call = json_lark(self.call_schema())
        if s.array:
            more = f'("{_lark(", ")}" call_json)*' if self.parallel else ""
            return (
                f'calls: "{_lark(s.open)}[" call_json {more} "]{_lark(s.close)}"\n'
                f"call_json: {call}\n"
            )
        more = f'("{_lark(s.separator)}" call)*' if self.parallel else ""
        return f'calls: call {more}\ncall: "{_lark(s.open)}" {call} "{_lark(s.close)}"\n'

    def text_lexeme(self) -> str:
        """Lark token ``TEXT``: any reply that does not open a call (after whitespace,
        which the reply parser skips after reasoning)."""
        opening = re.escape(self.syntax.open.rstrip("\n"))
        return f"TEXT: /(?s:.+)/ & ~/(?s:[ \\t\\n]*{_lark_regex(opening)}.*)/\n"


def _moved(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """``name``'s ``parameters`` as they sit under ``#/$defs/<name>`` in the call schema:
    their refs rebased there (:func:`_rebase_refs`), and their own ``$id`` dropped, refs
    naming it made local first. Kept, it was shared by every function that had it (one's
    refs read another's), and the closing of objects (:func:`closed_objects`), which reads
    refs as pointers from the root, missed what they combine: a 400 for a valid schema."""
    own = parameters.get("$id")
    own = own.removesuffix("#") if isinstance(own, str) else None  # draft 7 allowed "x#"
    unscoped = {k: v for k, v in parameters.items() if k != "$id"}
    base, prefix = f"#/$defs/{name}", f"tool_{name}."
    rebased: dict[str, Any] = _rebase_refs(unscoped, base, prefix, own)
    return rebased


def _rebase_refs(schema: Any, base: str, prefix: str, own_id: Any = None) -> Any:
    """``schema`` with every local JSON-pointer ``$ref`` ("#", "#/...", or ``own_id`` and
    one) pointing below ``base`` instead, and ``prefix`` before every ``$anchor`` and
    anchor ref ("#name"): anchors are found by name in the whole document, so two
    functions' would meet. A part with its own ``$id`` resolves its refs and anchors
    against itself: left as it is."""
    if isinstance(schema, dict) and "$id" in schema:
        return schema
    if isinstance(schema, list):
        return [_rebase_refs(item, base, prefix, own_id) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _rebase_refs(v, base, prefix, own_id) for k, v in schema.items()}
    ref, anchor = schema.get("$ref"), schema.get("$anchor")
    if isinstance(ref, str) and isinstance(own_id, str) and ref.split("#")[0] == own_id:
        ref = "#" + ref.partition("#")[2]
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
        out["$ref"] = base + ref[1:]
    elif isinstance(ref, str) and ref.startswith("#"):
        out["$ref"] = "#" + prefix + ref[1:]
    if isinstance(anchor, str):
        out["$anchor"] = prefix + anchor
    return out


def _lark(text: str) -> str:
    """``text`` inside a Lark string literal."""
    return json.dumps(text)[1:-1]


def _lark_regex(pattern: str) -> str:
    return pattern.replace("/", "\\/")


def tool_plan(
    tools: Sequence[Any] | None,
    tool_choice: str | Mapping[str, Any] | None,
    parallel_tool_calls: bool | None,
    syntax: ToolCallSyntax,
) -> ToolPlan | None:
    """Validate the request's tool fields (400s name the field); None without tools."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidParameterError(
                f"tool_choice: {_choice_text(tool_choice)} needs tools", "tool_choice"
            )
        return None
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        name, parameters = _function(i, tool)
        if name in functions:
            raise InvalidParameterError(f"tools[{i}]: a second function named {name!r}", "tools")
        functions[name] = parameters
    choice = _choice(tool_choice, functions)
    return ToolPlan(
        [dict(t) for t in tools], functions, choice, parallel_tool_calls is not False, syntax
    )


def _choice_text(choice: object) -> str:
    return json.dumps(choice) if isinstance(choice, Mapping) else repr(choice)


def _choice(choice: str | Mapping[str, Any] | None, functions: Mapping[str, Any]) -> str:
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        if choice in CHOICES:
            return choice
        raise InvalidParameterError(
            f"tool_choice: {choice!r} is not one of none, auto, required or "
            '{"type": "function", "function": {"name": ...}}',
            "tool_choice",
        )
    function = choice.get("function")
    name = function.get("name") if isinstance(function, Mapping) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise InvalidParameterError(
            f'tool_choice: expected {{"type": "function", "function": {{"name": ...}}}}, '
            f"got {_choice_text(choice)}",
            "tool_choice",
        )
    if name not in functions:
        raise InvalidParameterError(f"tool_choice: no tool named {name!r}", "tool_choice")
    return name


# ---- reading calls out of the reply ---------------------------------------------------------

_CALL_HEAD = re.compile(r'\{"name": "((?:[^"\\]|\\.)*)", "arguments": ')


@dataclass(slots=True)
class ParsedCall:
    id: str
    name: str
    arguments: str = ""
    complete: bool = False


class NamedCall(Protocol):
    """A function call as the parser reads it or the store keeps it."""

    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def arguments(self) -> str: ...


def wire_tool_calls(calls: Iterable[NamedCall]) -> list[dict[str, Any]]:
    """OpenAI's ``tool_calls`` objects (``arguments`` JSON text, as the model wrote it)."""
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls
    ]


@dataclass(slots=True)
class ToolCallDelta:
    """A streamed piece of call ``index``: the call's start (``id`` and ``name`` set,
    ``arguments == ""``) or more of its arguments' text."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


@dataclass(slots=True)
class ToolCallReader:
    """Reads calls out of the reply text as it streams (the text after any reasoning).

    Between call objects there is only syntax (tags, ``[``, ``, ``), never a ``{``, so the
    next object starts at the next ``{``; the constrained output writes ``name`` first
    and no whitespace outside strings, so a call's arguments are the text from after
    ``"arguments": `` to the object's last ``}``. Argument text is released as it comes,
    except a last ``}`` that may be the object's own.
    """

    text: str = ""
    calls: list[ParsedCall] = field(default_factory=list)
    _object_start: int | None = None
    _args_start: int = 0
    _sent: int = 0  # argument characters of the current call already released
    _scan: int = 0  # where to look for the next object

    def feed(self, text: str) -> list[ToolCallDelta]:
        self.text += text
        out: list[ToolCallDelta] = []
        while True:
            if self._object_start is None:
                start = self.text.find("{", self._scan)
                if start < 0:
                    return out
                self._object_start = start
            if not self._head(out) or not self._arguments(out):
                return out

    def _head(self, out: list[ToolCallDelta]) -> bool:
        """The current object's name, once its head is complete."""
        if self.calls and not self.calls[-1].complete:
            return True
        assert self._object_start is not None
        match = _CALL_HEAD.match(self.text, self._object_start)
        if match is None:
            return False
        name = json.loads(f'"{match.group(1)}"')
        self.calls.append(ParsedCall(new_call_id(), name))
        self._args_start, self._sent = match.end(), 0
        out.append(ToolCallDelta(len(self.calls) - 1, "", self.calls[-1].id, name))
        return True

    def _arguments(self, out: list[ToolCallDelta]) -> bool:
        """Release the current call's argument text; True once the call is complete."""
        assert self._object_start is not None
        call, index = self.calls[-1], len(self.calls) - 1
        end = _object_end(self.text, self._object_start)
        if end is None:
            ready = self.text[self._args_start :]
            ready = ready[:-1] if ready.endswith("}") else ready
        else:
            ready = self.text[self._args_start : end - 1]
        if len(ready) > self._sent:
            out.append(ToolCallDelta(index, ready[self._sent :]))
            self._sent = len(ready)
        call.arguments = ready
        if end is None:
            return False
        call.complete = True
        self._object_start, self._scan = None, end
        return True


_DECODER = json.JSONDecoder()


def _object_end(text: str, start: int) -> int | None:
    """End of the JSON object at ``start`` if it is complete."""
    try:
        _, end = _DECODER.raw_decode(text, start)
    except ValueError:
        return None
    return end
