"""Issue 14 point 5: the server names its model by the file's ``general.name`` in
``/v1/models``, responses and ``/health`` (so clients can tell Falcon from Bonsai), still
answers to the file's stem, and never shows the file's directory to API clients."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from api_helpers import chat_body
from fastapi.testclient import TestClient

from bitserve.api.app import create_app
from bitserve.api.served import ServedModel
from bitserve.api.settings import ServerSettings
from bitserve.engine.loader import load_model
from bitserve.model.fixtures import write_family_fixture
from bitserve.store import SQLiteStore

NAME = "Falcon3-7B-Instruct-1.58bit"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    folder = tmp_path_factory.mktemp("identity")
    path = write_family_fixture(folder / "ggml-model-i2_s.gguf", "llama", name=f"  {NAME}\n")
    loaded = load_model(path, kernel="numpy")
    settings = ServerSettings(db_path=folder / "db.sqlite")
    served = ServedModel.create(loaded, 8, None, settings.aliases, int(time.time()))
    app = create_app(settings, served, SQLiteStore(settings.db_path))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
    loaded.close()


def test_models_list_the_general_name_first(client: TestClient) -> None:
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data][:2] == [NAME, "ggml-model-i2_s"]
    meta = data[0]["meta"]
    assert meta["arch"] == "llama"
    assert "path" not in meta and "/" not in str(meta)


def test_health_names_the_model_and_its_architecture(client: TestClient) -> None:
    health = client.get("/health").json()
    assert health.pop("replica")  # the replica's name: tests/api/test_api_replicas.py
    assert health == {
        "status": "ok", "model": NAME, "arch": "llama", "demo": False,
    }  # fmt: skip


@pytest.mark.parametrize("requested", [NAME, "ggml-model-i2_s", "bitnet"])
def test_responses_carry_the_model_id(client: TestClient, requested: str) -> None:
    body = client.post("/v1/chat/completions", json=chat_body(model=requested, max_tokens=2))
    assert body.status_code == 200, body.text
    assert body.json()["model"] == NAME
    text = client.post(
        "/v1/completions", json={"model": requested, "prompt": "Hi", "max_tokens": 2}
    )
    assert text.status_code == 200 and text.json()["model"] == NAME


def test_file_without_general_name_is_served_by_its_stem(tmp_path: Path) -> None:
    path = write_family_fixture(tmp_path / "falcon3-7b.gguf", "llama", name=" ")
    loaded = load_model(path, kernel="numpy")
    try:
        assert loaded.name == "falcon3-7b"
    finally:
        loaded.close()
