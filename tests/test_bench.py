"""`bitserve bench` on a tiny model: one JSON line with the documented keys (never speeds)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bitserve.cli import main
from bitserve.model.synthetic import ModelShape, write_synthetic_model

KEYS = {
    "prompt_tok_s",
    "prompt_first_tok_s",
    "gen_tok_s",
    "bandwidth_gb_s",
    "bytes_per_token",
    "limit_fraction",
    "load_s",
    "peak_rss_mb",
    "threads",
    "kernel",
    "head",
    "baseline",
}
SHAPE = ModelShape(
    n_layers=2, dim=256, ffn_dim=384, n_heads=4, n_kv_heads=2, vocab_size=500, context_length=64
)


@pytest.mark.parametrize("head", ["f16", "int8"])
def test_bench_prints_one_json_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], head: str
) -> None:
    model = write_synthetic_model(tmp_path / "tiny.gguf", SHAPE, seed=0)
    argv = ["bench", "-m", str(model), "--threads", "2", "--head", head, "--bandwidth-mb", "16"]
    assert main([*argv, "--prompt-tokens", "12", "--gen-tokens", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result.keys() >= KEYS
    assert result["head"] == head and result["threads"] == 2
    codes = 2 * (2 * 256 * 256 + 2 * 128 * 256 + 3 * 384 * 256) // 4  # 2 layers, 7 projections
    head_bytes = 500 * 256 * (2 if head == "f16" else 1) + (0 if head == "f16" else 4 * 500)
    assert result["bytes_per_token"] == codes + head_bytes
    assert result["prompt_tok_s"] > 0 and result["gen_tok_s"] > 0
    assert set(result["baseline"]) == {"gen", "prompt"}
    low, high = result["bandwidth_range_gb_s"]
    assert low <= result["bandwidth_gb_s"] <= high  # the median of the passes


def test_bench_numpy_kernel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = write_synthetic_model(tmp_path / "tiny.gguf", SHAPE, seed=0)
    argv = ["bench", "-m", str(model), "--kernel", "numpy", "--bandwidth-mb", "16"]
    assert main([*argv, "--prompt-tokens", "4", "--gen-tokens", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["kernel"] == "numpy"


def test_scenario_defaults_to_kernels() -> None:
    from bitserve.cli import build_parser

    args = build_parser("bench").parse_args(["bench"])
    assert args.scenario == "kernels"
    with pytest.raises(SystemExit):
        build_parser("bench").parse_args(["bench", "--scenario", "nope"])


def test_serving_scenario_without_its_module(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A build without bitserve.bench_serving: a clear error and exit status 2."""
    monkeypatch.setitem(sys.modules, "bitserve.bench_serving", None)  # import now fails
    assert main(["bench", "--scenario", "concurrent"]) == 2
    assert "bitserve.bench_serving" in capsys.readouterr().err


def test_bench_json_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--json-schema``: paired decoding without and with the mask, under ``constraint``."""
    from bitserve.model.demo import demo_model_path

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}}))
    argv = ["bench", "-m", str(demo_model_path()), "--bandwidth-mb", "16", "--gen-tokens", "8"]
    assert main([*argv, "--prompt-tokens", "4", "--json-schema", f"@{schema}", "--pairs", "2"]) == 0
    constraint = json.loads(capsys.readouterr().out)["constraint"]
    assert constraint["pairs"] == 2 and len(constraint["pair_ratios"]) == 2
    assert constraint["gen_tok_s"] > 0 and constraint["gen_unconstrained_tok_s"] > 0
    assert constraint["sample_us"] > 0 and constraint["compile_ms"] > 0
