"""`bitserve chat` options: dispatch, unset options, and no key echoed in help."""

from __future__ import annotations

import pytest

from bitserve import cli
from bitserve.client.cli import DEFAULT_URL


def test_chat_options_parse_and_unset_ones_stay_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BITSERVE_URL", raising=False)
    args = cli.build_parser("chat").parse_args(["chat"])
    assert args.url == DEFAULT_URL
    assert not {"api_key", "conversation", "temperature", "max_tokens", "system"} & set(vars(args))
    argv = ["chat", "--url", "http://h:1", "--conversation", "conv_1_2", "--max-tokens", "5"]
    args = cli.build_parser("chat").parse_args([*argv, "--temperature", "0.5", "--system", "s"])
    assert (args.url, args.conversation, args.max_tokens) == ("http://h:1", "conv_1_2", 5)
    assert (args.temperature, args.system) == (0.5, "s")


def test_url_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITSERVE_URL", "http://elsewhere:9000")
    assert cli.build_parser("chat").parse_args(["chat"]).url == "http://elsewhere:9000"


def test_help_never_shows_the_api_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BITSERVE_API_KEY", "sk-very-secret")
    with pytest.raises(SystemExit):
        cli.main(["chat", "--help"])
    out = capsys.readouterr().out
    assert "--api-key" in out and "sk-very-secret" not in out and "None" not in out


def test_an_invalid_url_is_one_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["chat", "--url", "localhost:8081"]) == 1
    err = capsys.readouterr().err
    expected = f"The server URL 'localhost:8081' is not valid; it should look like {DEFAULT_URL}."
    assert err == expected + "\n"
