"""Session-wide test setup: every cache (the demo model, bench models) goes to a temporary
directory, so tests never touch the user's ~/.cache and never see a stale file; a real
PostgreSQL server, started once when a test asks for it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bitserve.cluster.postgres import PostgresServer, start_postgres
from postgres_databases import new_postgres_database


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    previous = os.environ.get("BITSERVE_CACHE")
    os.environ["BITSERVE_CACHE"] = str(tmp_path_factory.mktemp("bitserve-cache"))
    yield
    if previous is None:
        os.environ.pop("BITSERVE_CACHE", None)
    else:
        os.environ["BITSERVE_CACHE"] = previous


# ---- chat families: each family's tokenizer with its published chat template ----------

TEMPLATES = Path(__file__).parent / "tokenizer" / "templates"

# chat family → its tokenizer layout in bitserve.tokenizer.fixtures; templates are the
# published ones (tests/tokenizer/templates/*.jinja, see README.md there)
TOKENIZER_FAMILIES = {"qwen3": "qwen2", "falcon3": "falcon3", "llama3": "llama-bpe"}


def family_tokenizer_metadata(family: str) -> dict[str, Any]:
    """GGUF tokenizer keys of ``family``'s tokenizer (laid out like its real file, trained
    on the demo corpus) and its published chat template."""
    from bitserve.tokenizer.fixtures import tokenizer_metadata

    metadata = tokenizer_metadata(TOKENIZER_FAMILIES[family])
    metadata["tokenizer.chat_template"] = (TEMPLATES / f"{family}.jinja").read_text("utf-8")
    return metadata


@pytest.fixture(scope="session")
def family_metadata() -> Callable[[str], dict[str, Any]]:
    """``family_metadata("qwen3" | "falcon3" | "llama3")`` → tokenizer + template keys."""
    return family_tokenizer_metadata


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session (a temporary folder, 127.0.0.1, no
    fsync); fails (never skips) when PostgreSQL is not installed."""
    server = start_postgres(durable=False)
    yield server
    server.remove()


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> str:
    """A new, empty database on the session's server: each test its own."""
    return new_postgres_database(postgres)
