"""``bitserve pull | models | rm`` on the command line, against the fake hub: in-process
through ``bitserve.cli.main`` (the environment read as the real command reads it), and
once as a real process."""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fake_hub import FakeHub, HubFile, HubRepo
from hub_helpers import BITNET_REPO, bitnet_repo, gguf_bytes, gguf_of_unknown_tensor_type

from bitserve.cli import main
from bitserve.hub.errors import format_size


@pytest.fixture
def env(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_CACHE": str(tmp_path / "hf"),
        "BITSERVE_CACHE": str(tmp_path / "bitserve"),
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return values


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_pull_list_models_verify_and_rm(
    hub: FakeHub, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    content = gguf_bytes(40_000)
    hub.repos[BITNET_REPO] = bitnet_repo(content)
    status, out, err = run(capsys, "pull", "bitnet-2b")
    assert status == 0
    path = Path(out.strip())
    assert path.read_bytes() == content
    assert err.splitlines()[-1] == (
        "bitserve pull: bitnet-2b: microsoft/bitnet-b1.58-2B-4T-gguf/ggml-model-i2_s.gguf, "
        "40.00 kB, sha256 verified"
    )
    status, out, _ = run(capsys, "models")
    assert status == 0
    header, row = out.splitlines()
    assert header.split() == ["NAME", "FAMILY", "SIZE", "VERIFIED", "SOURCE"]
    assert row.split() == [
        "bitnet-2b",
        "bitnet",
        "40.00",
        "kB",
        "yes",
        f"{BITNET_REPO}/ggml-model-i2_s.gguf",
    ]

    blob = Path(os.path.realpath(path))
    damaged = bytearray(content)
    damaged[7] ^= 1
    blob.write_bytes(damaged)
    status, out, err = run(capsys, "models", "--verify")
    assert status == 1
    assert "FAILED" in out.splitlines()[1]
    assert err.startswith("bitserve models: bitnet-2b: sha256 ")
    assert err.rstrip().endswith("`bitserve rm bitnet-2b` then pull it again")

    status, _, err = run(capsys, "rm", "bitnet-2b")
    assert (status, err) == (0, "bitserve rm: removed bitnet-2b (40.00 kB freed)\n")
    assert not path.exists() and not blob.exists()
    status, out, err = run(capsys, "models")
    assert (status, out) == (0, "")
    assert "no models downloaded yet" in err


def test_rm_keeps_a_file_that_another_name_uses(
    hub: FakeHub, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    hub.repos[BITNET_REPO] = bitnet_repo(gguf_bytes(1000))
    assert run(capsys, "pull", "bitnet-2b")[0] == 0
    status, out, _ = run(capsys, "pull", BITNET_REPO)  # the same file, by its repository
    path = Path(out.strip())
    status, _, err = run(capsys, "rm", "bitnet-2b")
    assert status == 0
    assert err == (f"bitserve rm: forgot bitnet-2b; its file stays, as {BITNET_REPO} uses it too\n")
    assert path.exists()
    assert run(capsys, "rm", BITNET_REPO)[0] == 0 and not path.exists()
    status, _, err = run(capsys, "rm", "bitnet-2b")
    assert status == 1
    assert err == (
        "bitserve rm: no downloaded model is called 'bitnet-2b'; `bitserve models` lists them\n"
    )


def test_pull_failures_exit_1_with_one_sentence(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, "pull", "nobody/nothing")
    assert (status, out) == (1, "")
    assert err.startswith("bitserve pull: no repository 'nobody/nothing' on the hub")
    assert err.count("\n") == 1
    status, _, err = run(capsys, "pull", "bitnet-2b", "--offline")
    assert status == 1 and "is not downloaded and offline mode" in err
    assert run(capsys, "pull")[0] == 2


@pytest.mark.parametrize("name", ["owner/..", "owner/.hidden", "owner/name-", "o/" + "x" * 97])
def test_a_repository_id_the_hub_refuses_is_one_sentence(
    env: dict[str, str], capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """huggingface_hub's HFValidationError came out as a traceback."""
    status, out, err = run(capsys, "pull", name)
    assert (status, out) == (1, "")
    assert err == (
        f"bitserve pull: {name!r} is neither a catalog name nor a repository "
        "(owner/name[:VARIANT]); `bitserve pull --list` shows the catalog\n"
    )


def test_pull_list_prints_the_catalog(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "pull", "--list")
    lines = out.splitlines()
    assert status == 0 and lines[0].split() == ["NAME", "FAMILY", "SIZE", "LICENCE", "REPOSITORY"]
    assert any(line.startswith("bitnet-2b ") for line in lines)


def test_the_real_command_reads_hf_endpoint_and_hf_hub_offline(
    hub: FakeHub, env: dict[str, str], tmp_path: Path
) -> None:
    content = gguf_bytes(20_000)
    hub.repos[BITNET_REPO] = bitnet_repo(content)
    command = [sys.executable, "-m", "bitserve.cli", "pull", "bitnet-2b"]
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | env
    done = subprocess.run(command, capture_output=True, text=True, env=child_env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).read_bytes() == content
    assert "\r" not in done.stderr and "%|" not in done.stderr  # no progress bar off a terminal
    hub.stop()
    hub.clear_log()
    offline = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env={**child_env, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout == done.stdout and hub.log == []


def test_the_hub_clients_warnings_are_printed_once(hub: FakeHub, env: dict[str, str]) -> None:
    """huggingface_hub logs through its own handler and the root logger both: each
    retry warning came out twice, in two formats."""
    content = gguf_bytes(2000)
    hub.repos["a/b"] = HubRepo({"m-i2_s.gguf": HubFile(content, drop_after=500)})
    command = [sys.executable, "-m", "bitserve.cli", "pull", "a/b"]
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | env
    done = subprocess.run(command, capture_output=True, text=True, env=child_env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).read_bytes() == content
    assert done.stderr.count("peer closed connection") == 1, done.stderr
    assert "WARNING huggingface_hub.file_download: Error while downloading" in done.stderr


def test_a_trickling_download_is_stopped_with_a_sentence(hub: FakeHub, env: dict[str, str]) -> None:
    """A CDN sending a byte every half second never hit huggingface_hub's read timeout:
    the pull ran for ever at 2 B/s. BITSERVE_PULL_STALL_S sets the window over which a
    download must average 1 kB/s."""
    content = gguf_bytes(5000)
    hub.repos["a/b"] = HubRepo({"m-i2_s.gguf": HubFile(content, trickle_s=0.5)})
    command = [sys.executable, "-m", "bitserve.cli", "pull", "a/b"]
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | env
    child_env["BITSERVE_PULL_STALL_S"] = "2"
    done = subprocess.run(command, capture_output=True, text=True, env=child_env, timeout=60)
    assert (done.returncode, done.stdout) == (1, "")
    last = done.stderr.splitlines()[-1]
    assert last.startswith("bitserve pull: the download of m-i2_s.gguf brought ")
    assert last.endswith(
        "(under 1 kB/s) and was stopped; try again later, or set BITSERVE_PULL_STALL_S to the "
        "seconds a slow link may take to bring 1 kB/s on average (0: never stop)"
    )
    child_env["BITSERVE_PULL_STALL_S"] = "soon"
    done = subprocess.run(command, capture_output=True, text=True, env=child_env, timeout=60)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        "bitserve pull: BITSERVE_PULL_STALL_S is 'soon'; set it to the seconds over which a "
        "download must average 1 kB/s (60 if unset, 0: never stop a slow download)\n"
    )


def test_a_reader_that_stops_early_is_not_an_error() -> None:
    # `bitserve pull --list | head -1` once head has exited: every write is EPIPE
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        writer = subprocess.run(
            [sys.executable, "-m", "bitserve.cli", "pull", "--list"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert (writer.returncode, writer.stderr) == (0, "")


def test_hf_token_opens_a_gated_repository(
    hub: FakeHub,
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    content = gguf_bytes(2000)
    hub.repos["meta/gated-1.58"] = HubRepo({"m-i2_s.gguf": HubFile(content)}, gated=True)
    monkeypatch.setenv("HF_TOKEN", "hf_not_granted")
    status, _, err = run(capsys, "pull", "meta/gated-1.58")
    assert status == 1 and "your HF_TOKEN has not been granted access to it" in err
    monkeypatch.setenv("HF_TOKEN", hub.token)
    status, out, _ = run(capsys, "pull", "meta/gated-1.58")
    assert status == 0 and Path(out.strip()).read_bytes() == content
    assert hub.requests("hub", "HEAD")[-1].authorization == f"Bearer {hub.token}"


def test_models_says_when_a_file_is_gone(
    hub: FakeHub, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    hub.repos[BITNET_REPO] = bitnet_repo(gguf_bytes(1000))
    status, out, _ = run(capsys, "pull", "bitnet-2b")
    path = Path(out.strip())
    os.unlink(os.path.realpath(path))  # e.g. removed with another tool
    status, out, _ = run(capsys, "models")
    assert status == 1
    assert out.splitlines()[1].split()[:5] == ["bitnet-2b", "bitnet", "1.00", "kB", "MISSING"]


def test_rm_of_a_file_already_gone_says_so(
    hub: FakeHub, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """It said '(1.00 kB freed)' for a file that was not there."""
    hub.repos[BITNET_REPO] = bitnet_repo(gguf_bytes(1000))
    _, out, _ = run(capsys, "pull", "bitnet-2b")
    os.unlink(os.path.realpath(Path(out.strip())))
    status, _, err = run(capsys, "rm", "bitnet-2b")
    assert (status, err) == (0, "bitserve rm: forgot bitnet-2b; its file was already gone\n")


def test_a_file_name_two_models_share_is_ambiguous(
    hub: FakeHub, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    hub.repos[BITNET_REPO] = bitnet_repo(gguf_bytes(1000))
    hub.repos["someone/copy"] = bitnet_repo(gguf_bytes(1000))
    assert run(capsys, "pull", "bitnet-2b")[0] == 0
    assert run(capsys, "pull", "someone/copy")[0] == 0
    filename = {Path(line.split()[-1]).name for line in run(capsys, "models")[1].splitlines()[1:]}
    (name,) = filename
    status, _, err = run(capsys, "rm", name)
    assert status == 1
    assert err == (
        f"bitserve rm: {name!r} names 2 downloaded models (bitnet-2b, someone/copy); "
        "say which by its name\n"
    )


COMMIT = "0123456789abcdef0123456789abcdef01234567"
RECORD = {
    "name": "kept",
    "repo": "a/b",
    "filename": "m-i2_s.gguf",
    "revision": COMMIT,
    "path": "/nowhere/m-i2_s.gguf",
    "size": 1000,
    "sha256": None,
    "family": None,
    "verified_at": None,
}


def _models(*records: object) -> str:
    return json.dumps({"version": 1, "models": list(records)})


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{torn", "Expecting property name"),
        ('{"version": 99, "models": []}', "version 99"),
        ('{"version": 1, "models": {"kept": 1}}', "its 'models' is not a list"),
        (_models(RECORD, {"name": "typo"}), "its record #2 lacks repo, filename"),
        (_models(RECORD, RECORD | {"size": "1000"}), "its record #2 has size '1000'"),
        (_models(RECORD | {"added_later": 1}), "its record #1 has unknown fields added_later"),
        (_models(RECORD, [1]), "its record #2 is list, not an object"),
    ],
    ids=["torn", "version", "models", "missing", "type", "unknown", "not-object"],
)
@pytest.mark.parametrize("command", [["models"], ["rm", "bitnet-2b"], ["pull", "bitnet-2b"]])
def test_an_unreadable_model_list_is_said_never_read_as_empty(
    hub: FakeHub,
    env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    content: str,
    problem: str,
    command: list[str],
) -> None:
    """A torn models.json read as 'no models downloaded yet' (exit 0), and the next pull
    would have written over every record; a malformed record was dropped the same way
    (and with it, at the next pull, every record a newer bitserve wrote with a field
    this one does not know)."""
    hub.repos[BITNET_REPO] = bitnet_repo(gguf_bytes(1000))
    registry = Path(env["BITSERVE_CACHE"]) / "models.json"
    registry.parent.mkdir(parents=True)
    registry.write_text(content)
    status, _, err = run(capsys, *command)
    assert status == 1
    assert err.startswith(f"bitserve {command[0]}: the list of downloaded models {registry} ")
    assert problem in err
    assert registry.read_text() == content  # nothing written over


def test_serve_hf_without_network_gives_advice_serve_can_follow(
    hub: FakeHub, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """It said 'pass --offline', which `bitserve serve` does not take (an argparse error),
    and which could not help: the model is not on disk."""
    url = hub.url
    hub.stop()
    status, _, err = run(capsys, "serve", "-hf", "bitnet-2b")
    assert status == 1
    assert err.startswith(f"bitserve serve: cannot reach the model hub at {url} (")
    assert err.endswith(
        "check the network or proxy: bitnet-2b is not downloaded yet, and serve -hf "
        "downloads it before it starts\n"
    )


def test_a_file_pulled_again_is_verified_under_every_name_it_has(
    hub: FakeHub, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """One file, two names (the catalog's and the repository's): after it was found
    damaged and pulled again under one name, the other still said 'no', and the next
    `serve -hf` or pull by that name downloaded the same file a third time."""
    content = gguf_bytes(20_000)
    hub.repos[BITNET_REPO] = bitnet_repo(content)
    path = Path(run(capsys, "pull", "bitnet-2b")[1].strip())
    assert run(capsys, "pull", BITNET_REPO)[0] == 0
    damaged = bytearray(content)
    damaged[3] ^= 1
    Path(os.path.realpath(path)).write_bytes(damaged)
    assert run(capsys, "models", "--verify")[0] == 1  # both names: FAILED
    assert run(capsys, "pull", "bitnet-2b")[0] == 0  # downloads it again, verified
    downloads = len(hub.blob_gets())
    rows = run(capsys, "models")[1].splitlines()[1:]
    assert [row.split()[4] for row in rows] == ["yes", "yes"]
    assert run(capsys, "pull", BITNET_REPO)[0] == 0
    assert len(hub.blob_gets()) == downloads  # the verified copy, not a third download


def _listing(commit: object, *siblings: dict[str, object]) -> bytes:
    return json.dumps({"id": "a/b", "sha": commit, "siblings": list(siblings)}).encode()


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        (b"<html>Welcome to the captive portal</html>", "Expecting value"),
        (b"[1, 2]", "argument after ** must be a mapping"),
        (json.dumps({"id": "a/b", "sha": COMMIT, "siblings": "m.gguf"}).encode(), ""),
        (_listing(None, {"rfilename": "m-i2_s.gguf"}), "commit id None"),
        (_listing("../../../escape", {"rfilename": "m-i2_s.gguf"}), "commit id '../../../escape'"),
        (_listing(COMMIT, {"rfilename": 7, "size": 1}), "file name 7"),
        (
            _listing(COMMIT, {"rfilename": "m-i2_s.gguf", "size": "12"}),
            "size '12' of 'm-i2_s.gguf'",
        ),
        (
            _listing(COMMIT, {"rfilename": "m-i2_s.gguf", "lfs": {"sha256": "x", "size": 1}}),
            "pointerSize",
        ),
        (
            _listing(
                COMMIT,
                {"rfilename": "m-i2_s.gguf", "lfs": {"sha256": "zz", "size": 1, "pointerSize": 1}},
            ),
            "sha256 'zz' of 'm-i2_s.gguf'",
        ),
    ],
    ids=["html", "list", "siblings", "commit", "traversal", "name", "size", "lfs", "sha256"],
)
def test_a_listing_that_is_not_the_hubs_is_one_sentence(
    hub: FakeHub,
    env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    answer: bytes,
    problem: str,
) -> None:
    """Each came out as a traceback (JSONDecodeError, TypeError, KeyError, AttributeError),
    or as "a/b has no revision 'main'" for a listing without a commit id."""
    hub.repos["a/b"] = HubRepo({"m-i2_s.gguf": HubFile(b"GGUF")}, info=answer)
    status, out, err = run(capsys, "pull", "a/b")
    assert (status, out) == (1, "")
    assert err.startswith(f"bitserve pull: the hub at {hub.url} sent an answer about a/b that ")
    assert problem in err and err.count("\n") == 1
    assert not hub.blob_gets()


def test_file_names_outside_the_repository_are_never_fetched(
    hub: FakeHub, env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """huggingface_hub refused them with a ValueError: a traceback; a name with a newline
    forged a line of bitserve's own output."""
    content = gguf_bytes(1000)
    hostile = [
        "../../../escaped-i2_s.gguf",
        str(tmp_path / "absolute-i2_s.gguf"),
        "x\nbitserve pull: all good-i2_s.gguf",
        "sub/./dot-i2_s.gguf",
        "long" + "x" * 300 + "-i2_s.gguf",
        "evil\u202efoo-i2_s.gguf",  # a right-to-left override: prints as another name
        "csi\x9b31m-i2_s.gguf",  # a C1 control, a terminal escape
        "lone\ud800-i2_s.gguf",  # a surrogate JSON can carry, no file system can store
    ]
    files = {name: HubFile(os.urandom(100)) for name in hostile}
    hub.repos["a/b"] = HubRepo({**files, "m-tq2_0.gguf": HubFile(content)})
    before = sorted(p for p in tmp_path.rglob("*"))
    status, out, err = run(capsys, "pull", "a/b")
    assert status == 0
    assert Path(out.strip()).name == "m-tq2_0.gguf"  # the I2_S names were never candidates
    assert Path(out.strip()).read_bytes() == content
    lines = err.splitlines()
    assert lines[0].startswith(
        "bitserve pull: ignoring 8 file(s) of a/b whose names are not paths inside the "
        "repository: '../../../escaped-i2_s.gguf', "
    )
    assert lines[0].endswith(" and 5 more")
    assert all(line.startswith("bitserve pull: ") for line in lines)
    made = sorted(set(tmp_path.rglob("*")) - set(before))
    assert all(
        p.is_relative_to(tmp_path / "hf") or p.is_relative_to(tmp_path / "bitserve") for p in made
    )
    assert not any("i2_s" in p.name for p in made)


def files_sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


BODY = b"GGUF" * 25


@pytest.mark.parametrize(
    ("lfs", "header", "value"),
    [
        (True, "X-Linked-Etag", '"../../../planted"'),
        (True, "X-Repo-Commit", "../../../planted"),
        (False, "ETag", '"../../../planted"'),
        (False, "ETag", "W.."),  # huggingface_hub strips the leading W: '..'
    ],
)
def test_a_hub_naming_paths_outside_the_cache_writes_nothing_there(
    hub: FakeHub,
    env: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    lfs: bool,
    header: str,
    value: str,
) -> None:
    """huggingface_hub joins the HEAD answer's X-Linked-Etag (else ETag) and X-Repo-Commit
    to the cache path as they come: a hostile hub had the file (with the sha256 it also
    listed, so verified) written to tmp_path/planted, outside the cache."""
    content = gguf_bytes(1000)
    served = HubFile(content, lfs=lfs, resolve_headers={header: value})
    hub.repos["a/b"] = HubRepo({"m-i2_s.gguf": served})
    status, out, err = run(capsys, "pull", "a/b")
    assert not list(tmp_path.glob("planted*"))
    assert (status, out) == (1, "")
    last = err.splitlines()[-1]
    assert last.startswith(f"bitserve pull: the hub answered {header} {value!r} for {hub.url}/")
    assert last.endswith(
        "which is not a plain name; nothing was downloaded (is HF_ENDPOINT a Hugging Face hub "
        "you trust?)"
    )
    assert not hub.blob_gets()


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ((302, {"Location": f"/blobs/{files_sha(BODY)}"}, b""), "redirects"),  # itself
        ((200, {"Content-Encoding": "gzip"}, b"GGUF, not gzip"), "decompressing"),
    ],
    ids=["redirect-loop", "broken-gzip"],
)
def test_a_download_answer_that_cannot_be_read_is_one_sentence(
    hub: FakeHub,
    env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    answer: tuple[int, dict[str, str], bytes],
    problem: str,
) -> None:
    """httpx's TooManyRedirects and DecodingError came out as tracebacks."""
    hub.repos["a/b"] = HubRepo({"m-i2_s.gguf": HubFile(BODY, cdn_answer=answer)})
    status, out, err = run(capsys, "pull", "a/b")
    assert (status, out) == (1, "")
    last = err.splitlines()[-1]
    assert last.startswith(f"bitserve pull: the hub at {hub.url} sent an answer about a/b ")
    assert problem in last
    assert list(Path(env["HF_HUB_CACHE"]).rglob("*.gguf")) == []


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"<html><body>Sign in to continue</body></html>", "not a GGUF file (magic b'<htm'"),
        (gguf_bytes(2000)[:60], "truncated file"),
    ],
    ids=["html", "truncated"],
)
@pytest.mark.parametrize("lfs", [True, False], ids=["lfs", "git"])
def test_a_file_that_is_not_a_model_is_refused_and_not_recorded(
    hub: FakeHub,
    env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    content: bytes,
    problem: str,
    lfs: bool,
) -> None:
    """It matched the hub's size and sha256 (or had none to match), so it was recorded
    ('sha256 verified') and `bitserve models` listed it as ready."""
    hub.repos["a/b"] = HubRepo({"m-i2_s.gguf": HubFile(content, lfs=lfs)})
    status, out, err = run(capsys, "pull", "a/b")
    assert (status, out) == (1, "")
    last = err.splitlines()[-1]
    assert last.startswith("bitserve pull: a/b/m-i2_s.gguf is not a model bitserve can read (")
    assert problem in last and last.endswith("); the file was deleted and not recorded")
    assert list(Path(env["HF_HUB_CACHE"]).rglob("*.gguf")) == []
    assert [p.name for p in Path(env["HF_HUB_CACHE"]).rglob("blobs/*")] == []
    status, _, err = run(capsys, "models")
    assert status == 0 and "no models downloaded yet" in err


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (gguf_bytes(2000, arch="mamba"), "architecture 'mamba'; it runs bitnet-b1.58, "),
        (gguf_of_unknown_tensor_type(), "tensor 'blk.0.attn_q.weight' has unsupported type 99"),
    ],
    ids=["architecture", "tensor-type"],
)
def test_a_model_this_version_cannot_run_is_said_and_kept(
    hub: FakeHub,
    env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    content: bytes,
    problem: str,
) -> None:
    """A file of an unknown tensor type was deleted after its download (the user had
    waited for gigabytes, and a newer bitserve would download it again), and one of an
    unknown architecture was reported 'sha256 verified' (exit 0) for serve to refuse."""
    hub.repos["a/b"] = HubRepo({"m-i2_s.gguf": HubFile(content)})
    size = format_size(len(content))
    for _ in range(2):  # the second run finds it on disk: said again, nothing downloaded
        status, out, err = run(capsys, "pull", "a/b")
        assert (status, out) == (1, "")
        last = err.splitlines()[-1]
        assert last.startswith(
            "bitserve pull: a/b/m-i2_s.gguf is a GGUF file this version of bitserve cannot run ("
        )
        assert problem in last
        assert last.endswith(
            f"); its {size} are kept as a/b, so a version that runs it needs no new "
            "download (`bitserve rm a/b` deletes it)"
        )
        assert len(hub.blob_gets()) == 1
    (kept,) = Path(env["HF_HUB_CACHE"]).rglob("snapshots/*/m-i2_s.gguf")
    assert kept.read_bytes() == content
    status, out, _ = run(capsys, "models")
    assert status == 0 and out.splitlines()[1].split()[-2:] == ["yes", "a/b/m-i2_s.gguf"]
    status, _, err = run(capsys, "rm", "a/b")
    assert (status, err) == (0, f"bitserve rm: removed a/b ({size} freed)\n")
    assert not kept.exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])
def test_a_pull_stopped_by_a_signal_leaves_no_partial_file(
    hub: FakeHub, env: dict[str, str], signum: int
) -> None:
    """huggingface_hub deletes its partial file in a `finally`, which SIGTERM's default
    action (death on the spot) skipped: each stopped pull (systemd, docker stop, timeout,
    a closed terminal) left a '<sha>.<random>.incomplete' blob that no later pull
    resumes (the name is per process) or removes."""
    content = gguf_bytes(400_000)
    hub.repos["a/b"] = HubRepo({"m-i2_s.gguf": HubFile(content, stall_after=100_000)})
    command = [sys.executable, "-m", "bitserve.cli", "pull", "a/b"]
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | env
    blobs = Path(env["HF_HUB_CACHE"]) / "models--a--b" / "blobs"
    with subprocess.Popen(command, env=child_env, stderr=subprocess.PIPE, text=True) as child:
        deadline = time.monotonic() + 60
        while not list(blobs.glob("*.incomplete")):  # written in 10 MB chunks: empty yet
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        child.send_signal(signum)
        _, err = child.communicate(timeout=30)
    assert child.returncode == 128 + signum, err
    assert list(blobs.iterdir()) == []


def _wait_for(condition: Any, child: subprocess.Popen[str], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)


def test_a_partial_file_of_a_killed_pull_is_deleted_by_the_next(
    hub: FakeHub, env: dict[str, str]
) -> None:
    """huggingface_hub names its partial file per process and deletes it on the way out,
    which SIGKILL (or the OOM killer, a power cut) skips: every such pull left its
    '<sha>.<random>.incomplete' (gigabytes) in the cache for good."""
    content = gguf_bytes(400_000)
    served = HubFile(content, stall_after=100_000)
    hub.repos["a/b"] = HubRepo({"m-i2_s.gguf": served})
    command = [sys.executable, "-m", "bitserve.cli", "pull", "a/b"]
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | env
    blobs = Path(env["HF_HUB_CACHE"]) / "models--a--b" / "blobs"
    with subprocess.Popen(command, env=child_env, stderr=subprocess.PIPE, text=True) as child:
        _wait_for(lambda: list(blobs.glob("*.incomplete")), child)
        child.kill()
        child.communicate(timeout=30)
    assert len(list(blobs.glob("*.incomplete"))) == 1  # the killed pull's, left behind
    served.stall_after = None
    done = subprocess.run(command, capture_output=True, text=True, env=child_env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).read_bytes() == content
    assert [p.name for p in blobs.iterdir()] == [served.sha256]


def test_a_second_pull_of_a_file_being_downloaded_says_it_waits(
    hub: FakeHub, env: dict[str, str]
) -> None:
    """The second of two pulls of one model waited for the first one's download lock
    in silence, after saying 'downloading', and downloaded nothing."""
    content = gguf_bytes(400_000)
    served = HubFile(content, stall_after=100_000)
    hub.repos["a/b"] = HubRepo({"m-i2_s.gguf": served})
    command = [sys.executable, "-m", "bitserve.cli", "pull", "a/b"]
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | env
    blobs = Path(env["HF_HUB_CACHE"]) / "models--a--b" / "blobs"
    popen = {"env": child_env, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    with subprocess.Popen(command, **popen) as first:  # type: ignore[call-overload]
        _wait_for(lambda: list(blobs.glob("*.incomplete")), first)
        with subprocess.Popen(command, **popen) as second:  # type: ignore[call-overload]
            line = second.stderr.readline()
            assert line == (
                "bitserve pull: another process is downloading a/b/m-i2_s.gguf (400.00 kB); "
                "waiting for it\n"
            )
            served.stall_after = None
            first.terminate()  # its partial file goes; the second downloads the file
            assert first.wait(timeout=30) == 128 + signal.SIGTERM
            out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert Path(out.strip()).read_bytes() == content


def test_rm_deletes_nothing_outside_the_hugging_face_cache(
    hub: FakeHub, env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """rm deleted whatever path models.json named: a hand-edited (or another tool's)
    record pointing at ~/notes.txt had that file deleted."""
    hub.repos[BITNET_REPO] = bitnet_repo(gguf_bytes(1000))
    assert run(capsys, "pull", "bitnet-2b")[0] == 0
    precious = tmp_path / "notes.txt"
    precious.write_text("not a model")
    registry = Path(env["BITSERVE_CACHE"]) / "models.json"
    body = json.loads(registry.read_text())
    body["models"][0] |= {"path": str(precious), "size": precious.stat().st_size}
    registry.write_text(json.dumps(body))
    status, _, err = run(capsys, "rm", "bitnet-2b")
    assert status == 1
    assert err == (
        f"bitserve rm: {precious} is not a file of a Hugging Face cache "
        "(models--OWNER--NAME/snapshots/...); bitserve deletes nothing else\n"
    )
    assert precious.read_text() == "not a model"
    assert json.loads(registry.read_text()) == body  # the record stays, for the user to see


@pytest.mark.parametrize(
    "headers",
    [{"Retry-After": "86400"}, {"RateLimit": '"api";r=0;t=3600', "RateLimit-Policy": "x"}],
    ids=["retry-after", "ratelimit"],
)
def test_a_hub_asking_to_wait_for_hours_is_told_not_obeyed(
    hub: FakeHub, env: dict[str, str], capsys: pytest.CaptureFixture[str], headers: dict[str, str]
) -> None:
    """huggingface_hub sleeps as long as a 429 answer asks, five times over: the command
    sat silent for days."""
    answer = (429, headers, b"")
    hub.repos["a/b"] = HubRepo({"m-i2_s.gguf": HubFile(gguf_bytes(1000), cdn_answer=answer)})
    status, out, err = run(capsys, "pull", "a/b")
    assert (status, out) == (1, "")
    assert err.splitlines()[-1] == (
        "bitserve pull: the hub at 127.0.0.1 is limiting this machine's requests and asks it "
        f"to wait {86400 if 'Retry-After' in headers else 3600} s; try again later (requests "
        "with an HF_TOKEN get a higher limit)"
    )


def test_a_model_list_that_cannot_be_written_is_one_sentence(
    hub: FakeHub,
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A full disk under BITSERVE_CACHE (the Hugging Face cache elsewhere) made the pull
    that had just downloaded and verified its file end in an OSError traceback."""
    hub.repos[BITNET_REPO] = bitnet_repo(gguf_bytes(1000))
    hub.repos["a/b"] = HubRepo({"m-i2_s.gguf": HubFile(gguf_bytes(1000))})
    assert run(capsys, "pull", "bitnet-2b")[0] == 0
    registry = Path(env["BITSERVE_CACHE"]) / "models.json"
    before = registry.read_text()

    def full(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("bitserve.hub.registry.tempfile.mkstemp", full)
    for command in (["pull", "a/b"], ["models", "--verify"]):  # --verify records its result
        status, out, err = run(capsys, *command)
        assert (status, out) == (1, "")
        assert err.splitlines()[-1] == (
            f"bitserve {command[0]}: the list of downloaded models {registry} cannot be "
            "written (No space left on device) and is unchanged; make room or fix its folder, "
            "then run the same command again"
        )
        assert registry.read_text() == before


BOMB = (200, {"Content-Encoding": "gzip"}, gzip.compress(bytes(50_000_000)))


@pytest.mark.parametrize(
    "fault", [{"endless": True}, {"cdn_answer": BOMB}], ids=["endless", "gzip-bomb"]
)
def test_a_download_without_end_stops_at_the_listed_size(
    hub: FakeHub, env: dict[str, str], capsys: pytest.CaptureFixture[str], fault: dict[str, Any]
) -> None:
    """huggingface_hub writes whatever a body brings and compares sizes at its end: a
    CDN sending without end (no Content-Length) filled the disk, and the pull never
    finished while bytes flowed; 50 kB of gzip became 50 MB on disk."""
    hub.repos["a/b"] = HubRepo({"m-i2_s.gguf": HubFile(gguf_bytes(100_000), **fault)})
    status, out, err = run(capsys, "pull", "a/b")
    assert (status, out) == (1, "")
    assert err.splitlines()[-1] == (
        f"bitserve pull: the download from {hub.cdn_url}/blobs/"
        f"{hub.repos['a/b'].files['m-i2_s.gguf'].sha256} went on past the 100000 bytes the "
        "hub lists for the file; stopped and deleted (is HF_ENDPOINT a Hugging Face hub you "
        "trust?)"
    )
    assert list((Path(env["HF_HUB_CACHE"]) / "models--a--b" / "blobs").iterdir()) == []
