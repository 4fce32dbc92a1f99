"""`bitserve bench --scenario conversation|concurrent` against the real server process on
the tiny demo model: one JSON line with the documented keys (never speeds)."""

from __future__ import annotations

import argparse
import json

import pytest

from bitserve.bench_serving import add_scenario_arguments, run_scenario
from bitserve.model.demo import demo_model_path

KEYS = {
    "conversation": {
        "fresh_ttft_s",
        "followup_ttft_s",
        "ttft_ratio",
        "history_tokens",
        "cached_tokens",
        "followup_new_tokens",
        "fresh_new_tokens",
    },
    "concurrent": {
        "single_tok_s",
        "aggregate_tok_s",
        "speedup",
        "streams",
        "clients_served",
        "client_min_tok_s",
        "client_max_tok_s",
    },
    "cluster": {
        "affinity_warm_share",
        "round_robin_warm_share",
        "affinity_followup_ttft_s",
        "round_robin_followup_ttft_s",
        "direct_ms",
        "lb_ms",
        "lb_added_ms",
    },
}


def scenario_args(*argv: str) -> argparse.Namespace:
    """Parsed like bench's: its --model/--threads/--scenario plus the scenario options."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--scenario")
    add_scenario_arguments(parser)
    return parser.parse_args(["--model", str(demo_model_path()), "--threads", "1", *argv])


@pytest.mark.parametrize("scenario", ["conversation", "concurrent"])
def test_scenario_prints_one_json_line(scenario: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = scenario_args(
        "--scenario", scenario, "--history-tokens", "120", "--repeats", "1",
        "--streams", "2", "--clients", "3", "--stream-tokens", "4",
    )  # fmt: skip
    assert run_scenario(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert KEYS[scenario] <= result.keys()
    assert result["scenario"] == scenario
    if scenario == "conversation":
        assert result["history_tokens"] >= 120
        # the same message and template computed on both sides: only the history differs
        assert result["followup_new_tokens"] == result["fresh_new_tokens"]
    else:
        assert result["streams"] == 2 and result["clients_served"] == 3
        assert result["streams_served"] == 2 and result["repeats"] == 1


def test_unknown_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_scenario(scenario_args("--scenario", "nope")) == 2
    assert "unknown scenario" in capsys.readouterr().err


def test_cluster_scenario_compares_affinity_with_round_robin(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = scenario_args("--scenario", "cluster", "--conversations", "2", "--lb-requests", "20")
    assert run_scenario(args) == 0
    result = json.loads(capsys.readouterr().out.strip())
    assert KEYS["cluster"] <= result.keys() and result["replicas"] == 2
    # the hash keeps each conversation on its replica; strict round-robin over two
    # replicas sends every sequential follow-up to the other one
    assert result["affinity_warm_share"] == 1.0
    assert result["round_robin_warm_share"] == 0.0
    assert result["lb_ms"] > 0 and result["direct_ms"] > 0
