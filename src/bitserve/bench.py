"""`bitserve bench`: prompt and generation speed, against the machine's memory bandwidth.

Generation is memory-bound: every token reads all ternary weights plus the LM head, so the
ceiling is ``bandwidth / bytes_per_token``; ``limit_fraction`` says how close we get. By
default the model is a synthetic one with BitNet-b1.58-2B-4T's shapes (random weights,
same bytes and arithmetic), written once to ``$BITSERVE_CACHE`` (or ``~/.cache/bitserve``).
``prompt_tok_s`` is the median of 3 prompts (``prompt_first_tok_s``: the first, which
also pays one-time allocations); ``bandwidth_gb_s`` the median of 9 probe passes.
A shared machine's bandwidth moves by half or more from one minute to the next (the 2-core
VM: 35-81 GB/s for the same read), so a probe taken before the generation can flatter or
sink ``limit_fraction``; ``limit_fraction_paired`` pairs instead: the generation runs in
segments of 16 tokens with one probe pass before each and after the last, each
segment's speed is divided by the mean of the passes around it, and the median of those
fractions is printed with their range, and ``paired_bandwidth_gb_s`` the median of those
means (the bandwidth the fraction was measured at).
Prints ONE JSON line; ``baseline`` gives the ratios to bitnet.cpp's figures on a 2-core
AVX2 EPYC (spec §7). Never meant to gate CI on absolute numbers.

Any family's file runs (``-m``). ``bytes_per_token`` is what bitserve reads per generated
token (every ternary weight in its kernel layout, codes and block scales, plus the head as
the kernel reads it); ``file_bytes_per_token`` what the file's own types need; the ceiling
divides the bandwidth by the smaller of the two, so no layout choice can flatter the
fraction. With ``llama-cpp-python`` installed (``--llama-cpp auto``, the default), llama.cpp
runs on the same file in the same process, after bitserve, with the same threads, prompt
and generated tokens: ``llama_cpp`` holds its figures (or why it cannot read the file) and
``vs_llama_cpp`` the ratios (bitserve / llama.cpp).

``--scenario conversation|concurrent`` measures the server instead (``bitserve.bench_serving``,
imported only then); the default ``kernels`` is the measurement above.

``--json-schema SCHEMA`` (JSON text, or ``@file``) adds what constrained decoding costs:
decoding through the engine's sampler with the server's default sampling, alternately
without and with the schema's mask (paired runs, order swapped every round, so the
machine's drift falls on both), under ``constraint``: both speeds, their ratio, the
sampler's time per token, and the grammar's one-time costs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from bitserve import bench_llama
from bitserve.engine.constraint import ConstraintCompiler
from bitserve.engine.loader import add_runtime_arguments, runtime_options
from bitserve.engine.sampling import Sampler
from bitserve.engine.scheduler import DEFAULT_MAX_BATCH_TOKENS
from bitserve.engine.types import SamplingParams
from bitserve.kernels import TernaryWeight, get_backend
from bitserve.kernels.native import NativeBackend, available_kernels
from bitserve.model.bitnet import BitNetModel
from bitserve.model.demo import llama3_tokenizer_metadata
from bitserve.model.synthetic import SHAPE_2B4T, write_synthetic_model
from bitserve.tokenizer import Tokenizer

BASELINE_GEN_TOK_S = 15.5  # bitnet.cpp, 2-core AVX2 EPYC, 2B-4T shapes (spec §7)
BASELINE_PROMPT_TOK_S = 68.8
SYNTHETIC_NAME = "synthetic-2b4t-i2s-seed0.gguf"
SCENARIOS = ("kernels", "conversation", "concurrent", "cluster")
BANDWIDTH_PASSES = 9
GEN_SEGMENT = 16  # generated tokens between two probe passes (limit_fraction_paired)
PROMPT_RUNS = 3
# measure what the server runs: its scheduler's prompt chunk and KV dtype
PROMPT_CHUNK = DEFAULT_MAX_BATCH_TOKENS
KV_DTYPE = np.float16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", help="GGUF model (default: cached synthetic 2B-4T)")
    add_runtime_arguments(parser)
    parser.add_argument(
        "--prompt-tokens", type=int, default=128, help="prompt length measured (default: 128)"
    )
    parser.add_argument(
        "--gen-tokens", type=int, default=64, help="tokens generated and timed (default: 64)"
    )
    parser.add_argument(
        "--bandwidth-mb", type=int, default=1024, help="bandwidth probe size (default: 1024)"
    )
    parser.add_argument(
        "--llama-cpp",
        choices=("auto", "off"),
        default="auto",
        help="auto: also run llama.cpp on the same file when llama-cpp-python is installed",
    )
    parser.add_argument(
        "--json-schema",
        help="also measure decoding constrained to this JSON schema (JSON text or @file)",
    )
    parser.add_argument(
        "--pairs", type=int, default=3, help="--json-schema: unconstrained/constrained pairs"
    )
    parser.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="kernels",
        help="kernels: this process's prompt/generation speed; conversation, concurrent: "
        "the serving goals against the real server; cluster: replicas behind nginx, "
        "affinity vs round-robin and nginx's added latency (default: kernels)",
    )
    serving = _serving_module()
    if serving is not None:
        serving.add_scenario_arguments(parser)


def _serving_module() -> ModuleType | None:
    """``bitserve.bench_serving`` (the server scenarios), or None when it is not there."""
    try:
        return importlib.import_module("bitserve.bench_serving")
    except ModuleNotFoundError as exc:
        if exc.name != "bitserve.bench_serving":
            raise  # a dependency of the module is missing: say so, do not hide it
        return None


@dataclass(frozen=True, slots=True)
class Timings:
    load_s: float
    prompt_tok_s: float  # median over PROMPT_RUNS prompts
    prompt_first_tok_s: float  # the first of them (one-time allocations included)
    gen_tok_s: float
    # (tokens/s, probe GB/s before, probe GB/s after) per generation segment; empty
    # without a probe
    gen_segments: tuple[tuple[float, float, float], ...] = ()


def cache_dir() -> Path:
    return Path(os.environ.get("BITSERVE_CACHE") or Path.home() / ".cache" / "bitserve")


def synthetic_model() -> Path:
    """The cached synthetic 2B-4T model, written on first use (the writer renames
    atomically, so an interrupted run never leaves a half file under the final name)."""
    path = cache_dir() / SYNTHETIC_NAME
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"bench: writing {path} (2B-4T shapes, ~1.2 GB, about a minute)", file=sys.stderr)
        start = time.perf_counter()
        write_synthetic_model(path, SHAPE_2B4T, seed=0)
        print(f"bench: written in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return path


class BandwidthProbe:
    """Read bandwidth in GB/s over a buffer far larger than the caches, allocated once
    (``megabytes``) and resident for the whole bench: ``measure`` before the model loads,
    then one pass around each generation segment (``limit_fraction_paired``)."""

    def __init__(self, backend: NativeBackend, megabytes: int) -> None:
        self.backend = backend
        self.buf = np.ones(megabytes << 20, dtype=np.uint8)  # ones: every page really allocated

    def one_pass(self) -> float:
        start = time.perf_counter()
        self.backend.read_memory(self.buf)
        return self.buf.nbytes / (time.perf_counter() - start) / 1e9

    def measure(self) -> tuple[float, float, float]:
        """``(median, min, max)`` of several passes after a warm-up one. One pass can read
        far above or below the rest (another process's traffic, a lucky turbo state), so
        the median is what ``limit_fraction`` uses."""
        self.one_pass()
        rates = [self.one_pass() for _ in range(BANDWIDTH_PASSES)]
        return float(np.median(rates)), min(rates), max(rates)


def peak_rss_mb(probe: BandwidthProbe | None) -> float:
    """The process's peak resident memory so far less the probe's buffer, which is resident
    from before the model loads to the end (the bench's memory, not the model's). Taken
    before llama.cpp runs: it loads its own copy of the model into this process."""
    probe_mb = probe.buf.nbytes / 2**20 if probe is not None else 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - probe_mb


def bytes_per_token(model: BitNetModel, backend: Any) -> int:
    """Bytes one generated token reads: every ternary weight as its kernel reads it (codes and
    block scales) plus the head as the head kernel reads it."""
    codes = sum(
        w.nbytes
        for layer in model.weights.layers
        for w in (getattr(layer, f.name) for f in dataclasses.fields(layer))
        if isinstance(w, TernaryWeight)
    )
    head = model.weights.head
    if backend.int8_head(head):
        return int(codes + head.n_rows * head.dim + 4 * head.n_rows)
    return int(codes + head.nbytes)


def bench_prompt(vocab_size: int, n_prompt: int) -> np.ndarray:
    """The prompt both bitserve and llama.cpp run: random ids, the same every run."""
    return np.random.default_rng(0).integers(0, vocab_size, size=n_prompt)


def time_model(
    path: Path,
    backend: Any,
    n_prompt: int,
    n_gen: int,
    probe: Callable[[], float] | None = None,
    mmap: bool = False,
) -> tuple[BitNetModel, Timings]:
    """Load (to the first token), then ``PROMPT_RUNS`` prompts of ``n_prompt`` tokens (each
    on a fresh cache; the first one also pays one-time allocations) and ``n_gen`` greedy
    steps after the last one, in segments of ``GEN_SEGMENT`` with a ``probe`` pass (GB/s)
    before each and after the last (its time is not the generation's)."""
    start = time.perf_counter()
    model = BitNetModel.load(path, backend=backend, mmap=mmap)
    if n_prompt + n_gen + 1 > model.config.context_length:
        model.close()
        raise ValueError(
            f"--prompt-tokens {n_prompt} and --gen-tokens {n_gen} do not fit the model's "
            f"context of {model.config.context_length} tokens"
        )
    head = model.weights.head
    if isinstance(backend, NativeBackend) and backend.int8_head(head):
        assert head.data is not None
        backend.prepare_head(head.data)
    model.forward([0], model.new_cache(max_seq=8))  # first token: weights paged in
    load_s = time.perf_counter() - start
    prompt = bench_prompt(model.config.vocab_size, n_prompt)
    prompt_s = []
    for _ in range(PROMPT_RUNS):
        cache = model.new_cache(max_seq=n_prompt + n_gen + 1, dtype=KV_DTYPE)
        start = time.perf_counter()
        for lo in range(0, n_prompt, PROMPT_CHUNK):  # chunked as the server does
            logits = model.forward(prompt[lo : lo + PROMPT_CHUNK], cache)
        prompt_s.append(time.perf_counter() - start)
    gen_s, segments, before = 0.0, [], probe() if probe else 0.0
    for lo in range(0, n_gen, GEN_SEGMENT):
        n = min(GEN_SEGMENT, n_gen - lo)
        start = time.perf_counter()
        for _ in range(n):
            logits = model.forward([int(np.argmax(logits))], cache)
        took = time.perf_counter() - start
        gen_s += took
        if probe:
            after = probe()
            segments.append((n / took, before, after))
            before = after
    rates = [n_prompt / s for s in prompt_s]
    timings = Timings(load_s, float(np.median(rates)), rates[0], n_gen / gen_s, tuple(segments))
    return model, timings


def paired_fraction(
    segments: Sequence[tuple[float, float, float]], per_token: int
) -> tuple[float, float, float]:
    """``(median, min, max)`` over generation segments of the segment's bytes per second
    over the mean bandwidth of the probe passes around it."""
    fractions = [rate * per_token / ((a + b) / 2 * 1e9) for rate, a, b in segments]
    return float(np.median(fractions)), min(fractions), max(fractions)


def paired_bandwidth(segments: Sequence[tuple[float, float, float]]) -> float:
    """The median over generation segments of the bandwidth (GB/s) around each: the phase
    the machine was in while ``limit_fraction_paired`` was measured."""
    return float(np.median([(a + b) / 2 for _, a, b in segments]))


def run(args: argparse.Namespace) -> int:
    try:
        options = runtime_options(args)  # checked before any (slow) work
        for flag in ("prompt_tokens", "gen_tokens", "bandwidth_mb", "pairs"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
        if args.json_schema:
            args.schema = _load_schema(args.json_schema)
        if args.model and not Path(args.model).is_file():  # before the bandwidth probe
            raise ValueError(f"model file {args.model!r} does not exist")
    except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    if args.scenario != "kernels":
        serving = _serving_module()
        if serving is None:
            print(
                f"bench: scenario {args.scenario!r} needs bitserve.bench_serving, "
                "which is not installed in this build",
                file=sys.stderr,
            )
            return 2
        return int(serving.run_scenario(args))
    try:
        return run_kernels(args, options)
    except (OSError, ValueError) as exc:  # a missing or malformed file, a context too short
        print(f"bench: {exc}", file=sys.stderr)
        return 2


def run_kernels(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """The default scenario: load, prompt and generation speed in this process."""
    path = Path(args.model) if args.model else synthetic_model()
    threads = options["threads"]
    backend = get_backend(options["kernel"], threads=threads, head=options["head"])
    native = backend if isinstance(backend, NativeBackend) else _probe_backend(threads)
    probe = BandwidthProbe(native, args.bandwidth_mb) if native else None
    nan = float("nan")
    bandwidth, bw_min, bw_max = probe.measure() if probe else (nan,) * 3
    one_pass = probe.one_pass if probe else None
    model, t = time_model(
        path, backend, args.prompt_tokens, args.gen_tokens, one_pass, options["mmap"]
    )
    per_token = bytes_per_token(model, backend)
    constraint = None
    if args.json_schema:
        constraint = constrained_bench(model, args.schema, args.gen_tokens, args.pairs)
    rss_mb = peak_rss_mb(probe)  # bitserve's runs done; llama.cpp's copy not yet loaded
    file_per_token = bench_llama.file_bytes_per_token(model.gguf)
    llama = None
    if args.llama_cpp == "auto" and bench_llama.available():
        prompt = bench_prompt(model.config.vocab_size, args.prompt_tokens)
        gguf = model.gguf
        llama = bench_llama.compare(gguf, path, threads, prompt, args.gen_tokens, PROMPT_RUNS)
    model.close()
    ceiling = bandwidth * 1e9 / min(per_token, file_per_token)
    paired = (
        paired_fraction(t.gen_segments, min(per_token, file_per_token))
        if t.gen_segments
        else (nan,) * 3
    )
    paired_bw = paired_bandwidth(t.gen_segments) if t.gen_segments else nan
    result = {
        "prompt_tok_s": round(t.prompt_tok_s, 2),
        "prompt_first_tok_s": round(t.prompt_first_tok_s, 2),
        "gen_tok_s": round(t.gen_tok_s, 2),
        "bandwidth_gb_s": round(bandwidth, 2),
        "bandwidth_range_gb_s": [round(bw_min, 2), round(bw_max, 2)],
        "bytes_per_token": per_token,
        "file_bytes_per_token": file_per_token,
        "gen_ceiling_tok_s": round(ceiling, 2),
        "limit_fraction": round(t.gen_tok_s / ceiling, 3),
        "limit_fraction_paired": round(paired[0], 3),
        "limit_fraction_paired_range": [round(paired[1], 3), round(paired[2], 3)],
        "paired_bandwidth_gb_s": round(paired_bw, 2),
        "load_s": round(t.load_s, 2),
        "peak_rss_mb": round(rss_mb, 1),
        "threads": threads,
        "kernel": backend.name,
        "head": args.head,
        "weights": "mmap" if args.mmap else "resident",
        "prompt_tokens": args.prompt_tokens,
        "context_tokens": args.prompt_tokens + args.gen_tokens,
        "kv_dtype": np.dtype(KV_DTYPE).name,
        "gen_tokens": args.gen_tokens,
        "model": str(path),
        "baseline": {
            "gen": round(t.gen_tok_s / BASELINE_GEN_TOK_S, 3),
            "prompt": round(t.prompt_tok_s / BASELINE_PROMPT_TOK_S, 3),
        },
        "machine": {"cpu": platform.processor() or platform.machine(), "load": os.getloadavg()},
    }
    if llama is not None:
        result["llama_cpp"] = llama
        if "gen_tok_s" in llama:
            llama["limit_fraction"] = round(llama["gen_tok_s"] / ceiling, 3)
            result["vs_llama_cpp"] = {
                "gen": round(t.gen_tok_s / llama["gen_tok_s"], 3),
                "prompt": round(t.prompt_tok_s / llama["prompt_tok_s"], 3),
            }
    if constraint is not None:
        result["constraint"] = constraint
    print(json.dumps(result))
    return 0


def _load_schema(value: str) -> Any:
    """``--json-schema``'s JSON text, or the file after ``@``; a ``ValueError`` saying which
    for bad JSON, an ``OSError`` for a missing file."""
    text = Path(value[1:]).read_text("utf-8") if value.startswith("@") else value
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--json-schema: not JSON: {exc}") from exc


def _bench_tokenizer(model: BitNetModel) -> Tokenizer:
    """The file's tokenizer; the synthetic 2B-4T file has none: the LLaMA-3-shaped one."""
    if "tokenizer.ggml.tokens" in model.gguf.metadata:
        return Tokenizer.from_gguf(model.gguf)
    return Tokenizer.from_metadata(llama3_tokenizer_metadata(model.config.vocab_size))


def _decode(
    model: BitNetModel, sampler: Sampler, n_gen: int, restart: Callable[[], None]
) -> tuple[float, float]:
    """``n_gen`` steps of forward + ``sampler.step`` after a short prompt: (tokens/s,
    sampler µs per token). ``restart`` begins a new document once the grammar is done."""
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, 1000, size=16)]
    cache = model.new_cache(max_seq=len(prompt) + n_gen + 1, dtype=KV_DTYPE)
    logits = model.forward(prompt, cache)
    tokens, sample_s = list(prompt), 0.0
    start = time.perf_counter()
    for _ in range(n_gen):
        t0 = time.perf_counter()
        if sampler.constraint is not None and sampler.constraint.is_finished:
            restart()
        token = sampler.step(logits, tokens, want_logprobs=False).token_id
        sample_s += time.perf_counter() - t0
        tokens.append(token)
        logits = model.forward([token], cache)
    elapsed = time.perf_counter() - start
    return n_gen / elapsed, sample_s / n_gen * 1e6


def constrained_bench(model: BitNetModel, schema: Any, n_gen: int, pairs: int) -> dict[str, Any]:
    """Decoding speed without and with the schema's mask, in alternating pairs."""
    tokenizer = _bench_tokenizer(model)
    start = time.perf_counter()
    compiler = ConstraintCompiler(tokenizer, tokenizer.stop_ids)
    compiler.json_object()  # builds the library's tokenizer
    init_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = compiler.json_schema(schema)
    compile_s = time.perf_counter() - start
    vocab = model.config.vocab_size
    plain, masked, ratios = [], [], []
    for i in range(pairs):
        results = {}
        for constrained in (False, True) if i % 2 == 0 else (True, False):
            params = SamplingParams(seed=i, constraint=compiled if constrained else None)
            sampler = Sampler.create(params, vocab)

            def restart(s: Sampler = sampler) -> None:
                s.constraint = compiled.start()

            results[constrained] = _decode(model, sampler, n_gen, restart)
        plain.append(results[False])
        masked.append(results[True])
        ratios.append(results[True][0] / results[False][0])
    return {
        "gen_tok_s": round(float(np.median([r for r, _ in masked])), 2),
        "gen_unconstrained_tok_s": round(float(np.median([r for r, _ in plain])), 2),
        "ratio": round(float(np.median(ratios)), 3),
        "pair_ratios": [round(r, 3) for r in ratios],
        "sample_us": round(float(np.median([u for _, u in masked])), 1),
        "sample_unconstrained_us": round(float(np.median([u for _, u in plain])), 1),
        "tokenizer_init_s": round(init_s, 3),
        "compile_ms": round(compile_s * 1000, 2),
        "pairs": pairs,
    }


def _probe_backend(threads: int) -> NativeBackend | None:
    """The numpy backend has no bandwidth probe: borrow the native one when it is built."""
    native = available_kernels()
    return NativeBackend(native[0], threads=threads) if native else None
