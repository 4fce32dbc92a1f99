"""The acceptance cluster: a real PostgreSQL (run as the unprivileged postgres user), three
real ``bitserve serve`` replicas on the demo model, and a real nginx in front with the
configuration deploy/ ships, all on 127.0.0.1; started once for the module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bitserve.cluster.local import LocalCluster, start_cluster
from bitserve.engine.loader import LoadedModel, load_model


@pytest.fixture(scope="session")
def no_stop() -> Iterator[dict[str, float]]:
    """``logit_bias`` suppressing the demo model's stop tokens: replies run their length."""
    loaded: LoadedModel = load_model(None)
    yield {str(t): -100.0 for t in loaded.tokenizer.stop_ids}
    loaded.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    workdir = tmp_path_factory.mktemp("cluster")
    with start_cluster(workdir, 3, ["--max-queue", "32"], durable=False) as c:
        yield c
