"""Load a model file (or the built-in demo model) with its tokenizer and chat format."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from bitserve.kernels import get_backend
from bitserve.kernels.native import NativeBackend
from bitserve.model.bitnet import BitNetModel
from bitserve.tokenizer import ChatFormatter, Tokenizer

HEADS = ("f16", "int8")  # LM head weights: as in the file, or int8 made at load


class ModelFileNotFoundError(FileNotFoundError):
    """The model path does not name a readable file. ``str()`` is a one-line message."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"model file {str(path)!r} {problem}")
        self.path = path


@dataclass(slots=True)
class LoadedModel:
    """A model ready to serve. ``name`` is the file stem (what the API lists as the model
    id); ``is_demo`` is True for the built-in random-weight demo model; ``load_s`` is the
    wall time the load took, in seconds."""

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


def load_model(
    path: str | Path | None,
    threads: int | None = None,
    kernel: str | None = None,
    head: str = "f16",
) -> LoadedModel:
    """Open ``path`` (``None``: the demo model) on the kernel ``kernel`` with ``threads``
    threads (``None``: the defaults of ``bitserve.kernels.get_backend``). ``head="int8"``
    quantizes the tied head at load (half its memory traffic per token; native kernels
    only, slightly different logits), so the first token does not pay for it.

    Raises :class:`ModelFileNotFoundError` for a missing file, ``GGUFError`` (a
    ``ValueError``) for a malformed one, ``ValueError`` for an unknown kernel.
    """
    start = time.perf_counter()
    resolved, is_demo = resolve_model_path(path)
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    backend = get_backend(kernel, threads, head)
    model = BitNetModel.load(resolved, backend=backend)
    try:
        if head == "int8" and isinstance(backend, NativeBackend):
            backend.prepare_head(model.weights.head)
        tokenizer = Tokenizer.from_gguf(model.gguf)
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
        name=resolved.stem,
        load_s=time.perf_counter() - start,
    )
