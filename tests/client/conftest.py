"""Fixtures for the client's in-process tests."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from client_fakes import BASE_URL, FakeServer

from bitserve.client.api_client import ConversationAPI


@pytest.fixture
def fake_server() -> FakeServer:
    return FakeServer()


@pytest.fixture
def api(fake_server: FakeServer) -> Iterator[ConversationAPI]:
    client = ConversationAPI(BASE_URL, transport=httpx.MockTransport(fake_server.handle))
    yield client
    client.close()
