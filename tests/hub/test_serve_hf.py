"""``bitserve serve -hf NAME`` as a real server process against the fake hub: the first
start downloads (with a progress bar on its terminal) and serves; the second start, with
the hub gone, serves the verified copy without a single request."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pexpect
import pytest
from fake_hub import FakeHub
from hub_helpers import BITNET_REPO, bitnet_repo

from bitserve.api.process import free_port
from bitserve.model.demo import write_demo_model

STARTUP_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("demo") / "demo.gguf"
    write_demo_model(path)
    return path.read_bytes()


def spawn_serve(env: dict[str, str], workdir: Path, port: int) -> pexpect.spawn:
    args = ["-m", "bitserve.cli", "serve", "-hf", "bitnet-2b", "--port", str(port)]
    args += ["--db", str(workdir / "conversations.db")]
    return pexpect.spawn(
        sys.executable,
        args,
        env=env,
        cwd=str(workdir),
        encoding="utf-8",
        timeout=STARTUP_TIMEOUT_S,
        dimensions=(24, 120),
    )


@pytest.fixture
def server_env(hub: FakeHub, tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "BITSERVE_"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HUB_CACHE=str(tmp_path / "hf"),
        BITSERVE_CACHE=str(tmp_path / "bitserve"),
        PYTHONUNBUFFERED="1",
        TERM="xterm",
    )
    yield env


def wait_for_health(child: pexpect.spawn, port: int, timeout_s: float = 30.0) -> int:
    """``/health``'s status once the server listens; fails if it exits or never does."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code
        except httpx.ConnectError:
            assert child.isalive(), "the server exited before it listened"
            assert time.monotonic() < deadline, f"nothing listens on port {port}"
            time.sleep(0.05)


def serve_until_healthy(child: pexpect.spawn, port: int) -> str:
    """Wait for the 'serving' line, check /health and /v1/models, and that requests may
    name the model as it was served (`-hf bitnet-2b`: "model": "bitnet-2b", a 404
    model_not_found before); stop; the output before."""
    child.expect(rf"on http://127\.0\.0\.1:{port}")
    output = str(child.before)
    try:
        # the line comes just before uvicorn binds the port: a loaded machine may not
        # have bound it yet, so ask until it answers (or the server exits)
        assert wait_for_health(child, port) == 200
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()
        assert models["data"][0]["id"] and "bitnet-2b" in [m["id"] for m in models["data"]]
        body = {"model": "bitnet-2b", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2}  # fmt: skip
        chat = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
        assert chat.status_code == 200, chat.text
    finally:
        child.terminate(force=True)
    return output


def test_serve_hf_downloads_once_then_starts_offline(
    hub: FakeHub, server_env: dict[str, str], tmp_path: Path, demo_gguf: bytes
) -> None:
    hub.repos[BITNET_REPO] = bitnet_repo(demo_gguf)

    port = free_port()
    first = serve_until_healthy(spawn_serve(server_env, tmp_path, port), port)
    assert (
        "bitserve serve: downloading microsoft/bitnet-b1.58-2B-4T-gguf/ggml-model-i2_s.gguf"
        in first
    )
    assert "100%|" in first  # huggingface_hub's progress bar, drawn because this is a terminal
    assert len(hub.blob_gets()) == 1

    hub.stop()  # the second start must not need the hub at all
    hub.clear_log()
    port = free_port()
    second = serve_until_healthy(spawn_serve(server_env, tmp_path, port), port)
    assert "downloading" not in second and "%|" not in second
    assert hub.log == []


def test_rm_of_a_model_being_served_says_when_its_space_returns(
    hub: FakeHub, server_env: dict[str, str], tmp_path: Path, demo_gguf: bytes
) -> None:
    """`bitserve rm` said '(… freed)' while `serve -hf` had the file mapped: its blocks
    stay in use until the server exits, and `df` showed nothing freed."""
    hub.repos[BITNET_REPO] = bitnet_repo(demo_gguf)
    port = free_port()
    child = spawn_serve(server_env, tmp_path, port)
    try:
        child.expect(rf"on http://127\.0\.0\.1:{port}")
        assert wait_for_health(child, port) == 200
        command = [sys.executable, "-m", "bitserve.cli", "rm", "bitnet-2b"]
        done = subprocess.run(command, capture_output=True, text=True, env=server_env, timeout=60)
        assert done.returncode == 0, done.stderr
        size = f"{len(demo_gguf) / 1e6:.2f} MB"
        name = Path(sys.executable).name[:15]  # /proc/PID/comm: what the server ran as
        assert done.stderr == (
            f"bitserve rm: removed bitnet-2b; its {size} return to the disk only when process "
            f"{child.pid} ({name}) exits, as the file is still open there\n"
        )
        assert list((tmp_path / "hf").rglob("blobs/*")) == []  # the name is gone all the same
        # the server goes on serving from its mapping
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    finally:
        child.terminate(force=True)
    done = subprocess.run(command, capture_output=True, text=True, env=server_env, timeout=60)
    assert done.returncode == 1 and "no downloaded model is called 'bitnet-2b'" in done.stderr
