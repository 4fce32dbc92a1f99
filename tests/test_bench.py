"""`bitserve bench` on a tiny model: one JSON line with the documented keys (never speeds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bitserve.bench import paired_bandwidth, paired_fraction
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
    low, high = result["limit_fraction_paired_range"]  # 4 tokens: one segment
    assert low == result["limit_fraction_paired"] == high > 0
    assert result["paired_bandwidth_gb_s"] > 0


def test_the_paired_fraction_divides_each_segment_by_the_passes_around_it() -> None:
    # 10 tok/s of 1 GB tokens between passes of 20 and 30 GB/s: 10 / 25; the machine
    # twice as fast and the speed with it: the same 0.4, whatever the first probe said
    segments = [(10.0, 20.0, 30.0), (20.0, 40.0, 60.0), (15.0, 60.0, 40.0)]
    median, low, high = paired_fraction(segments, 10**9)
    assert (round(median, 6), round(low, 6), round(high, 6)) == (0.4, 0.3, 0.4)
    assert paired_bandwidth(segments) == 50.0  # the bandwidths around them: 25, 50, 50


def test_bench_numpy_kernel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = write_synthetic_model(tmp_path / "tiny.gguf", SHAPE, seed=0)
    argv = ["bench", "-m", str(model), "--kernel", "numpy", "--bandwidth-mb", "16"]
    assert main([*argv, "--prompt-tokens", "4", "--gen-tokens", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["kernel"] == "numpy"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--prompt-tokens", "0"], "bench: --prompt-tokens must be at least 1"),
        (["--gen-tokens", "0"], "bench: --gen-tokens must be at least 1"),
        (["--bandwidth-mb", "0"], "bench: --bandwidth-mb must be at least 1"),
        (["--json-schema", "{bad"], "bench: --json-schema: not JSON: "),
        (["--json-schema", "@/nonexistent/schema.json"], "bench: [Errno 2] No such file"),
        (["-m", "/nonexistent.gguf"], "bench: model file '/nonexistent.gguf' does not exist"),
        (["--prompt-tokens", "100"], "bench: --prompt-tokens 100 and --gen-tokens 64 do not fit"),
    ],
)
def test_bench_says_a_mistake_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], says: str
) -> None:
    """Each of these was a traceback (UnboundLocalError, ZeroDivisionError, ...)."""
    model = write_synthetic_model(tmp_path / "tiny.gguf", SHAPE, seed=0)
    argv = ["bench", "-m", str(model), "--bandwidth-mb", "16", "--llama-cpp", "off"]
    assert main([*argv, *args]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith(says), err


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


def test_bench_compares_with_llama_cpp_when_it_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ratios to llama.cpp's figures, whatever llama.cpp gives (stubbed here: tests
    never need llama-cpp-python), and the same prompt handed to it."""
    from bitserve import bench_llama

    model = write_synthetic_model(tmp_path / "tiny.gguf", SHAPE, seed=0)
    seen: dict[str, object] = {}

    def fake_compare(
        gguf: object, path: Path, threads: int, prompt: object, n_gen: int, runs: int
    ) -> dict[str, float]:
        seen.update(path=path, threads=threads, prompt=prompt, n_gen=n_gen)
        return {"prompt_tok_s": 10.0, "gen_tok_s": 2.0}

    monkeypatch.setattr(bench_llama, "available", lambda: True)
    monkeypatch.setattr(bench_llama, "compare", fake_compare)
    argv = ["bench", "-m", str(model), "--threads", "2", "--bandwidth-mb", "16"]
    assert main([*argv, "--prompt-tokens", "12", "--gen-tokens", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert seen["path"] == model and seen["threads"] == 2 and seen["n_gen"] == 4
    assert len(seen["prompt"]) == 12  # type: ignore[arg-type]
    ratios = result["vs_llama_cpp"]
    assert ratios["gen"] == pytest.approx(result["gen_tok_s"] / 2.0, rel=1e-3)
    assert ratios["prompt"] == pytest.approx(result["prompt_tok_s"] / 10.0, rel=1e-3)
    assert "limit_fraction" in result["llama_cpp"]

    assert main([*argv, "--llama-cpp", "off", "--prompt-tokens", "4", "--gen-tokens", "2"]) == 0
    assert "llama_cpp" not in json.loads(capsys.readouterr().out)


def test_peak_rss_is_bitserve_s_own(tmp_path: Path) -> None:
    """llama.cpp loads its own copy of the model into the bench's process: peak_rss_mb is
    taken before it runs. In a fresh process (ru_maxrss is the process's whole peak), the
    stand-in for llama.cpp touches 1 GiB; the figure must not include it."""
    model = write_synthetic_model(tmp_path / "tiny.gguf", SHAPE, seed=0)
    script = f"""
import json, numpy as np
from bitserve import bench_llama
from bitserve.cli import main
def fake_compare(*args):
    held = np.ones(1 << 30, dtype=np.uint8)  # resident: every page written
    return {{"prompt_tok_s": 10.0, "gen_tok_s": float(held[-1]) * 2.0}}
bench_llama.available = lambda: True
bench_llama.compare = fake_compare
argv = ["bench", "-m", {str(model)!r}, "--threads", "2", "--bandwidth-mb", "16"]
raise SystemExit(main([*argv, "--prompt-tokens", "4", "--gen-tokens", "2"]))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["vs_llama_cpp"]["gen"] > 0  # the stand-in ran
    assert 0 < result["peak_rss_mb"] < 1024


def test_what_llama_cpp_cannot_read(tmp_path: Path) -> None:
    from bitserve import bench_llama
    from bitserve.gguf import GGMLType, GGUFWriter, read_gguf
    from bitserve.gguf.quants import pack_i2s, pack_q2_0

    official = write_synthetic_model(tmp_path / "official.gguf", SHAPE, seed=0)
    with read_gguf(official) as g:
        assert "bitnet-b1.58" in str(bench_llama.why_unreadable(g))
        tied = sum(t.nbytes for t in g.tensors.values())
        assert bench_llama.file_bytes_per_token(g) == tied  # the tied head is read whole

    def one(name: str, data: bytes, gtype: GGMLType, block: int = 64) -> Path:
        w = GGUFWriter()
        w.add("general.architecture", "llama")
        w.add_tensor("blk.0.attn_q.weight", data, gtype, (2048, 4), block)
        w.add_array("token_embd.weight", np.zeros((8, 16), np.float16))
        w.add_array("output.weight", np.zeros((8, 16), np.float16))
        w.write(tmp_path / name)
        return tmp_path / name

    ternary = np.zeros((4, 2048), dtype=np.int8)
    cases = {
        one("i2s.gguf", pack_i2s(ternary, 1.0).tobytes(), GGMLType.I2_S): "I2_S",
        one(
            "g128.gguf", pack_q2_0(ternary, np.ones((4, 16)), 128).tobytes(), GGMLType.Q2_0, 128
        ): "128",
        one("g64.gguf", pack_q2_0(ternary, np.ones((4, 32))).tobytes(), GGMLType.Q2_0): None,
    }
    for path, reason in cases.items():
        with read_gguf(path) as g:
            got = bench_llama.why_unreadable(g)
            assert got is None if reason is None else reason in str(got)
            untied = sum(t.nbytes for n, t in g.tensors.items() if n != "token_embd.weight")
            assert bench_llama.file_bytes_per_token(g) == untied


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
