"""Fixtures for the hub tests: a fake hub on 127.0.0.1 and a Puller pointed at it, with
its own Hugging Face cache and registry under the test's tmp_path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_hub import FakeHub
from hub_helpers import HubClient

from bitserve.hub import HubOptions, Registry


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as running:
        yield running


@pytest.fixture
def client(hub: FakeHub, tmp_path: Path) -> HubClient:
    options = HubOptions(endpoint=hub.url, cache_dir=tmp_path / "hf", token=False)
    return HubClient(options, Registry(tmp_path / "bitserve" / "models.json"))
