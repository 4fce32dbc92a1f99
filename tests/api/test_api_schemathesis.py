"""Schemathesis over the whole OpenAPI document, against the real server process, with
and without API keys: no request it can make gets a 5xx, and every answer matches the
document (status codes, content types, bodies, headers, the ``Allow`` of a 405).

A CI-sized run: ``FUZZ_EXAMPLES`` requests per operation and key setting, the same ones
every run. The longer run with fresh inputs is ``scripts/fuzz`` (README, Development).
The server runs the demo model with a small context so that no request takes long.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import schemathesis
from api_server import Server, start
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi import checks

FUZZ_EXAMPLES = int(os.environ.get("BITSERVE_FUZZ_EXAMPLES", "12"))
FUZZ_RANDOM = os.environ.get("BITSERVE_FUZZ_RANDOM") == "1"  # scripts/fuzz: new inputs
KEY = "sk-fuzz"
CHECKS = [
    schemathesis.checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
    checks.allow_header_conformance,
]


@pytest.fixture(scope="module", params=["keys", "no-keys"])
def fuzzed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, dict[str, str]]]:
    keyed = request.param == "keys"
    args = ["--ctx-size", "256", "--max-queue", "64", *(["--api-key", KEY] if keyed else [])]
    server = start(tmp_path_factory.mktemp(f"fuzz-{request.param}"), *args)
    yield server, ({"Authorization": f"Bearer {KEY}"} if keyed else {})
    server.stop()


def fuzz_operations(url: str, headers: dict[str, str], examples: int) -> None:
    """Every operation of the server's OpenAPI document, ``examples`` generated requests
    each (schemathesis strategies driven by Hypothesis directly: its lazy pytest loader
    does not run under pytest 9)."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=headers)
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=examples,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=not FUZZ_RANDOM,
            database=None,
        )
        def run(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=url, headers=headers, checks=CHECKS, timeout=60)

        run()


def test_no_5xx_and_every_answer_matches_the_document(
    fuzzed: tuple[Server, dict[str, str]],
) -> None:
    server, headers = fuzzed
    fuzz_operations(server.url, headers, FUZZ_EXAMPLES)
