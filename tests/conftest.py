"""Session-wide test setup: every cache (the demo model, bench models) goes to a temporary
directory, so tests never touch the user's ~/.cache and never see a stale file."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    previous = os.environ.get("BITSERVE_CACHE")
    os.environ["BITSERVE_CACHE"] = str(tmp_path_factory.mktemp("bitserve-cache"))
    yield
    if previous is None:
        os.environ.pop("BITSERVE_CACHE", None)
    else:
        os.environ["BITSERVE_CACHE"] = previous
