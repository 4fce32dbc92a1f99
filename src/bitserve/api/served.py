"""``ServedModel``: the one model the server answers with, as the API layer sees it.

It bundles the loaded model (tokenizer and chat format for the HTTP edge), the
``EngineLoop`` that owns the model's thread, the effective context size and the names the
model answers to. ``create_app`` receives one; its lifespan starts and stops the loop.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bitserve import __version__
from bitserve.api.errors import (
    ContextLengthExceededError,
    InputTooLongError,
    InvalidParameterError,
    ModelNotFoundError,
)
from bitserve.api.settings import DEFAULT_CACHE_DISK_MB, DEFAULT_CACHE_RAM_MB, default_cache_dir
from bitserve.engine.constraint import ConstraintCompiler
from bitserve.engine.generate import Generator
from bitserve.engine.kv_spill import KVSpill, spill_key
from bitserve.engine.loader import LoadedModel
from bitserve.engine.loop import EngineLoop
from bitserve.engine.prefix_cache import PrefixCache
from bitserve.engine.scheduler import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BATCH_TOKENS,
    Scheduler,
    SchedulerConfig,
)

log = logging.getLogger(__name__)


PROBE = "x"  # a message content of one token, to measure what the template adds


@dataclass(slots=True)
class ServedModel:
    """``ctx_size`` ≤ the model's context length; ``aliases`` are extra accepted names.
    ``max_input_chars`` bounds the text of one request's messages or prompt (0: what the
    context could hold at most, :func:`context_chars`)."""

    loaded: LoadedModel
    engine: EngineLoop[Generator]
    ctx_size: int
    aliases: tuple[str, ...] = ()
    created: int = 0  # unix seconds, for /v1/models
    max_input_chars: int = 0
    fingerprint: str = field(default="", init=False)
    constraints: ConstraintCompiler = field(init=False)  # structured output, tool calls
    _overheads: dict[str | None, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha256(f"{self.loaded.path}|{__version__}".encode()).hexdigest()
        self.fingerprint = f"fp_{digest[:10]}"
        tokenizer = self.loaded.tokenizer
        self.constraints = ConstraintCompiler(tokenizer, tokenizer.stop_ids)
        if self.max_input_chars <= 0:
            self.max_input_chars = context_chars(self.loaded, self.ctx_size)

    @classmethod
    def create(
        cls,
        loaded: LoadedModel,
        max_queue: int,
        ctx_size: int | None = None,
        aliases: tuple[str, ...] = (),
        created: int = 0,
        max_batch: int = DEFAULT_MAX_BATCH,
        cache_ram_mb: int = DEFAULT_CACHE_RAM_MB,
        cache_disk_mb: int = DEFAULT_CACHE_DISK_MB,
        cache_dir: Path | None = None,
        max_input_chars: int = 0,
    ) -> ServedModel:
        """Wrap ``loaded`` with a (not yet started) engine loop that batches up to
        ``max_batch`` sequences and keeps up to ``cache_ram_mb`` MB of prefix KV in RAM and
        ``cache_disk_mb`` MB on disk under ``cache_dir`` (default: ``default_cache_dir()``;
        raises ``OSError`` if it cannot be created)."""
        model_ctx = int(loaded.model.config.context_length)
        if ctx_size is not None and ctx_size > model_ctx:
            log.warning(
                "--ctx-size %d exceeds the model's %d; using %d", ctx_size, model_ctx, model_ctx
            )
        effective = min(ctx_size or model_ctx, model_ctx)
        config = SchedulerConfig(max_batch, max(max_batch, DEFAULT_MAX_BATCH_TOKENS))
        spill = None
        if cache_disk_mb > 0:
            spill = _open_spill(loaded, config, cache_dir or default_cache_dir(), cache_disk_mb)
        prefix = None
        if cache_ram_mb > 0 or spill is not None:
            prefix = PrefixCache(cache_ram_mb * 2**20, spill)
        scheduler = Scheduler(loaded.model, config, prefix)
        if prefix is not None:
            dtype, memory, model = np.dtype(config.kv_dtype), scheduler.memory, loaded.model
            prefix.make_cache = lambda: model.new_cache(None, dtype, memory)
        generator = Generator(loaded.model, loaded.tokenizer)
        engine = EngineLoop(generator, max_queue=max_queue, scheduler=scheduler)
        return cls(loaded, engine, effective, aliases, created, max_input_chars)

    @property
    def prefix_cache(self) -> PrefixCache | None:
        scheduler = self.engine.scheduler
        return scheduler.prefix_cache if scheduler is not None else None

    def close(self) -> None:
        """After the engine stopped: move the prefix cache's RAM entries to disk (if it
        spills), so that conversations still hit after a restart, and stop the writer."""
        prefix = self.prefix_cache
        if prefix is None or prefix.spill is None:
            return
        if any(t.name == "bitserve-engine" and t.is_alive() for t in threading.enumerate()):
            log.warning("the engine is still running: prefix cache not written to disk")
            return
        if prefix.entries:
            log.info("writing %.0f MB of prefix cache to disk", prefix.nbytes / 2**20)
        prefix.spill_all()
        prefix.spill.close()

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def names(self) -> tuple[str, ...]:
        """Every name accepted in a request's ``model`` field: the model id (its
        ``general.name``), the file stem, then the aliases."""
        return tuple(dict.fromkeys((self.name, self.loaded.path.stem, *self.aliases)))

    def resolve(self, requested: str | None, extra: tuple[str, ...] = ()) -> str:
        """The model id answering ``requested`` (None: the default); 404 for unknown names."""
        if requested is None or requested in self.names or requested in extra:
            return self.name
        raise ModelNotFoundError(requested)

    @property
    def generator(self) -> Generator:
        return self.engine.generator

    @property
    def stop_token_ids(self) -> set[int]:
        return set(self.loaded.tokenizer.stop_ids)

    def check_fits(self, prompt_tokens: int, param: str) -> int:
        """Room left for generation; 400 ``context_length_exceeded`` if there is none."""
        room = self.ctx_size - prompt_tokens
        if room < 1:
            raise ContextLengthExceededError(prompt_tokens, self.ctx_size, param)
        return room

    def check_queue_room(self, generations: int, param: str) -> None:
        """400 for a request needing more generations at once than the queue can ever
        hold (``--max-queue``): a 503 would tell the client to retry what never fits."""
        if generations > self.engine.max_queue:
            raise InvalidParameterError(
                f"{param}: this request needs {generations} generations at once, and the "
                f"server queues at most {self.engine.max_queue} (--max-queue)",
                param,
            )

    def check_input_chars(self, chars: int, param: str) -> None:
        """400 ``input_too_long`` for more text than :attr:`max_input_chars`, before any
        of it is tokenized."""
        if chars > self.max_input_chars:
            raise InputTooLongError(chars, self.max_input_chars, param)

    def message_overhead(self, role: str | None) -> int:
        """About how many tokens the chat template adds around one message of ``role``
        (``None``: around the whole prompt: BOS, the generation prompt). Measured once per
        role by encoding probes; an estimate (history fitting checks the real prompt)."""
        cached = self._overheads.get(role)
        if cached is None:
            cached = self._overheads[role] = max(0, _template_overhead(self.loaded, role))
        return cached

    def token_piece(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text for logprobs (control tokens by name) and its raw bytes."""
        raw = self.loaded.tokenizer.token_bytes(token_id)
        return self.generator.token_text(token_id), list(raw)

    def describe(self) -> dict[str, Any]:
        cfg = self.loaded.model.config
        return {
            "n_ctx": self.ctx_size,
            "n_ctx_train": int(cfg.training_context),
            "n_vocab": int(cfg.vocab_size),
            "n_params_layers": int(cfg.n_layers),
            "arch": cfg.arch,
            "demo": self.loaded.is_demo,
        }  # never the file's path: clients have no business knowing the server's disk


def context_chars(loaded: LoadedModel, ctx_size: int) -> int:
    """Characters that can never fit in ``ctx_size`` tokens: no token covers more bytes
    than the vocabulary's longest, and a character is at least one byte."""
    tok = loaded.tokenizer
    longest = max(len(tok.token_bytes(i)) for i in range(tok.vocab_size))
    return ctx_size * max(1, longest)


def _template_overhead(loaded: LoadedModel, role: str | None) -> int:
    """Tokens a message of ``role`` adds to a prompt beyond its content (see
    :meth:`ServedModel.message_overhead`); 0 if the template refuses the probes."""
    chat = loaded.chat
    probe = len(loaded.tokenizer.encode(PROBE))

    def message(r: str) -> dict[str, str]:
        return {"role": r, "content": PROBE}

    try:
        if role is None:
            whole = chat.encode([message("user")])
            return len(whole) - probe - _template_overhead(loaded, "user")
        before = {"assistant": ["user"], "user": ["user", "assistant"]}.get(role, [role])
        with_it = chat.encode([*map(message, before), message(role)], add_generation_prompt=False)
        without = chat.encode(list(map(message, before)), add_generation_prompt=False)
    except ValueError:
        return 0
    return len(with_it) - len(without) - probe


def _open_spill(loaded: LoadedModel, config: SchedulerConfig, directory: Path, mb: int) -> KVSpill:
    """The spill for ``loaded``'s KV files: a subfolder named by the model file and layout."""
    cfg = loaded.model.config
    layout = (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)
    key = spill_key(loaded.path, config.kv_dtype, layout)
    spill = KVSpill(directory, mb * 2**20, key)
    if len(spill):
        log.info(
            "%d spilled KV entries (%.0f MB) in %s",
            len(spill),
            spill.nbytes / 2**20,
            spill.directory,
        )
    return spill
