"""What a chat reply must look like: ``response_format``, tools and reasoning → one
constraint for the engine, and the parser that reads the reply back.

- ``response_format``: ``{"type": "text"}`` (free), ``{"type": "json_object"}`` (any JSON
  object) or ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``;
- tools (``tools.py``): calls in the family's syntax, forced or as an alternative to text;
- reasoning: when the template reasons and ``enable_thinking`` is not false, the grammar
  lets the reply open with a free ``<think>…</think>`` block before the constrained part.

A request with nothing to constrain gets no constraint (no mask cost). Compiled grammars
are cached by the engine's ``ConstraintCompiler``; errors are 400s naming the field, with
the library's reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bitserve.api.chat.reply import ReplyParser
from bitserve.api.chat.tools import ToolPlan
from bitserve.api.errors import InvalidParameterError
from bitserve.engine.constraint import (
    CompiledConstraint,
    ConstraintCompiler,
    ConstraintError,
    json_lark,
)

FORMAT_TYPES = ("text", "json_object", "json_schema")

# a reasoning block: free text up to </think> (llguidance's lazy ``stop``), then spaces
THINK_RULES = 'think: "<think>" think_text /[ \\n]*/\nthink_text[stop="</think>"]: /(?s:.*)/\n'
OPEN_THINK_RULES = 'think_rest: think_text /[ \\n]*/\nthink_text[stop="</think>"]: /(?s:.*)/\n'


def response_schema(response_format: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema the reply must satisfy (None: free text). 400 for a malformed
    ``response_format``."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind not in FORMAT_TYPES:
        raise InvalidParameterError(
            f"response_format: type must be one of {', '.join(FORMAT_TYPES)}, got {kind!r}",
            "response_format",
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise InvalidParameterError(
            'response_format: json_schema needs {"name": ..., "schema": {...}}',
            "response_format",
        )
    schema = spec.get("schema", {})
    if not isinstance(schema, Mapping):
        raise InvalidParameterError(
            "response_format: json_schema.schema must be an object", "response_format"
        )
    return dict(schema)


@dataclass(frozen=True, slots=True)
class OutputPlan:
    """How to constrain and read one chat reply."""

    constraint: CompiledConstraint | None = None
    tools: ToolPlan | None = None
    reasoning: bool = False  # look for <think>…</think> at the start of the reply
    in_think: bool = False  # the prompt itself opened <think>
    json_reply: bool = False  # response_format makes the text answer JSON

    def check_stop(self, stop: list[str]) -> None:
        """400 for stop strings with a JSON reply (response_format): one could cut the
        JSON anywhere (a ``"`` inside it, a key), leaving text that does not parse behind
        a ``finish_reason`` that says it ended. Tool calls are kept from them instead
        (:attr:`stop_until`)."""
        if stop and self.json_reply:
            raise InvalidParameterError(
                "stop: cannot be combined with response_format json_object/json_schema "
                "(a stop string could cut the JSON)",
                "stop",
            )

    @property
    def call_open(self) -> str | None:
        """The tag that opens the model's tool calls, when the reply may hold some."""
        tools = self.tools
        return tools.syntax.open if tools is not None and tools.active else None

    @property
    def stop_until(self) -> str:
        """Stop strings apply to the text before the first call, never inside calls."""
        return self.call_open or ""

    def parser(self) -> ReplyParser:
        return ReplyParser(self.reasoning, self.in_think, self.call_open)


def plan_output(
    compiler: ConstraintCompiler,
    schema: dict[str, Any] | None,
    tools: ToolPlan | None,
    reasoning: bool,
    in_think: bool,
) -> OutputPlan:
    """The constraint for a reply with JSON ``schema`` (or None), ``tools`` and maybe
    ``reasoning`` first."""
    active = tools if tools is not None and tools.active else None
    if active is not None:
        _check_tools(compiler, active)
    if schema is None and active is None:
        return OutputPlan(None, tools, reasoning, in_think)
    if active is None and not reasoning and not in_think:
        assert schema is not None
        return OutputPlan(_compile_schema(compiler, schema), tools, json_reply=True)
    rules = []
    if schema is not None:
        rules.append(f"answer: {_embedded(lambda: json_lark(schema), 'response_format')}\n")
        answer = "answer"
    else:
        answer = "TEXT"
    if active is not None:
        rules.append(_embedded(active.calls_grammar, "tools"))
        if answer == "TEXT":
            rules.append(active.text_lexeme())
        body = "calls" if active.forced else f"calls | {answer}"
    else:
        body = answer
    if in_think:
        rules.append(OPEN_THINK_RULES)
        start = f"start: think_rest ({body})\n"
    elif reasoning:
        rules.append(THINK_RULES)
        start = f"start: think? ({body})\n"
    else:
        start = f"start: {body}\n"
    grammar = start + "".join(rules)
    param = "response_format" if schema is not None and active is None else "tools"
    try:
        constraint = compiler.lark(grammar, param)
    except ConstraintError as exc:
        raise InvalidParameterError(f"{param}: {exc.reason}", param) from exc
    return OutputPlan(constraint, tools, reasoning, in_think, schema is not None)


def _embedded(rules: Callable[[], str], param: str) -> str:
    """Grammar rules that embed a schema of ``param``: a 400 where it cannot be used."""
    try:
        return rules()
    except ConstraintError as exc:
        raise InvalidParameterError(
            f"{param}: the schema cannot be used: {exc.reason}", param
        ) from exc


def _compile_schema(compiler: ConstraintCompiler, schema: dict[str, Any]) -> CompiledConstraint:
    try:
        return compiler.json_schema(schema, "response_format")
    except ConstraintError as exc:
        raise InvalidParameterError(
            f"response_format: the schema cannot be used: {exc.reason}", "response_format"
        ) from exc


def _check_tools(compiler: ConstraintCompiler, tools: ToolPlan) -> None:
    """Each function's parameters alone, so a bad schema is blamed on its tool."""
    for i, (name, parameters) in enumerate(tools.functions.items()):
        try:
            compiler.json_schema(parameters)
        except ConstraintError as exc:
            raise InvalidParameterError(
                f"tools[{i}] ({name}): the parameters schema cannot be used: {exc.reason}",
                "tools",
            ) from exc
