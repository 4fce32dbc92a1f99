"""`bitserve generate`: real processes on a tiny synthetic model and the demo model,
plus in-process runs for the options (chat, stop, stdin, errors, help, threads)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bitserve import cli
from bitserve.engine.generate import Generator
from bitserve.engine.generate_cli import StreamStats, stream
from bitserve.engine.loader import LoadedModel, load_model
from bitserve.engine.types import GenerationRequest, GenerationResult, SamplingParams, TokenEvent
from bitserve.kernels.native import default_threads
from bitserve.model.demo import DEMO_NOTICE

SUMMARY = re.compile(
    r"^load: [\d.]+ s \| prompt: (\d+) tokens, [\d.]+ tok/s \| "
    r"generated: (\d+) tokens, [\d.]+ tok/s \| finish: (\w+) \| peak RSS: \d+ MB$"
)


@pytest.fixture(scope="module")
def tiny(tiny_model_path: Path) -> Iterator[LoadedModel]:
    loaded = load_model(tiny_model_path, kernel="numpy")
    yield loaded
    loaded.close()


def greedy(loaded: LoadedModel, prompt: list[int], max_tokens: int) -> GenerationResult:
    """A greedy in-process generation: what the CLI must print."""
    req = GenerationRequest(
        prompt,
        SamplingParams(temperature=0.0),
        max_tokens=max_tokens,
        stop_token_ids=set(loaded.tokenizer.stop_ids),
    )
    return Generator(loaded.model, loaded.tokenizer).complete(req)


def bitserve(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "BITSERVE_KERNEL": "numpy"}
    return subprocess.run(
        [sys.executable, "-m", "bitserve.cli", "generate", *args],
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=300,
        check=False,
    )


def summary_of(stderr: str) -> tuple[int, int, str]:
    match = SUMMARY.match(stderr.strip().splitlines()[-1])
    assert match, stderr
    return int(match[1]), int(match[2]), match[3]


def expected_stdout(text: str) -> str:
    return text + ("\n" if text and not text.endswith("\n") else "")


# ---- real processes ---------------------------------------------------------------------------


def test_generate_streams_greedy_text_and_prints_a_summary(
    tiny: LoadedModel, tiny_model_path: Path
) -> None:
    prompt = tiny.tokenizer.encode("Once upon a time", add_bos=True)
    result = greedy(tiny, prompt, 12)
    proc = bitserve(
        "-m", str(tiny_model_path), "-p", "Once upon a time", "-n", "12", "--temperature", "0"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected_stdout(result.text)
    expected = (len(prompt), result.completion_tokens, result.finish_reason)
    assert summary_of(proc.stderr) == expected
    assert DEMO_NOTICE not in proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_model_prints_the_notice() -> None:
    proc = bitserve("-p", "Hello", "-n", "5", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == DEMO_NOTICE
    _, generated, finish = summary_of(proc.stderr)
    assert 1 <= generated <= 5 and finish in ("length", "stop")
    again = bitserve("-p", "Hello", "-n", "5", "--seed", "1")
    assert again.stdout == proc.stdout  # same seed, same text


def test_missing_model_file_is_one_error_line_and_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    proc = bitserve("-m", str(missing), "-p", "hi")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"bitserve generate: error: model file {str(missing)!r} does not exist"
    ]


# ---- in process -------------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["generate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_chat_formats_the_prompt_as_a_user_turn(
    tiny: LoadedModel, tiny_model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a cat?"},
    ]
    prompt = tiny.chat.encode(messages)
    result = greedy(tiny, prompt, 6)
    code, out, err = run_cli(
        capsys, "-m", str(tiny_model_path), "-p", "What is a cat?", "--system", "Be brief.",
        "-n", "6", "--temperature", "0", "--kernel", "numpy",
    )  # fmt: skip
    assert code == 0, err
    assert out == expected_stdout(result.text)
    assert summary_of(err) == (len(prompt), result.completion_tokens, result.finish_reason)


def test_stop_string_cuts_the_output(
    tiny: LoadedModel, tiny_model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompt = tiny.tokenizer.encode("The weather today", add_bos=True)
    text = greedy(tiny, prompt, 16).text
    assert len(text) >= 6, "the tiny model should produce some text"
    stop = text[3:5]
    before = text[: text.index(stop)]
    code, out, err = run_cli(
        capsys, "-m", str(tiny_model_path), "-p", "The weather today", "-n", "16",
        "--temperature", "0", "--stop", stop, "--stop", "never-seen",
    )  # fmt: skip
    assert code == 0, err
    assert out == expected_stdout(before)
    assert summary_of(err)[2] == "stop"


def test_prompt_from_stdin(
    tiny_model_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ("-m", str(tiny_model_path), "-n", "5", "--temperature", "0")
    _, direct, _ = run_cli(capsys, *args, "-p", "Tell me")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Tell me"))
    code, piped, err = run_cli(capsys, *args, "-p", "-")
    assert code == 0, err
    assert piped == direct


@pytest.mark.parametrize(
    ("option", "value", "param"),
    [
        ("--temperature", "-1", "temperature"),
        ("--top-p", "1.5", "top_p"),
        ("--min-p", "2", "min_p"),
        ("--repeat-penalty", "0", "repetition_penalty"),
        ("--presence-penalty", "9", "presence_penalty"),
        ("-n", "-3", "max_tokens"),
        ("--threads", "0", "threads"),
    ],
)
def test_bad_values_are_one_error_line_and_exit_2(
    tiny_model_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str, param: str
) -> None:
    code, out, err = run_cli(capsys, "-m", str(tiny_model_path), "-p", "hi", option, value)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bitserve generate: error: {param}:")


def test_malformed_model_file_is_a_clean_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all, just text")
    code, _, err = run_cli(capsys, "-m", str(bad), "-p", "hi")
    assert code == 2
    assert err.startswith("bitserve generate: error: ") and str(bad) in err
    assert len(err.strip().splitlines()) == 1


def test_help_shows_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for shown in (
        "(default: 100)", "(default: 0.7)", "(default: 40)", "(default: 0.95)",
        "(default: 0.0)", "(default: 1.0)", "(default: auto)", "demo model",
        f"physical cores available, {default_threads()} here",
    ):  # fmt: skip
        assert shown in out
    assert "None" not in out


def test_stream_writes_each_piece_as_it_comes() -> None:
    writes: list[str] = []

    class Recorder(io.StringIO):
        def write(self, s: str) -> int:
            writes.append(s)
            return len(s)

    events = [TokenEvent(1, "a"), TokenEvent(2, ""), TokenEvent(3, "bc", finish_reason="stop")]
    stats = StreamStats(prompt_tokens=4, start=0.0)
    stream(iter(events), Recorder(), stats)
    assert writes == ["a", "bc", "\n"]
    assert (stats.generated, stats.finish_reason) == (3, "stop")


# ---- physical cores -------------------------------------------------------------------------


def test_prompt_longer_than_the_context_is_a_clean_error(
    tiny: LoadedModel, tiny_model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    long_prompt = " ".join(f"word{i}" for i in range(200))
    n_prompt = len(tiny.tokenizer.encode(long_prompt, add_bos=True))
    assert n_prompt > tiny.model.config.context_length
    code, out, err = run_cli(capsys, "-m", str(tiny_model_path), "-p", long_prompt)
    assert (code, out) == (2, "")
    assert err.strip().splitlines() == [
        f"bitserve generate: error: the prompt has {n_prompt} tokens, more than the model's "
        f"context length of {tiny.model.config.context_length}"
    ]


def test_non_finite_logits_are_one_error_line_and_exit_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file whose weights give NaN logits printed a 19-line traceback."""
    from bitserve.engine.sequence import ModelOutputError

    def corrupt(self: Generator, req: GenerationRequest) -> Iterator[TokenEvent]:
        raise ModelOutputError("the model's logits are not finite (NaN or inf)")
        yield  # a generator, as the real one

    monkeypatch.setattr(Generator, "generate", corrupt)
    code, out, err = run_cli(capsys, "-p", "Hello", "-n", "3")
    assert code == 1 and out == ""
    assert err.strip().splitlines()[-1] == (
        "bitserve generate: error: the model's logits are not finite (NaN or inf)"
    )
