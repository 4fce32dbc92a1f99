"""Fixtures for the API tests: the demo model loaded once, and in-process apps around it
(real engine loop, real SQLite store in a temporary directory)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
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


@pytest.fixture(scope="session")
def family_models(
    tmp_path_factory: pytest.TempPathFactory, family_metadata: Callable[[str], dict[str, Any]]
) -> Iterator[Callable[[str], LoadedModel]]:
    """``family_models("qwen3" | "falcon3" | "llama3")`` → a tiny random model (arch
    ``bitnet``: its template is used) with that family's tokenizer and published chat
    template, loaded once per session."""
    from bitserve.model.synthetic import ModelShape, write_synthetic_model

    loaded: dict[str, LoadedModel] = {}

    def get(family: str) -> LoadedModel:
        if family not in loaded:
            metadata = family_metadata(family)
            shape = ModelShape(
                n_layers=1, dim=128, ffn_dim=256, n_heads=2, n_kv_heads=1,
                vocab_size=len(metadata["tokenizer.ggml.tokens"]), context_length=2048,
            )  # fmt: skip
            path = tmp_path_factory.mktemp("family") / f"{family}.gguf"
            write_synthetic_model(path, shape, seed=3, arch="bitnet", tokenizer_metadata=metadata)
            loaded[family] = load_model(path)
        return loaded[family]

    yield get
    for model in loaded.values():
        model.close()


@pytest.fixture
def make_family_client(
    family_models: Callable[[str], LoadedModel], tmp_path: Path
) -> Callable[[str], AbstractContextManager[TestClient]]:
    """``with make_family_client("qwen3") as client:`` — an app serving that family."""

    @contextmanager
    def factory(family: str) -> Iterator[TestClient]:
        settings = ServerSettings(db_path=tmp_path / f"{family}.db")
        served = ServedModel.create(
            family_models(family), settings.max_queue, None, settings.aliases
        )
        app = create_app(settings, served, SQLiteStore(settings.db_path))
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client

    return factory


@pytest.fixture(scope="session")
def arch_models(
    tmp_path_factory: pytest.TempPathFactory, family_metadata: Callable[[str], dict[str, Any]]
) -> Iterator[Callable[[str, str], LoadedModel]]:
    """``arch_models(arch, chat_family)`` → the families' own tiny fixture of ``arch``
    (``bitserve.model.fixtures``: its real layout, ternary type and tokenizer kind) with
    ``chat_family``'s published template, loaded once per session."""
    from bitserve.model.fixtures import FIXTURE_VOCAB, write_family_fixture
    from bitserve.tokenizer.fixtures import tokenizer_metadata

    loaded: dict[tuple[str, str], LoadedModel] = {}

    def get(arch: str, chat_family: str) -> LoadedModel:
        if (arch, chat_family) not in loaded:
            template = family_metadata(chat_family)["tokenizer.chat_template"]
            kind = {"qwen3": "qwen2", "falcon3": "falcon3", "llama3": "llama-bpe"}[chat_family]
            metadata = tokenizer_metadata(kind, FIXTURE_VOCAB)
            metadata["tokenizer.chat_template"] = template
            path = tmp_path_factory.mktemp("arch") / f"{arch}-{chat_family}.gguf"
            write_family_fixture(path, arch, tokenizer_metadata=metadata)
            loaded[arch, chat_family] = load_model(path)
        return loaded[arch, chat_family]

    yield get
    for model in loaded.values():
        model.close()
