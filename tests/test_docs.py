"""The README and docs/ stay true to the code: every `bitserve ...` command they show parses
with bitserve's own parser, every option they name exists, and every link resolves."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from bitserve import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "deploy" / "README.md"]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
# options the docs name that belong to other programs
FOREIGN_OPTIONS = {
    "--outtype",  # llama.cpp's convert_hf_to_gguf.py
    "--preset",  # scripts/make_synthetic_model.py
    "--sampler",  # scripts/compare_constraint_libraries.py
    "--total-queued-requests-metric",  # llm-d's endpoint picker
    "--total-running-requests-metric",
    "--kv-cache-usage-percentage-metric",
}


def doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def code_lines(text: str) -> list[str]:
    """Lines of fenced blocks, and inline code spans of the prose."""
    lines = [line for block in FENCE.findall(text) for line in block.splitlines()]
    return lines + re.findall(r"`([^`\n]+)`", FENCE.sub("", text))


def bitserve_commands(text: str) -> list[list[str]]:
    """Each `bitserve ...` (or `python3 bitnet_fast.py ...`, which is `serve`) command line,
    without its comment; placeholders (`bitserve ...`) and printed output left out."""
    commands = []
    for line in code_lines(text):
        m = re.match(r"\s*(bitserve|python3 -m bitserve|python3 bitnet_fast\.py)\s+(.*)", line)
        if m is None:
            continue
        argv = shlex.split(re.split(r"\s+#", m.group(2))[0])
        if m.group(1).endswith("bitnet_fast.py"):
            argv = ["serve", *argv]
        if argv and argv[0] in cli.COMMANDS and "--help" not in argv:
            commands.append(argv)
    return commands


def help_options(command: str, capsys: pytest.CaptureFixture[str]) -> set[str]:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", capsys.readouterr().out))


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_bitserve_command_shown_parses(doc: Path) -> None:
    for argv in bitserve_commands(doc.read_text("utf-8")):
        try:
            cli.build_parser(argv[0]).parse_args(argv)
        except SystemExit:
            pytest.fail(f"{doc_id(doc)}: `bitserve {shlex.join(argv)}` does not parse")


def test_the_readme_shows_every_command() -> None:
    shown = {argv[0] for argv in bitserve_commands((ROOT / "README.md").read_text("utf-8"))}
    assert shown == set(cli.COMMANDS)


def test_every_option_named_exists(capsys: pytest.CaptureFixture[str]) -> None:
    known = set().union(*(help_options(command, capsys) for command in cli.COMMANDS))
    for doc in DOCS:
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", doc.read_text("utf-8")))
        unknown = named - known - FOREIGN_OPTIONS
        assert not unknown, f"{doc_id(doc)} names options no bitserve command has: {unknown}"


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+\s+(.*?)\s*$", FENCE.sub("", path.read_text("utf-8")), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_link_resolves(doc: Path) -> None:
    text = FENCE.sub("", doc.read_text("utf-8"))
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'<img src="([^"]+)"', text)
    for target in targets:
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        assert path.exists(), f"{doc_id(doc)}: link to {target}: no such file"
        if anchor:
            assert anchor in anchors(path), f"{doc_id(doc)}: link to {target}: no such heading"
