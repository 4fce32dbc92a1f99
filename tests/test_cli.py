"""The top-level command line: dispatch and help."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitserve import cli
from bitserve.api.settings import ServerSettings, read_keys_file


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_help_states_defaults_in_words_not_python_lists(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: [" not in out and "default: ()" not in out


def test_command_name_skips_option_values() -> None:
    assert cli._command_name(["--log-level", "INFO", "generate", "-p", "x"]) == "generate"
    assert cli._command_name(["--log-level", "INFO"]) is None


@pytest.mark.parametrize("command", ["serve", "bench", "generate"])
def test_bad_thread_count_is_one_line_and_exit_2(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = ["-p", "hi"] if command == "generate" else []
    assert cli.main([command, "--threads", "0", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("threads: must be 1 or more, got 0")


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--max-queue", "0", "--max-queue must be at least 1, got 0"),
        ("--max-batch", "0", "--max-batch must be at least 1, got 0"),
        ("--max-body-mb", "0", "--max-body-mb must be at least 1, got 0"),
        ("--max-input-chars", "-1", "--max-input-chars must be at least 0, got -1"),
        ("--cache-ram", "-1", "--cache-ram must be at least 0, got -1"),
        ("--cache-disk", "-5", "--cache-disk must be at least 0, got -5"),
        ("--db-pool-size", "-1", "--db-pool-size must be at least 0, got -1"),
        ("--head-timeout", "0", "--head-timeout must be more than 0, got 0.0"),
        ("--head-timeout", "nan", "--head-timeout must be more than 0, got nan"),
        ("--ctx-size", "-5", "--ctx-size must be at least 1, got -5"),
        ("--port", "99999", "--port must be from 1 to 65535, got 99999"),
        ("--port", "0", "--port must be from 1 to 65535, got 0"),
    ],
)
def test_serve_names_a_flag_out_of_its_range_and_exits_2(
    flag: str, value: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["serve", flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"bitserve serve: {says}"]


@pytest.mark.parametrize("key", ["", "  ", "two words", " padded"])
def test_serve_refuses_a_key_no_client_could_send(
    key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--api-key ""`` (``$KEY`` unset) turned keys on and let 'Bearer' with no key in.
    The refusal named the key itself: a real key pasted with a space went to the log."""
    assert cli.main(["serve", "--api-key", "good", "--api-key", key]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("bitserve serve: --api-key / --api-keys-file: key 2 of 2 cannot be")
    if key.strip():
        assert key.strip() not in err


@pytest.mark.parametrize("key", ["sk-clé", "sk-\x7f", "sk-tab\t", "sk-\u00a0nbsp"])
def test_a_key_only_some_clients_could_send_is_refused(key: str) -> None:
    """A key with 'é' was served, then matched no UTF-8 client (curl: the server reads a
    header as Latin-1) and could not be sent by the openai SDK (ASCII headers only)."""
    with pytest.raises(ValueError, match=r"key 1 of 1 cannot be a key: .* printable ASCII"):
        ServerSettings(api_keys=(key,)).check()


def test_a_keys_file_with_a_byte_order_mark_keeps_its_first_key(tmp_path: Path) -> None:
    """Notepad's UTF-8 starts the file with U+FEFF: it was read as part of the first key,
    which then matched no client."""
    keys = tmp_path / "keys"
    keys.write_text("sk-first\r\nsk-second\r\n", encoding="utf-8-sig")
    assert read_keys_file(keys) == ["sk-first", "sk-second"]


def test_serve_refuses_a_keys_file_without_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# the keys go here\n\n")
    assert cli.main(["serve", "--api-keys-file", str(keys)]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err == f"bitserve serve: --api-keys-file {keys} holds no keys"


@pytest.mark.parametrize("db", ["folder", "not-sqlite"])
def test_serve_says_a_bad_db_in_one_line_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], db: str
) -> None:
    path = tmp_path / db
    path.mkdir() if db == "folder" else path.write_text("not a database, but text\n" * 100)
    assert cli.main(["serve", "--port", "18793", "--db", str(path)]) == 1
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith(f"bitserve serve: cannot open the conversation store {path}: ")


def test_serve_on_a_taken_port_says_so_before_loading_anything(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    """It loaded the model, printed 'open http://127.0.0.1:PORT/ in a browser' (another
    server's page) and only then failed to bind, exit 3."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status = cli.main(["serve", "--port", str(port), "--db", f"{tmp_path}/c.db"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert err == [f"bitserve serve: cannot listen on 127.0.0.1:{port}: address already in use"]


def test_a_postgresql_url_without_the_extra_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`scripts/cluster` from a source checkout without the extra: the advice was only
    `pip install 'bitserve[postgres]'`, which fetches bitserve from the package index
    instead of installing the checkout's extra."""
    import sys

    from bitserve.store import StoreError, open_store

    monkeypatch.setitem(sys.modules, "bitserve.store.postgres", None)  # import fails
    with pytest.raises(StoreError) as caught:
        open_store("postgresql://u@127.0.0.1/db")
    assert "pip install 'bitserve[postgres]'" in str(caught.value)
    assert "pip install -e '.[postgres]'" in str(caught.value)


def test_ctrl_c_while_a_command_loads_is_status_130(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in the first moments of a command (its module importing numpy and the
    kernels) printed a KeyboardInterrupt traceback."""
    import importlib

    def interrupted(name: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib, "import_module", interrupted)
    assert cli.main(["models"]) == 130
