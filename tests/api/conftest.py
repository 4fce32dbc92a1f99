"""Fixtures for the API tests: the demo model loaded once, and in-process apps around it
(real engine loop, real SQLite store in a temporary directory)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from api_helpers import AppFactory
from fastapi.testclient import TestClient

from bitserve.api.app import create_app
from bitserve.api.served import ServedModel
from bitserve.api.settings import ServerSettings
from bitserve.engine.loader import LoadedModel, load_model
from bitserve.store import SQLiteStore


@pytest.fixture(scope="session")
def loaded() -> Iterator[LoadedModel]:
    """The demo model (built once per session in the isolated cache)."""
    model = load_model(None)
    yield model
    model.close()


@pytest.fixture
def make_client(loaded: LoadedModel, tmp_path: Path) -> AppFactory:
    """``with make_client(api_keys=("k",), ctx_size=256) as client:`` — a TestClient on a
    fresh app (lifespan run), conversations in ``tmp_path/<n>.db`` unless ``db`` is given."""
    counter = iter(range(1000))

    @contextmanager
    def factory(db: Path | None = None, **overrides: Any) -> Iterator[TestClient]:
        settings = ServerSettings(db_path=db or tmp_path / f"{next(counter)}.db", **overrides)
        served = ServedModel.create(
            loaded,
            settings.max_queue,
            settings.ctx_size,
            settings.aliases,
            int(time.time()),
            max_input_chars=settings.max_input_chars,
        )
        app = create_app(settings, served, SQLiteStore(settings.db_path))
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client

    return factory


@pytest.fixture
def client(make_client: AppFactory) -> Iterator[TestClient]:
    with make_client() as c:
        yield c
