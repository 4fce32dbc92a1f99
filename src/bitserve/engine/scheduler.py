"""``Scheduler``: continuous batching of many sequences through one model (nano-vllm style).

Two queues: ``waiting`` (FCFS, not started) and ``running`` (at most ``max_batch``, each
with a KV cache). Every :meth:`Scheduler.step`:

1. drops cancelled sequences that have no token in flight (every waiting one, and running
   ones still in their prompt), freeing their KV at once (to the prefix cache if it has one);
2. admits waiting sequences in arrival order while there is room, each starting from the
   longest cached prefix of its prompt (``PrefixCache.take``) or an empty cache;
3. plans a batch within ``max_batch_tokens``: one token for every decoding sequence, then
   prompt chunks for prefilling ones in admission order — a long prompt is split over
   several steps and never stalls the streams already decoding;
4. runs the batch as one ``model.forward_batch`` and feeds each sequence whose last token
   was computed its logits (``Sequence.on_logits``); finished ones leave at once.

Because every sequence gets its token each step and admission is FCFS, no request starves.
A sequence's tokens do not depend on the batch it ran in (``forward_batch`` is per row).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from bitserve.engine.prefix_cache import PrefixCache
from bitserve.engine.sequence import Sequence
from bitserve.engine.types import TokenEvent
from bitserve.model.bitnet import BatchItem
from bitserve.model.kv_cache import KVCache, KVMemory

DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_BATCH_TOKENS = 256


class BatchModel(Protocol):
    """What the scheduler needs from ``BitNetModel``."""

    def new_cache(
        self,
        max_seq: int | None = None,
        dtype: np.dtype | type = np.float32,
        memory: KVMemory | None = None,
    ) -> KVCache: ...

    def forward_batch(self, items: list[BatchItem]) -> list[np.ndarray | None]: ...


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """``max_batch`` sequences run at once; a step computes at most ``max_batch_tokens``
    tokens (``>= max_batch``, so every decode fits); KV caches hold ``kv_dtype``."""

    max_batch: int = DEFAULT_MAX_BATCH
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    kv_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_batch_tokens < self.max_batch:
            raise ValueError(
                f"max_batch_tokens ({self.max_batch_tokens}) must be >= max_batch "
                f"({self.max_batch})"
            )


@dataclass(slots=True)
class SchedulerStats:
    """Counters since start: ``steps`` (forward passes), ``prompt_tokens`` (prompt tokens
    computed, cached ones excluded), ``cached_tokens`` (prompt tokens reused from the
    prefix cache), ``decode_tokens`` (generated tokens fed back), ``last_batch_size`` and
    ``last_batch_tokens`` (sequences and tokens of the latest step), ``prefilled_ahead``
    (tokens computed by :meth:`Scheduler.extend_cached`)."""

    steps: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    decode_tokens: int = 0
    last_batch_size: int = 0
    last_batch_tokens: int = 0
    prefilled_ahead: int = 0


@dataclass(slots=True)
class StepOutput:
    """One step's results: ``events`` in batch order; ``finished`` sequences (done,
    cancelled or dropped: all have left and freed their KV); ``failed`` ones with the
    exception of their forward pass."""

    events: list[tuple[Sequence, TokenEvent]] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)
    failed: list[tuple[Sequence, Exception]] = field(default_factory=list)


class Scheduler:
    """Steps the sequences given to :meth:`add` through ``model``; single-threaded."""

    def __init__(
        self,
        model: BatchModel,
        config: SchedulerConfig | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.model = model
        self.config = config or SchedulerConfig()
        self.prefix_cache = prefix_cache
        self.memory = KVMemory()  # every cache this scheduler made (prefix cache included)
        self.stats = SchedulerStats()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._kv_dtype = np.dtype(self.config.kv_dtype)

    def add(self, seq: Sequence) -> None:
        """Queue ``seq`` (validated, ``max_tokens >= 1``) behind the waiting ones."""
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> StepOutput:
        """Admit, run one batched forward pass, sample; see the module docstring."""
        out = StepOutput(finished=self._drop_cancelled())
        self._admit(out)
        plan = self._plan()
        if not plan:
            return out
        items = [self._item(seq, n) for seq, n in plan]
        try:
            logits = self.model.forward_batch(items)
        except Exception as exc:  # the batch's state is unknown: fail its sequences
            for seq, _ in plan:
                self._leave(seq, keep_kv=False)
                out.failed.append((seq, exc))
            return out
        self._record(plan)
        for (seq, n), row in zip(plan, logits, strict=True):
            seq.num_computed_tokens += n
            if row is None:
                continue
            try:
                event = seq.on_logits(row)
            except Exception as exc:  # its logits (NaN), sampling or constraint: it alone
                self._leave(seq, keep_kv=False)
                out.failed.append((seq, exc))
                continue
            out.events.append((seq, event))
            if seq.is_finished:
                self._leave(seq)
                out.finished.append(seq)
        return out

    def cached_length(self, tokens: list[int], scope: str = "") -> int:
        """How many of ``tokens`` the prefix cache holds in RAM for ``scope`` (0: no cache)."""
        return 0 if self.prefix_cache is None else self.prefix_cache.cached_length(tokens, scope)

    def extend_cached(
        self, tokens: list[int], max_new: int, scope: str = "", keep_diverging: bool = False
    ) -> int:
        """Prefill ahead: when all but 1..``max_new`` of ``tokens`` are cached (a
        conversation's reply has just finished, and ``tokens`` add the chat template's
        start of its next turn), compute the rest into that prefix-cache entry now, so the
        next turn's first token does not wait for them. The keys/values are those the next
        request would compute (every token's are independent of the batch and of T).
        Returns the tokens computed (0: nothing to do, or not worth it). ``keep_diverging``:
        an entry that goes on past the shared prefix is copied, not cut (the start of a
        prompt guessed ahead must not cost the conversation the prompt it has)."""
        if self.prefix_cache is None:
            return 0
        cached = self.prefix_cache.cached_length(tokens, scope)
        if not 1 <= len(tokens) - cached <= max_new:
            return 0
        # the entry (or a copy of its first `cached` positions when they are a shared
        # header): either way `cached` positions, as RAM holds them
        cache = self.prefix_cache.take(
            tokens, record=False, ram_only=True, scope=scope, keep_diverging=keep_diverging
        )
        if cache is None:
            return 0
        if cache.free < len(tokens) - cached:  # past the context: put it back untouched
            self.prefix_cache.put(tokens[:cached], cache, scope)
            return 0
        try:
            self.model.forward_batch([BatchItem(np.asarray(tokens[cached:]), cache, False)])
        except Exception:
            cache.release()
            raise
        self.stats.prefilled_ahead += len(tokens) - cached
        self.prefix_cache.put(tokens, cache, scope)
        return len(tokens) - cached

    def abort_all(self, keep_kv: bool = True) -> list[Sequence]:
        """Remove every sequence at once (shutdown, or a step that failed as a whole:
        ``keep_kv=False`` frees their KV instead of handing it to the prefix cache)."""
        gone = list(self.waiting) + self.running
        self.waiting.clear()
        for seq in list(self.running):
            self._leave(seq, keep_kv)
        return gone

    # -- the parts of a step -----------------------------------------------------------------

    def _drop_cancelled(self) -> list[Sequence]:
        """Cancelled running sequences with no token in flight (still in their prompt)
        leave now, freeing their KV; decoding ones stay for this step: their next event
        carries finish_reason "cancelled". Cancelled waiting ones (no KV yet) leave now
        too, wherever they are in the line: a request whose client left must not hold a
        place in the bounded queue (``max_queue``) while a live one is refused."""
        dropped = [seq for seq in self.waiting if seq.cancelled]
        if dropped:
            self.waiting = deque(seq for seq in self.waiting if not seq.cancelled)
        for seq in [s for s in self.running if s.cancelled and s.is_prefill]:
            self._leave(seq)
            dropped.append(seq)
        return dropped

    def _admit(self, out: StepOutput) -> None:
        """Waiting sequences start (FCFS) while there is room; cancelled ones met on the
        way leave without starting (``out.finished``), and one whose cache cannot be had
        (out of memory or address space, an unreadable spill) fails alone (``out.failed``)."""
        while self.waiting and len(self.running) < self.config.max_batch:
            seq = self.waiting.popleft()
            if seq.cancelled:
                out.finished.append(seq)
                continue
            try:
                cache = self._cached(seq)
                if cache is None:
                    cache = self.model.new_cache(None, self._kv_dtype, self.memory)
            except Exception as exc:
                out.failed.append((seq, exc))
                continue
            seq.cache = cache
            seq.num_computed_tokens = seq.num_cached_tokens = cache.length
            self.stats.cached_tokens += cache.length
            self.running.append(seq)

    def _cached(self, seq: Sequence) -> KVCache | None:
        """The prefix cache's entry for ``seq`` (of its request's scope), if any."""
        if self.prefix_cache is None:
            return None
        return self.prefix_cache.take(seq.tokens, scope=seq.request.cache_scope)

    def _plan(self) -> list[tuple[Sequence, int]]:
        """``(sequence, tokens to compute)`` pairs: decodes first, then prompt chunks."""
        budget = self.config.max_batch_tokens
        plan = [(s, 1) for s in self.running if not s.is_prefill]
        budget -= len(plan)
        for seq in self.running:
            if budget <= 0:
                break
            if seq.is_prefill:
                n = min(seq.num_pending_tokens, budget)
                plan.append((seq, n))
                budget -= n
        return plan

    @staticmethod
    def _item(seq: Sequence, n: int) -> BatchItem:
        start = seq.num_computed_tokens
        assert seq.cache is not None and seq.cache.length == start
        want_logits = start + n == len(seq.tokens)
        return BatchItem(seq.tokens[start : start + n], seq.cache, want_logits)

    def _record(self, plan: list[tuple[Sequence, int]]) -> None:
        self.stats.steps += 1
        self.stats.last_batch_size = len(plan)
        self.stats.last_batch_tokens = sum(n for _, n in plan)
        for seq, n in plan:
            if seq.is_prefill:
                self.stats.prompt_tokens += n
            else:
                self.stats.decode_tokens += n

    def _leave(self, seq: Sequence, keep_kv: bool = True) -> None:
        """``seq`` leaves the running set; its KV goes to the prefix cache or is freed."""
        self.running.remove(seq)
        cache, seq.cache = seq.cache, None
        if cache is None:
            return
        if keep_kv and self.prefix_cache is not None:
            cache.truncate(min(cache.length, seq.num_computed_tokens))
            self.prefix_cache.put(seq.tokens, cache, seq.request.cache_scope)
        else:
            cache.release()
