"""A step that fails (non-finite logits from bad weights) fails only its requests with a
500 that says so; the engine keeps serving, and ``/health`` says when it cannot run.

The failures come from real model files that no load-time check refuses: the bad values
are in an embedding that is not the head (read a row at a time, never scanned; the head,
norms and scales are checked at load), with an untied head: NaN in one token's row, so
that only prompts ending in that token go wrong (the next layers' int8 activation
quantization turns the NaN row into finite keys and values for the others), and NaN in
every row (every step fails)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from api_helpers import sse_events
from fastapi.testclient import TestClient

from bitserve.api.app import create_app
from bitserve.api.served import ServedModel
from bitserve.api.settings import ServerSettings
from bitserve.engine.loader import LoadedModel, load_model
from bitserve.engine.loop import FAILED_STEPS_UNHEALTHY
from bitserve.gguf.constants import GGMLType
from bitserve.gguf.reader import read_gguf
from bitserve.gguf.writer import GGUFWriter

POISON_TOKEN = 700  # an ordinary token of the demo vocabulary
pytestmark = pytest.mark.timeout(120)  # before the fix, the first failure hung every request


def rewrite_demo(
    src: Path, dst: Path, edit: Callable[[str, np.ndarray], np.ndarray], untie: bool
) -> Path:
    """Copy the demo model with F32/F16 tensors passed through ``edit`` (and, with
    ``untie``, an ``output.weight`` head copied from the embedding before the edit)."""
    w = GGUFWriter()
    with read_gguf(src) as g:
        for key, value in g.metadata.items():
            w.add(key, value, g.metadata_types[key])
        for name, info in g.tensors.items():
            if info.ggml_type in (GGMLType.F32, GGMLType.F16):
                array = np.array(g.array(name))
                if untie and name == "token_embd.weight":
                    w.add_array("output.weight", array.copy())
                w.add_array(name, edit(name, array))
            else:
                w.add_tensor(name, g.raw(name).tobytes(), info.ggml_type, info.dims)
    w.write(dst)
    return dst


def poison_row(name: str, array: np.ndarray) -> np.ndarray:
    if name == "token_embd.weight":
        array[POISON_TOKEN] = np.nan
    return array


def poison_all_rows(name: str, array: np.ndarray) -> np.ndarray:
    if name == "token_embd.weight":
        array[:] = np.nan
    return array


@contextmanager
def serving(path: Path, db: Path) -> Iterator[TestClient]:
    loaded: LoadedModel = load_model(path)
    settings = ServerSettings(db_path=db)
    served = ServedModel.create(loaded, settings.max_queue, aliases=settings.aliases)
    from bitserve.store import SQLiteStore

    app = create_app(settings, served, SQLiteStore(db))
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client
    finally:
        loaded.close()


def completion(prompt: list[int], **extra: object) -> dict[str, object]:
    return {"model": "bitnet", "prompt": prompt, "max_tokens": 4, "temperature": 0, **extra}


@pytest.fixture
def poisoned_token_model(loaded: LoadedModel, tmp_path: Path) -> Path:
    return rewrite_demo(loaded.path, tmp_path / "nan-row.gguf", poison_row, untie=True)


def test_a_failing_request_gets_a_500_and_the_engine_serves_the_next(
    poisoned_token_model: Path, tmp_path: Path
) -> None:
    with serving(poisoned_token_model, tmp_path / "c.db") as client:
        bad = client.post("/v1/completions", json=completion([5, 6, POISON_TOKEN]))
        assert bad.status_code == 500, bad.text
        error = bad.json()["error"]
        assert error["code"] == "generation_failed" and error["type"] == "server_error"
        assert "non-finite logits" in error["message"]

        # the engine thread survived: good prompts still generate, alone and next to a
        # failing one in the same batch
        assert client.post("/v1/completions", json=completion([5, 6])).status_code == 200
        streamed = client.post("/v1/completions", json=completion([POISON_TOKEN], stream=True))
        assert streamed.status_code == 200  # the stream had started: the error is an event
        assert sse_events(streamed.text)[-1]["error"]["code"] == "generation_failed"
        assert client.post("/v1/completions", json=completion([7, 8])).status_code == 200
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"


def test_health_reports_an_engine_whose_steps_all_fail(loaded: LoadedModel, tmp_path: Path) -> None:
    path = rewrite_demo(loaded.path, tmp_path / "nan-rows.gguf", poison_all_rows, untie=True)
    with serving(path, tmp_path / "c.db") as client:
        assert client.get("/health").status_code == 200
        for _ in range(FAILED_STEPS_UNHEALTHY):
            answer = client.post("/v1/chat/completions", json={
                "model": "bitnet", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
            })  # fmt: skip
            assert answer.status_code == 500
            assert answer.json()["error"]["code"] == "generation_failed"
        health = client.get("/health")
        assert health.status_code == 503
        body = health.json()
        assert body["status"] == "error" and "non-finite logits" in body["error"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_engine_thread_is_a_503_and_unhealthy(loaded: LoadedModel, tmp_path: Path) -> None:
    def crash(_: object) -> None:
        raise SystemExit("simulated crash")  # not an Exception: nothing in the loop stops it

    with serving(loaded.path, tmp_path / "c.db") as client:
        served: ServedModel = client.app.state.served  # type: ignore[attr-defined]
        with pytest.raises(TimeoutError):
            asyncio.run(asyncio.wait_for(served.engine.call(crash), 1.0))
        assert not served.engine.alive
        answer = client.post("/v1/completions", json=completion([5, 6]))
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "unavailable"
        health = client.get("/health")
        assert health.status_code == 503 and "not running" in health.json()["error"]
