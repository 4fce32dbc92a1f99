"""GBNF read as llama.cpp reads it (``src/llama-grammar.cpp``): each grammar here is
compiled for the engine tests' byte tokenizer (ids 0-255 are single bytes) and walked
byte by byte, so what it accepts is what the engine lets a model write."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from bitserve.engine.constraint import ConstraintCompiler, ConstraintError
from bitserve.engine.gbnf import GbnfError, gbnf_to_lark
from bitserve.tokenizer import Tokenizer

TokenIds = Any  # conftest's table of the byte tokenizer's ids


@pytest.fixture(scope="module")
def compiler(tokenizer: Tokenizer, ids: TokenIds) -> ConstraintCompiler:
    return ConstraintCompiler(tokenizer, {ids.eot})


def accepts(compiler: ConstraintCompiler, grammar: str, text: str) -> bool:
    """``text`` is a whole sentence of ``grammar``: every byte allowed in turn, and the
    grammar complete after the last."""
    state = compiler.gbnf(grammar).start()
    for byte in text.encode():
        if not state.allowed()[byte]:
            return False
        state.advance(byte)
    return state.is_accepting


# grammar, sentences it has, texts it has not (as llama.cpp's parser reads it)
LANGUAGES = [
    # a repeated group that is repeated again keeps its brackets (was "a"*+: refused)
    ('root ::= ("a"*)+ "b"', ["b", "ab", "aaab"], ["a", "bb"]),
    ('root ::= ("a"?){3} "b"', ["b", "aab", "aaab"], ["aaaab"]),
    ('root ::= "a"*+ "b"', ["b", "aab"], ["ba"]),
    ('root ::= ("x" ("y" | "z")+){2}', ["xyxz", "xyzxzzy"], ["xy", "xyx"]),
    # {0}: no repetition at all (llguidance refuses a range that ends at 0)
    ('root ::= "a"{0} "b"', ["b"], ["ab"]),
    ('root ::= "a"{2,} "b"{,3}'.replace("{,3}", "{0,3}"), ["aa", "aaabbb"], ["a", "aabbbb"]),
    # . is any character, newlines too
    ("root ::= . .", ["\n\n", "aé"], ["a"]),
    # escapes: \x \u \U (leading zeros and NUL included), \- \] \[ \\ \"
    ('root ::= "\\u0041\\x42\\U0001F600"', ["AB\U0001f600"], ["AB"]),
    ('root ::= [\\u0000-\\u0008] "\\x00"', ["\x00\x00", "\x08\x00"], ["\t\x00"]),
    ('root ::= [\\-\\]\\[\\\\"]+', ['-][\\"'], ["a"]),
    # a class is characters only: && -- ~~ are not Rust's class operators
    ('root ::= [a&&b] [--] [~~]', ["&-~", "a-~", "b-~"], ["c-~"]),
    # a-c then - then e: llama.cpp's reading of [a-c-e]
    ("root ::= [a-c-e]", ["a", "c", "-", "e"], ["d"]),
    ("root ::= [^a-z]", ["\n", "A", "é"], ["q"]),
    # rules named alike after llguidance's renaming, or "start", are distinct rules
    ('root ::= foo-bar fooBar Ab ab\nfoo-bar ::= "1"\nfooBar ::= "2"\nAb ::= "3"\nab ::= "4"',
     ["1234"], ["1111"]),
    ('root ::= start\nstart ::= "s"', ["s"], [""]),
    ('root ::= 1st\n1st ::= "one"', ["one"], [""]),
    # a rule defined twice keeps its last definition (llama.cpp overwrites it)
    ('root ::= x\nx ::= "a"\nx ::= "b"', ["b"], ["a"]),
    # used before its definition; comments; a group over several lines
    ('# a list\nroot ::= item ("," item)* # items\nitem ::= (\n  "x" |\n  "yz"\n)',
     ["x", "x,yz,x"], ["x,", ",x"]),
    # [] and [^] are no element at all in llama.cpp: the empty string
    ('root ::= "a" [] [^] "b"', ["ab"], ["a b"]),
    ('root ::= "ü" [日-本] "\\u65E5"', ["ü日日", "ü本日"], ["ü火日", "ü日本"]),
]  # fmt: skip


@pytest.mark.parametrize(("grammar", "sentences", "others"), LANGUAGES)
def test_the_language_is_llama_cpps(
    compiler: ConstraintCompiler, grammar: str, sentences: list[str], others: list[str]
) -> None:
    for text in sentences:
        assert accepts(compiler, grammar, text), (grammar, text, gbnf_to_lark(grammar))
    for text in others:
        assert not accepts(compiler, grammar, text), (grammar, text, gbnf_to_lark(grammar))


@pytest.mark.parametrize(
    ("grammar", "reason"),
    [
        ("", "no 'root' rule"),
        ("# nothing but a comment\n", "no 'root' rule"),
        ('item ::= "a"', "no 'root' rule"),
        ("root ::= item", "rule 'item' is used but never defined"),
        ('root ::= ("a"', "expecting ')'"),
        ('root ::= "a")', "expecting the end of the line"),
        ('root ::= "a', "unexpected end of input"),
        ("root ::= [a-", "unexpected end of input"),
        ('root ::= "a"\n| "b"', "expecting a rule name"),
        ('root = "a"', "expecting ::="),
        ("root ::= *", "'*' follows nothing"),
        ('root ::= "a"{,3}', "expecting an integer"),
        ('root ::= "a"{2,1}', "{2,1}: the most is fewer than the least"),
        ('root ::= "a"{2001}', "more than 2000 repetitions"),
        ('root ::= ("a"{0,45}){45}', "2000 rules or more"),
        ('root ::= "\\q"', "unknown escape \\q"),
        ('root ::= "\\u12"', "expecting 4 hex digits after \\u"),
        ('root ::= "\\uD800"', "U+D800 is not a Unicode character"),
        ("root ::= [\\U00110000]", "U+110000 is not a Unicode character"),
        ("root ::= my_rule\nmy_rule ::= [a]", "expecting the end of the line"),
        ('root ::= règle\nrègle ::= "a"', "expecting the end of the line"),
        ("root ::= <[42]>", "token references (<...>) are not supported"),
        ("root ::= !<|eot_id|>", "token references (<...>) are not supported"),
    ],
)
def test_what_llama_cpp_refuses_is_refused_in_one_line(grammar: str, reason: str) -> None:
    with pytest.raises(GbnfError) as info:
        gbnf_to_lark(grammar)
    assert reason in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_a_refused_grammar_is_a_constraint_error(compiler: ConstraintCompiler) -> None:
    with pytest.raises(ConstraintError, match=r"^invalid GBNF grammar: no 'root' rule$"):
        compiler.gbnf('item ::= "a"')


def test_repetitions_up_to_llama_cpps_limit(compiler: ConstraintCompiler) -> None:
    """Above 2000 an upper bound is no bound (llama.cpp's reading); 1999 holds."""
    assert accepts(compiler, 'root ::= "a"{1,5000}', "a" * 2500)
    assert not accepts(compiler, 'root ::= "a"{1,1999}', "a" * 2000)


def test_rules_of_characters_stay_single_lexemes() -> None:
    """As llguidance's converter makes them (masks stay fast): terminals in upper case,
    the rest (and root, and recursive rules) rules."""
    lark = gbnf_to_lark('root ::= pair+\npair ::= word ":" word ws\nword ::= [a-z]+\nws ::= " "?')
    assert "G_WORD: (/[\\x{61}-\\x{7A}]/)+" in lark and "G_PAIR: G_WORD" in lark
    assert "g_root: (G_PAIR)+" in lark
    nested = gbnf_to_lark('root ::= list\nlist ::= "[" (list | "x")* "]"')
    assert 'g_list: "[" ((g_list | "x"))* "]"' in nested


# A lexeme that only a byte extending it can follow: greedy lexing admits no whole output
# (as for `num num` above), and with the library's forcing on, computing the mask never
# returned (at compile for the second, after one "x" for the first).
ENDLESS_LEXEMES = [
    'root ::= x "x" | "z"\nx ::= "x"+',
    'root ::= x "x"\nx ::= "x"+',
    'root ::= "a" x x\nx ::= [a-z]+',
]


def test_a_lexeme_only_its_own_byte_can_follow_never_hangs_the_mask() -> None:
    """Run apart, in a process with a deadline: a regression hangs in the library, where
    no timeout of this process could stop it."""
    walk = textwrap.dedent(f"""
        from conftest import TokenIds, _build_tokenizer
        from bitserve.engine.constraint import ConstraintCompiler

        compiler = ConstraintCompiler(_build_tokenizer(), {{TokenIds().eot}})
        for grammar in {ENDLESS_LEXEMES!r}:
            state = compiler.gbnf(grammar).start()
            for byte in b"axxxxxxxxx" if grammar.count('"a"') else b"xxxxxxxxxx":
                assert state.allowed()[byte], (grammar, byte)
                state.advance(byte)
            assert not state.is_accepting
        print("walked")
    """)
    done = subprocess.run([sys.executable, "-c", walk], cwd=Path(__file__).parent,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0 and done.stdout == "walked\n", done.stderr[-2000:]
