"""Load a model file (or the built-in demo model) with its tokenizer and chat format."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitserve.gguf.reader import GGUFError, GGUFFile
from bitserve.kernels import get_backend
from bitserve.kernels.native import NativeBackend, default_threads
from bitserve.model.bitnet import BitNetModel
from bitserve.tokenizer import ChatFormatter, Tokenizer

HEADS = ("f16", "int8")  # LM head weights: as in the file, or int8 made at load
KERNEL_CHOICES = ("auto", "numpy", "scalar", "avx2", "avx512")


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """``-t/--threads``, ``--kernel``, ``--head``, ``--mmap``: how a command runs the model
    (the same for generate, serve and bench). :func:`runtime_options` turns them into
    arguments of :func:`load_model`."""
    p.add_argument(
        "-t",
        "--threads",
        type=int,
        default=default_threads(),
        help="kernel threads (default: the physical cores available, %(default)s here)",
    )
    p.add_argument(
        "--kernel",
        choices=KERNEL_CHOICES,
        default="auto",
        help="matmul kernels; auto: the best this CPU has (default: %(default)s)",
    )
    p.add_argument(
        "--head",
        choices=HEADS,
        default="f16",
        help="LM head: the file's F16 weights, or int8 made at load (faster, logits differ)",
    )
    p.add_argument(
        "--mmap",
        action="store_true",
        help="serve the weights from the file's memory map, shared with other processes "
        "that map it (several replicas on one host), instead of a private copy in huge "
        "pages (the default: a few %% faster generation, one copy per process)",
    )


def runtime_options(args: argparse.Namespace) -> dict[str, Any]:
    """``threads``, ``kernel`` (``None`` for auto), ``head`` and ``mmap`` for :func:`load_model`."""
    if args.threads < 1:
        raise ValueError(f"threads: must be 1 or more, got {args.threads}")
    kernel = None if args.kernel == "auto" else args.kernel
    return {"threads": args.threads, "kernel": kernel, "head": args.head, "mmap": args.mmap}


class ModelFileNotFoundError(FileNotFoundError):
    """The model path does not name a readable file. ``str()`` is a one-line message."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"model file {str(path)!r} {problem}")
        self.path = path


@dataclass(slots=True)
class LoadedModel:
    """A model ready to serve. ``name`` is what the API lists as the model id: the file's
    ``general.name`` (so clients can tell one family from another), else the file stem
    (the demo model is always ``demo-vN``); ``is_demo`` is True for the built-in
    random-weight demo model; ``load_s`` is the wall time the load took, in seconds."""

    model: BitNetModel
    tokenizer: Tokenizer
    chat: ChatFormatter
    is_demo: bool
    path: Path
    name: str
    load_s: float

    def close(self) -> None:
        self.model.close()


def resolve_model_path(path: str | Path | None) -> tuple[Path, bool]:
    """``(path, is_demo)``; ``None`` means the demo model (created on first use)."""
    if path is None:
        from bitserve.model.demo import demo_model_path  # writes the file on first use

        return Path(demo_model_path()), True
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelFileNotFoundError(p, "does not exist")
    if not p.is_file():
        raise ModelFileNotFoundError(p, "is not a file")
    return p, False


def model_name(gguf: GGUFFile, path: Path, is_demo: bool = False) -> str:
    """The id the API serves a model under: ``general.name`` (whitespace collapsed,
    control characters dropped), else the file stem; the demo model keeps its file stem."""
    name = gguf.get("general.name")
    if isinstance(name, str):  # control characters (NUL, ESC...) never reach a terminal
        name = "".join(c for c in name if c.isprintable() or c.isspace())
    if is_demo or not isinstance(name, str) or not name.strip():
        return path.stem
    return " ".join(name.split())


def load_model(
    path: str | Path | None,
    threads: int | None = None,
    kernel: str | None = None,
    head: str = "f16",
    mmap: bool = False,
) -> LoadedModel:
    """Open ``path`` (``None``: the demo model) on the kernel ``kernel`` with ``threads``
    threads (``None``: the defaults of ``bitserve.kernels.get_backend``). ``head="int8"``
    quantizes the tied head at load (half its memory traffic per token; native kernels
    only, slightly different logits), so the first token does not pay for it. ``mmap``:
    the weights stay views of the file's map (see ``BitNetModel.load``).

    Raises :class:`ModelFileNotFoundError` for a missing file, ``GGUFError`` (a
    ``ValueError``) for a malformed one, ``ValueError`` for an unknown kernel.
    """
    start = time.perf_counter()
    resolved, is_demo = resolve_model_path(path)
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    backend = get_backend(kernel, threads, head)
    model = BitNetModel.load(resolved, backend=backend, mmap=mmap)
    try:
        matrix = model.weights.head
        if head == "int8" and isinstance(backend, NativeBackend) and matrix.kind == "f16":
            assert matrix.data is not None
            backend.prepare_head(matrix.data)
        tokenizer = Tokenizer.from_gguf(model.gguf)
        if tokenizer.vocab_size < model.config.vocab_size:  # ids it could not read back
            raise GGUFError(
                resolved,
                f"the tokenizer has {tokenizer.vocab_size} tokens (tokenizer.ggml.tokens) but "
                f"the model {model.config.vocab_size}: it could not read every id the model "
                "generates",
            )  # more is fine (added tokens past the embedding; a prompt holding one is a 400)
        chat = ChatFormatter.from_gguf(model.gguf, tokenizer)
    except BaseException:
        model.close()
        raise
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        chat=chat,
        is_demo=is_demo,
        path=resolved,
        name=model_name(model.gguf, resolved, is_demo),
        load_s=time.perf_counter() - start,
    )
