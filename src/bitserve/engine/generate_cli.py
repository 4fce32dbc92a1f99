"""`bitserve generate`: load a model, stream one generation to stdout, report speed.

Generated text goes to stdout as it comes; the demo-model notice and the one-line summary
(token counts, prompt and generation speed, finish reason) go to stderr, so stdout can be
piped. Bad input (missing model, out-of-range setting) is one error line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from bitserve.engine.loader import add_runtime_arguments
from bitserve.engine.types import GenerationRequest, SamplingParams, TokenEvent

if TYPE_CHECKING:
    from bitserve.engine.loader import LoadedModel

EXIT_USAGE = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-m",
        "--model",
        metavar="GGUF",
        # "%(default).0s" renders as nothing: it stops argparse from appending "(default: None)"
        help="model file (default: the built-in demo model with random weights)%(default).0s",
    )
    p.add_argument(
        "-p", "--prompt", required=True, help="prompt text; '-' reads it from stdin%(default).0s"
    )
    p.add_argument("--chat", action="store_true", help="send the prompt as a user chat turn")
    p.add_argument("--system", help="system message (implies --chat; default: none)%(default).0s")
    p.add_argument("-n", "--max-tokens", type=int, default=100, help="tokens to generate at most")
    p.add_argument(
        "--temperature", type=float, default=0.7, help="sampling temperature; 0 means greedy"
    )
    p.add_argument("--top-k", type=int, default=40, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top one")
    p.add_argument(
        "--repeat-penalty", type=float, default=1.0, help="llama.cpp repeat penalty (1: off)"
    )
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI presence penalty")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI frequency penalty")
    p.add_argument(
        "--seed",
        type=int,
        help="random seed (default: none, so every run differs)%(default).0s",
    )
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        help="stop string, not printed; repeatable (default: none)%(default).0s",
    )
    add_runtime_arguments(p)


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repeat_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
    )


@dataclass(slots=True)
class StreamStats:
    """Counts and times of one streamed generation (seconds from ``perf_counter``)."""

    prompt_tokens: int
    start: float
    load_s: float = 0.0
    first_token: float | None = None
    end: float | None = None
    generated: int = 0
    finish_reason: str = "length"

    def summary(self) -> str:
        end = self.end if self.end is not None else time.perf_counter()
        first = self.first_token if self.first_token is not None else end
        prompt_rate = _rate(self.prompt_tokens, first - self.start)
        gen_rate = _rate(self.generated - 1, end - first) if self.generated > 1 else 0.0
        return (
            f"load: {self.load_s:.2f} s | "
            f"prompt: {self.prompt_tokens} tokens, {prompt_rate:.1f} tok/s | "
            f"generated: {self.generated} tokens, {gen_rate:.1f} tok/s | "
            f"finish: {self.finish_reason} | peak RSS: {_peak_rss_mb():.0f} MB"
        )


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else 0.0


def stream(events: Iterable[TokenEvent], out: TextIO, stats: StreamStats) -> None:
    """Write each event's text to ``out`` as it comes; fill ``stats``.

    The prompt time runs to the first event (prompt forward + first sampling); the
    generation rate counts the tokens after the first one.
    """
    wrote_text = ""
    for event in events:
        if stats.first_token is None:
            stats.first_token = time.perf_counter()
        stats.generated += 1
        if event.text:
            out.write(event.text)
            out.flush()
            wrote_text = event.text
        if event.finish_reason is not None:
            stats.finish_reason = event.finish_reason
    stats.end = time.perf_counter()
    if wrote_text and not wrote_text.endswith("\n"):
        out.write("\n")
        out.flush()


def _read_prompt(prompt: str) -> str:
    return sys.stdin.read() if prompt == "-" else prompt


def _fail(message: str) -> int:
    print(f"bitserve generate: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def run(args: argparse.Namespace) -> int:
    """Validate, load, encode, stream, summarise. Returns the exit code."""
    from bitserve.engine.generate import Generator
    from bitserve.engine.sequence import ModelOutputError

    try:
        sampling = _checked_sampling(args)
        loaded = _load(args)
    except (ValueError, FileNotFoundError) as e:  # GGUFError and SamplingParamError included
        return _fail(str(e))
    try:
        if loaded.is_demo:
            from bitserve.model.demo import DEMO_NOTICE

            print(DEMO_NOTICE, file=sys.stderr, flush=True)
        try:
            req = _build_request(loaded, args, sampling)
            stats = StreamStats(
                len(req.prompt_tokens), start=time.perf_counter(), load_s=loaded.load_s
            )
            events = Generator(loaded.model, loaded.tokenizer).generate(req)
        except ValueError as e:  # ContextLengthError, SamplingParamError, bad chat messages
            return _fail(str(e))
        _configure_stdout()
        try:
            stream(events, sys.stdout, stats)
        except ModelOutputError as e:  # non-finite logits: a corrupt file, said in one line
            print(f"bitserve generate: error: {e}", file=sys.stderr)
            return 1
        print(stats.summary(), file=sys.stderr, flush=True)
        return 0
    finally:
        loaded.close()


def _checked_sampling(args: argparse.Namespace) -> SamplingParams:
    """The sampling settings, range-checked before the (slow) model load."""
    from bitserve.engine.sampling import SamplingParamError, validate_params

    sampling = sampling_from_args(args)
    validate_params(sampling)
    if args.max_tokens < 0:
        raise SamplingParamError("max_tokens", f"must be 0 or more, got {args.max_tokens}")
    return sampling


def _load(args: argparse.Namespace) -> LoadedModel:
    from bitserve.engine.loader import load_model, runtime_options

    return load_model(args.model, **runtime_options(args))


def _build_request(
    loaded: LoadedModel, args: argparse.Namespace, sampling: SamplingParams
) -> GenerationRequest:
    """Encode the prompt (raw text with BOS, or as a chat turn) into a request."""
    text = _read_prompt(args.prompt)
    if args.chat or args.system is not None:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt = loaded.chat.encode([*messages, {"role": "user", "content": text}])
    else:
        tok = loaded.tokenizer
        prompt = tok.encode(text, add_bos=tok.add_bos)
    return GenerationRequest(
        prompt_tokens=prompt,
        sampling=sampling,
        max_tokens=args.max_tokens,
        stop=list(args.stop),
        stop_token_ids=set(loaded.tokenizer.stop_ids),
    )


def _configure_stdout() -> None:
    """Random-weight models emit any character: never die on an unencodable one."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="replace")
