"""Reading a reply as reasoning, content and tool calls, whole or split anywhere; and the
grammars tools and reasoning compile to."""

from __future__ import annotations

import itertools
import json

import pytest

from bitserve.api.chat.output import plan_output
from bitserve.api.chat.reply import ReplyParser
from bitserve.api.chat.tools import tool_plan
from bitserve.api.errors import InvalidParameterError
from bitserve.engine.constraint import ConstraintCompiler
from bitserve.model.demo import demo_tokenizer_metadata
from bitserve.tokenizer import Tokenizer
from bitserve.tokenizer.tools import FALCON3, HERMES, ToolCallSyntax

CALL_A = '{"name": "f", "arguments": {"a": "}{"}}'
CALL_B = '{"name": "g_2", "arguments": {}}'
HERMES_TWO = f"<tool_call>\n{CALL_A}\n</tool_call>\n<tool_call>\n{CALL_B}\n</tool_call>"
FALCON_TWO = f"<tool_call>\n[{CALL_A}, {CALL_B}]\n</tool_call>"


def read(
    text: str, pieces: list[int], cut: bool = False, **kw: object
) -> tuple[dict[str, object], ReplyParser]:
    """Feed ``text`` cut at ``pieces`` (``cut``: it ran out of tokens); gather what the
    deltas said."""
    parser = ReplyParser(**kw)  # type: ignore[arg-type]
    said: dict[str, object] = {"reasoning": "", "content": "", "calls": {}}
    cuts = [0, *pieces, len(text)]
    deltas = [parser.feed(text[a:b]) for a, b in itertools.pairwise(cuts)]
    deltas.append(parser.finish(cut=cut))
    calls: dict[int, list[str]] = {}
    for d in deltas:
        said["reasoning"] += d.reasoning  # type: ignore[operator]
        said["content"] += d.content  # type: ignore[operator]
        for c in d.tool_calls:
            entry = calls.setdefault(c.index, ["", ""])
            entry[0] += c.name or ""
            entry[1] += c.arguments
    said["calls"] = [tuple(calls[i]) for i in sorted(calls)]
    return said, parser


@pytest.mark.parametrize("text", [HERMES_TWO, FALCON_TWO])
def test_calls_at_every_split(text: str) -> None:
    syntax = FALCON3 if text.startswith("<tool_call>\n[") else HERMES
    for cut in range(len(text) + 1):
        said, parser = read(text, [cut], call_open=syntax.open)
        assert said["calls"] == [("f", '{"a": "}{"}'), ("g_2", "{}")], cut
        assert said["content"] == "" and said["reasoning"] == ""
        assert [(c.name, c.arguments) for c in parser.tool_calls] == said["calls"]
        assert all(c.id.startswith("call_") for c in parser.tool_calls)


def test_reasoning_then_content_at_every_split() -> None:
    text = "<think>\nstep 1 </thi\n</think>\n\nThe answer."
    for cut in range(len(text) + 1):
        said, parser = read(text, [cut], reasoning=True)
        assert said == {"reasoning": "step 1 </thi\n", "content": "The answer.", "calls": []}
        assert parser.has_reasoning and parser.reasoning == "step 1 </thi\n"


def test_reasoning_then_calls() -> None:
    text = "<think>need weather</think>\n" + HERMES_TWO
    said, _parser = read(text, [3, 20, 40], reasoning=True, call_open=HERMES.open)
    assert said["reasoning"] == "need weather" and len(said["calls"]) == 2  # type: ignore[arg-type]


def test_plain_text_with_tools_and_reasoning_enabled() -> None:
    said, parser = read("Hi <think> there", [1, 2], reasoning=True, call_open=HERMES.open)
    assert said["content"] == "Hi <think> there" and not parser.has_reasoning
    # cut short (max_tokens) inside the call tag: a call with nothing readable, never
    # call syntax shown as content
    said, parser = read("<tool_c", [3], call_open=HERMES.open, cut=True)
    assert said == {"reasoning": "", "content": "", "calls": []} and parser.content == ""
    said, _ = read("<tool_c", [3], call_open=HERMES.open)  # it stopped there: text
    assert said["content"] == "<tool_c"
    said, _ = read("<tool_c", [3])  # no tools: plain text
    assert said["content"] == "<tool_c"


def test_a_call_cut_short_keeps_its_name_and_arguments_so_far() -> None:
    text = HERMES_TWO[: HERMES_TWO.index('"}}') - 1]  # inside the first call's arguments
    for cut in range(len(text) + 1):
        said, parser = read(text, [cut], call_open=HERMES.open)
        assert said["calls"] == [("f", '{"a": "')], cut  # a last "}" may be the call's own
        assert [(c.name, c.arguments) for c in parser.tool_calls] == said["calls"]
        assert said["content"] == ""


def test_reasoning_tokens_are_those_up_to_the_close() -> None:
    parser = ReplyParser(reasoning=True)
    for piece in ["<think>", "a", "", "b", "</think>", "\n\n", "done"]:
        parser.feed(piece)
    parser.finish()
    assert parser.reasoning_tokens == 5 and parser.content == "done"
    plain = ReplyParser(reasoning=True)
    for piece in ["<", "thin", "g"]:  # looked like <think> for two tokens, then was not
        plain.feed(piece)
    plain.finish()
    assert plain.reasoning_tokens == 0 and plain.content == "<thing"
    split = ReplyParser(reasoning=True)  # the open tag itself spread over two tokens
    for piece in ["<th", "ink>", "a", "</think>", "done"]:
        split.feed(piece)
    split.finish()
    assert split.reasoning_tokens == 4 and split.reasoning == "a"


def test_prompt_left_think_open() -> None:
    said, _parser = read("thinking...</think>done", [5], reasoning=True, in_think=True)
    assert said["reasoning"] == "thinking..." and said["content"] == "done"


# ---- grammars ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiler() -> ConstraintCompiler:
    tok = Tokenizer.from_metadata(demo_tokenizer_metadata())
    return ConstraintCompiler(tok, tok.stop_ids)


def accepts(compiler: ConstraintCompiler, plan_text: str, constraint: object) -> bool:
    state = constraint.start()  # type: ignore[attr-defined]
    for token in compiler.tokenizer.encode(plan_text):
        if not state.allowed()[token]:
            return False
        state.advance(token)
    return bool(state.is_accepting)


TOOLS = [
    {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}}},
    {"type": "function", "function": {"name": "g_2"}},
]  # fmt: skip


@pytest.mark.parametrize(
    ("choice", "parallel", "syntax", "text", "ok"),
    [
        ("required", True, HERMES, HERMES_TWO, True),
        ("required", False, HERMES, HERMES_TWO, False),
        ("required", True, HERMES, "hello", False),
        ("auto", True, HERMES, "hello", True),
        ("auto", True, HERMES, "<tool_call> hi", False),
        ("auto", True, HERMES, " \n<tool_call> hi", False),  # read as a call: never free
        ("auto", True, HERMES, "hi <tool_call>", True),
        ({"type": "function", "function": {"name": "g_2"}}, True, HERMES,
         f"<tool_call>\n{CALL_B}\n</tool_call>", True),
        ({"type": "function", "function": {"name": "g_2"}}, True, HERMES,
         f"<tool_call>\n{CALL_A}\n</tool_call>", False),
        ("required", True, FALCON3, FALCON_TWO, True),
        ("required", True, HERMES, '<tool_call>\n{"arguments": {}, "name": "g_2"}\n</tool_call>',
         False),
    ],
)  # fmt: skip
def test_tool_grammars(
    compiler: ConstraintCompiler,
    choice: object,
    parallel: bool,
    syntax: ToolCallSyntax,
    text: str,
    ok: bool,
) -> None:
    tools = tool_plan(TOOLS, choice, parallel, syntax)  # type: ignore[arg-type]
    plan = plan_output(compiler, None, tools, reasoning=False, in_think=False)
    assert accepts(compiler, text, plan.constraint) is ok


def _params(values: list[object], scope: str) -> dict[str, object]:
    """Parameters ``{"a": one of values}``, found through an anchor or under an ``$id``."""
    if scope == "anchor":
        defs = {"d": {"$anchor": "v", "enum": values}}
        return {"$defs": defs, "type": "object", "properties": {"a": {"$ref": "#v"}},
                "required": ["a"]}  # fmt: skip
    return {"$id": "urn:p", "$defs": {"d": {"enum": values}}, "type": "object",
            "properties": {"a": {"$ref": "#/$defs/d"}}, "required": ["a"]}  # fmt: skip


@pytest.mark.parametrize("scope", ["anchor", "id"])
def test_functions_sharing_an_anchor_or_id_keep_their_own_parameters(
    compiler: ConstraintCompiler, scope: str
) -> None:
    """Both names are found in the whole call schema: f's ref read g's enum, so a valid
    call of f could not be written and an invalid one was forced."""
    tools = [
        {"type": "function", "function": {"name": name, "parameters": _params(values, scope)}}
        for name, values in [("f", [1, 2]), ("g", ["x", "y"])]
    ]
    plan = plan_output(compiler, None, tool_plan(tools, "required", False, HERMES), False, False)
    for name, value, ok in [("f", 1, True), ("f", "x", False), ("g", "x", True), ("g", 1, False)]:
        call = json.dumps({"name": name, "arguments": {"a": value}})
        assert accepts(compiler, f"<tool_call>\n{call}\n</tool_call>", plan.constraint) is ok


OWN_ID_COMBINED = {  # a $ref beside properties, and refs naming the schema's own $id
    "$id": "urn:p", "$defs": {"b": {"type": "object", "properties": {"a": {"enum": [3]}},
                                    "required": ["a"]}},
    "$ref": "#/$defs/b", "properties": {"b": {"$ref": "urn:p#/$defs/b/properties/a"}},
    "required": ["a", "b"],
}  # fmt: skip


def test_parameters_with_their_own_id_close_objects_as_without(
    compiler: ConstraintCompiler,
) -> None:
    """Objects are closed by reading refs as pointers from the root: under a kept $id
    they missed what the $ref combines, and this valid schema was a 400 ('required
    property b is unsatisfiable')."""
    tool_ = {"type": "function", "function": {"name": "f", "parameters": OWN_ID_COMBINED}}
    plan = plan_output(compiler, None, tool_plan([tool_], "required", False, HERMES), False, False)
    for arguments, ok in [({"a": 3, "b": 3}, True), ({"a": 3, "b": 4}, False)]:
        call = json.dumps({"name": "f", "arguments": arguments})
        assert accepts(compiler, f"<tool_call>\n{call}\n</tool_call>", plan.constraint) is ok


def test_reasoning_before_json(compiler: ConstraintCompiler) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    plan = plan_output(compiler, schema, None, reasoning=True, in_think=False)
    assert accepts(compiler, '<think>let me see</think>\n\n{"n": 4}', plan.constraint)
    assert accepts(compiler, '{"n": 4}', plan.constraint)
    assert not accepts(compiler, "<think>x</think> n=4", plan.constraint)
    plain = plan_output(compiler, schema, None, reasoning=False, in_think=False)
    assert plain.constraint is compiler.json_schema(schema, "response_format")  # cached
    assert json.loads('{"n": 4}') == {"n": 4}


def test_bad_tools_are_400s(compiler: ConstraintCompiler) -> None:
    nope = {"type": "object", "properties": {"a": {"type": "nope"}}}
    bad = [{"type": "function", "function": {"name": "f", "parameters": nope}}]
    with pytest.raises(InvalidParameterError, match=r"tools\[0\] \(f\)") as info:
        plan_output(compiler, None, tool_plan(bad, "auto", True, HERMES), False, False)
    assert info.value.param == "tools"


def test_tools_with_response_format(compiler: ConstraintCompiler) -> None:
    """auto + a schema: the reply is calls or JSON of the schema, never free text."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    plan = plan_output(compiler, schema, tool_plan(TOOLS, "auto", True, HERMES), False, False)
    assert accepts(compiler, '{"n": 4}', plan.constraint)
    assert accepts(compiler, HERMES_TWO, plan.constraint)
    assert not accepts(compiler, "hello", plan.constraint)
