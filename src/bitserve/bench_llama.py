"""llama.cpp on the same file, in the same `bitserve bench` run (through ``llama-cpp-python``,
when it is installed: never a dependency of bitserve or of its tests).

The same thread count, prompt tokens and generated tokens as bitserve's run; prompts are
``PROMPT_RUNS`` fresh evaluations (median; fewer when they take over ``SLOW_PROMPT_S``),
generation greedy from the last logits, one token per ``decode`` like bitserve's decode
loop. llama.cpp cannot read every file bitserve serves (bitnet.cpp's I2_S type 36 and its
``bitnet-b1.58`` architecture are not upstream's): then the result says why instead of
giving figures.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bitserve.gguf.constants import GGMLType
from bitserve.gguf.reader import GGUFFile

# A type without a SIMD kernel in llama.cpp (Q2_0 on x86 runs its scalar C) can take minutes
# per prompt: after this many seconds of prompts, the median is over the runs done so far.
SLOW_PROMPT_S = 60.0
# what upstream llama.cpp cannot load, by type and architecture (its own names)
UNREADABLE_TYPES = (GGMLType.I2_S,)
UNKNOWN_ARCHS = ("bitnet-b1.58", "bitnet-25")


def available() -> bool:
    """True when ``llama_cpp`` (llama-cpp-python) is importable."""
    try:
        importlib.import_module("llama_cpp")
    except ImportError:
        return False
    return True


def why_unreadable(gguf: GGUFFile) -> str | None:
    """Why upstream llama.cpp cannot load this file, or ``None``."""
    arch = gguf.get("general.architecture")
    if arch in UNKNOWN_ARCHS:
        return f"llama.cpp has no architecture {arch!r} (bitnet.cpp's name)"
    types = {t.ggml_type for t in gguf.tensors.values()}
    bad = [t.name for t in UNREADABLE_TYPES if t in types]
    if bad:
        return f"llama.cpp cannot read tensor type {', '.join(bad)} (bitnet.cpp's)"
    if GGMLType.Q2_0 in types and gguf.q2_0_block != 64:
        return (
            "llama.cpp reads Q2_0 with blocks of 64; this file's blocks are of 128 (PrismML's fork)"
        )
    return None


def file_bytes_per_token(gguf: GGUFFile) -> int:
    """Bytes a token reads in the file's own types: every tensor as stored, except the token
    embedding when an untied ``output.weight`` exists (a lookup reads a few rows of it)."""
    skip = {"token_embd.weight"} if "output.weight" in gguf.tensors else set()
    return sum(t.nbytes for name, t in gguf.tensors.items() if name not in skip)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """llama.cpp logs to file descriptor 2 from C; keep the bench's stderr readable."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def run(path: Path, threads: int, prompt: np.ndarray, n_gen: int, runs: int) -> dict[str, Any]:
    """llama.cpp's load, prompt and generation speed on ``path`` (or ``{"error": ...}``)."""
    llama_cpp: Any = importlib.import_module("llama_cpp")
    start = time.perf_counter()
    try:
        with _quiet_stderr():
            llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=len(prompt) + n_gen + 16,
                n_batch=max(512, len(prompt)),
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
            )
    except (ValueError, RuntimeError) as exc:
        return {"error": f"llama.cpp could not load the file: {exc}"}
    try:
        load_s = time.perf_counter() - start
        tokens = [int(t) for t in prompt]
        prompt_s: list[float] = []
        while len(prompt_s) < runs and sum(prompt_s) < SLOW_PROMPT_S:
            llm.reset()
            start = time.perf_counter()
            llm.eval(tokens)
            prompt_s.append(time.perf_counter() - start)
        n_vocab = llm.n_vocab()
        start = time.perf_counter()
        for _ in range(n_gen):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
            llm.eval([int(np.argmax(logits))])
        gen_s = time.perf_counter() - start
    finally:
        llm.close()
    rates = [len(tokens) / s for s in prompt_s]
    return {
        "version": str(getattr(llama_cpp, "__version__", "?")),
        "load_s": round(load_s, 2),
        "prompt_tok_s": round(float(np.median(rates)), 2),
        "gen_tok_s": round(n_gen / gen_s, 2),
    }


def compare(
    gguf: GGUFFile, path: Path, threads: int, prompt: np.ndarray, n_gen: int, runs: int
) -> dict[str, Any]:
    """:func:`run` when llama.cpp can read the file, else the reason; ``llama.cpp`` prints to
    stderr only when it fails to load."""
    reason = why_unreadable(gguf)
    if reason is not None:
        return {"error": reason}
    print("bench: running llama.cpp on the same file", file=sys.stderr)
    return run(path, threads, prompt, n_gen, runs)
