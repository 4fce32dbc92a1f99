"""GBNF end to end: the real server process on the random demo model, ``/completion`` with
a ``grammar`` in llama.cpp's styles, sampled greedily, at temperature 1 with several seeds,
and with ``logit_bias`` pushing the model toward chosen characters. Every reply is checked
against a regular expression written here by hand for the same language: a checker that
shares nothing with the grammar library, so a conversion that changes the language fails.

With random weights only the grammar can make the replies match.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from api_server import Server, start

# (GBNF, the same language as a Python regex, characters to push with logit_bias)
GRAMMARS = [
    # alternation inside a bounded repeated group
    ('root ::= ("ab" | "c"){2,4} "."', r"(?:ab|c){2,4}\.", "c"),
    # a repeated group inside a repeated group (the converter dropped these brackets)
    ('root ::= ("x" ("y" | "z"){1,3}){1,3} "."', r"(?:x[yz]{1,3}){1,3}\.", "z"),
    ('root ::= ("a"?){2} ("b" "c"?)+ "."', r"a{0,2}(?:bc?)+\.", "."),
    ('root ::= ("q"*)+ "."', r"q*\.", "."),
    # {m}, {m,}, ?, and a rule used before it is defined
    ('root ::= "a"{3} b{2,} "."\nb ::= "b"', r"aaab{2,}\.", "."),
    ('root ::= sign? [1-9] [0-9]{0,2} ("." [0-9]{1,2})?\nsign ::= "-"',
     r"-?[1-9][0-9]{0,2}(?:\.[0-9]{1,2})?", "-"),
    # a JSON-ish list over several lines, with comments
    (
        '# a short list\n'
        'root ::= "[" (\n'
        '    item ("," " "? item){0,3}  # a few items\n'
        ')? "]"\n'
        'item ::= [0-9]{1,3} | "\\"" [a-z]{0,4} "\\""\n',
        r'\[(?:(?:[0-9]{1,3}|"[a-z]{0,4}")(?:, ?(?:[0-9]{1,3}|"[a-z]{0,4}")){0,3})?\]',
        '"',
    ),
    # classes: ranges, negation, escapes \x \u \U \n \\ \] \-
    (
        'root ::= [\\x41-\\x43] [\\u00e0-\\u00e5] [^\\n\\\\\\]] [\\-\\]]{1,2} "\\U0001F600"',
        "[A-C][\u00e0-\u00e5][^\n\\\\\\]][-\\]]{1,2}\U0001f600",
        "-",
    ),
    # . is any character, newlines too
    ('root ::= "<" . . ">"', r"<(?s:..)>", "\n"),
    # escapes in literals, unicode literals and names alike after renaming
    (
        'root ::= "tab\\there" "\\\\" "\\"" "\\x2D\\u002D" hi Hi\nhi ::= "日本"\nHi ::= "wörld"',
        'tab\there\\\\"--日本wörld',
        "-",
    ),
    # && and -- are characters in a class, not Rust's operators
    ('root ::= [a&&z]{2} [--]', r"[a&z]{2}-", "&"),
]  # fmt: skip

N_PREDICT = 96


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start(tmp_path_factory.mktemp("grammar"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def token_ids(http: httpx.Client, text: str) -> list[int]:
    r = http.post("/tokenize", json={"content": text})
    assert r.status_code == 200, r.text
    tokens: list[int] = r.json()["tokens"]
    return tokens


def samplings(http: httpx.Client, push: str) -> list[dict[str, Any]]:
    """Greedy, temperature 1 with three seeds, and temperature 1 pushed toward ``push``."""
    bias = [[t, 8.0] for t in token_ids(http, push)]
    return [
        {"temperature": 0},
        *({"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": s} for s in range(3)),
        {"temperature": 1.0, "top_k": 0, "seed": 7, "logit_bias": bias},
    ]


@pytest.mark.parametrize(("grammar", "pattern", "push"), GRAMMARS)
def test_every_reply_is_in_the_grammars_language(
    http: httpx.Client, grammar: str, pattern: str, push: str
) -> None:
    for sampling in samplings(http, push):
        body = {"prompt": "Answer:", "grammar": grammar, "n_predict": N_PREDICT, **sampling}
        r = http.post("/completion", json=body)
        assert r.status_code == 200, (grammar, r.text)
        reply = r.json()
        assert reply["stop_type"] == "eos", (grammar, sampling, reply["content"])
        assert re.fullmatch(pattern, reply["content"]), (grammar, sampling, reply["content"])


@pytest.mark.parametrize(
    "grammar",
    [
        "root ::= item",  # undefined rule
        'item ::= "a"',  # no root
        'root ::= ("a" | "b"',  # unbalanced brackets
        'root ::= "a',  # unclosed literal
        "root ::= [a-z",  # unclosed class
        "   \n# just a comment\n",  # empty
        "root ::= my_rule\nmy_rule ::= [a]",  # '_' is not in llama.cpp's names
    ],
)
def test_a_broken_grammar_is_a_one_line_400_naming_it(http: httpx.Client, grammar: str) -> None:
    r = http.post("/completion", json={"prompt": "x", "grammar": grammar, "n_predict": 4})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "grammar" and "\n" not in error["message"], error
    assert error["message"].startswith("grammar: invalid GBNF grammar: "), error
    assert http.get("/health").status_code == 200


def test_dot_is_any_character_newlines_too(http: httpx.Client) -> None:
    """llama.cpp's ``.``; the library's ``/./`` (what the converter wrote) skips them."""
    bias = [[t, 8.0] for t in token_ids(http, "\n")]
    body = {"prompt": "Answer:", "grammar": 'root ::= "<" . . ">"', "temperature": 0,
            "logit_bias": bias}  # fmt: skip
    reply = http.post("/completion", json=body).json()
    assert "\n" in reply["content"] and re.fullmatch(r"<(?s:..)>", reply["content"]), reply


def test_a_grammar_whose_lexeme_never_ends_does_not_freeze_the_engine(
    http: httpx.Client,
) -> None:
    """With the library's forcing on, the mask after the first "x" never came: the request
    hung, and every generation after it (``/health`` still said ok)."""
    bias = [[t, 50.0] for t in token_ids(http, "x")]
    body = {"prompt": "Answer:", "grammar": 'root ::= x "x" | "z"\nx ::= "x"+',
            "n_predict": 12, "temperature": 0, "logit_bias": bias}  # fmt: skip
    reply = http.post("/completion", json=body, timeout=30).json()
    assert reply["content"] == "x" * 12 and reply["stop_type"] == "limit", reply
    plain = http.post("/completion", json={"prompt": "Hi", "n_predict": 4}, timeout=30)
    assert plain.status_code == 200 and plain.json()["tokens_predicted"] == 4, plain.text
