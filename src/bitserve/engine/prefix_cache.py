"""``PrefixCache``: keys/values of finished sequences, reused by later requests.

When a sequence finishes, its cache (the KV of prompt + generated tokens that went through
the model) is put here with its tokens and its scope (who may reuse it: the API's key
fingerprint, so that a key never learns what another key sent). A new request of the same
scope takes the entry sharing the longest common token prefix with its prompt: the
entry's cache is handed over (truncated to the common prefix, no copy) and the request
computes only the rest. The entry leaves the prefix cache while in use and comes back,
longer, when that request finishes — so a conversation's next turn finds its whole
history. A second request wanting an entry that is in use finds nothing (it computes from
scratch); entries are never shared. A request that shares less than half of an entry
(another conversation with the same chat-template header, say) gets a copy of the common
positions instead: the entry stays for the conversation it belongs to.

Memory: a cache holds memory only for the positions it has written (see
:class:`~bitserve.model.kv_cache.KVCache`), so a next turn appends to an entry in place,
never copying it. The entries together hold at most ``budget_bytes``; the least recently
used are evicted (their caches released at once) to make room. With a ``spill``
(:class:`~bitserve.engine.kv_spill.KVSpill`) an entry evicted for room is written to disk
instead, and :meth:`PrefixCache.take` also considers the entries on disk: the longer
common prefix wins (RAM on a tie), a disk entry is read back into a cache from
``make_cache``. Reuse never changes outputs: every operation of the forward pass is per
token, so a token's keys/values are the same whether they were computed with the rest of
the prompt, in an earlier request, or read back from disk (bit for bit).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np

from bitserve.model.kv_cache import KVCache

if TYPE_CHECKING:  # kv_spill imports this module
    from bitserve.engine.kv_spill import KVSpill

# a disk entry is read only for at least this many tokens: fewer cost less to recompute
MIN_DISK_TOKENS = 32


@dataclass(slots=True, eq=False)
class PrefixEntry:
    """``tokens [n]`` (int64) whose keys/values are in ``cache`` (``cache.length == n``),
    reusable by requests of ``scope`` only."""

    tokens: np.ndarray
    cache: KVCache
    last_used: int
    scope: str = ""


@dataclass(slots=True)
class PrefixCacheStats:
    """Counters since start: ``lookups`` (requests that asked), ``hits`` (got tokens),
    ``cached_tokens`` (tokens reused in total), ``evictions`` (entries evicted for room),
    ``spilled`` (entries handed to the disk spill: evicted, or too big for RAM),
    ``disk_hits`` (hits read from disk, counted in ``hits`` too)."""

    lookups: int = 0
    hits: int = 0
    cached_tokens: int = 0
    evictions: int = 0
    spilled: int = 0
    disk_hits: int = 0


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two 1-D int arrays."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


class _HasTokens(Protocol):
    @property
    def tokens(self) -> np.ndarray: ...

    @property
    def scope(self) -> str: ...


E = TypeVar("E", bound=_HasTokens)


def is_prefix(tokens: np.ndarray, ids: np.ndarray) -> bool:
    """Whether ``tokens`` are the start of ``ids`` (their last and middle tokens are
    checked first: a comparison or two for most entries, which are not)."""
    n = len(tokens)
    if n == 0:
        return True
    if n > len(ids) or tokens[n - 1] != ids[n - 1] or tokens[n // 2] != ids[n // 2]:
        return False
    return common_prefix(tokens, ids) == n


def longest_prefix(entries: Iterable[E], ids: np.ndarray, scope: str) -> tuple[E | None, int]:
    """The entry of ``scope`` whose ``tokens`` share the longest prefix with ``ids``, and
    its length (the first such entry on a tie; ``(None, 0)`` if none shares a token).

    Only an entry that also holds the token after the best prefix so far can beat it,
    and one comparison tells: most entries (other conversations past a shared chat
    header) cost that, not a whole prefix comparison, so a lookup among thousands of
    entries stays a few milliseconds of the engine thread."""
    best, best_len = None, 0
    for entry in entries:
        tokens = entry.tokens
        if entry.scope != scope or best_len >= min(len(tokens), len(ids)):
            continue
        if tokens[best_len] != ids[best_len]:
            continue
        n = common_prefix(tokens, ids)
        if n > best_len:
            best, best_len = entry, n
    return best, best_len


@dataclass(slots=True)
class PrefixCache:
    """LRU store of KV caches keyed by their tokens, within ``budget_bytes`` (0: off).

    Invariant: ``nbytes == sum(e.cache.nbytes for e in entries) <= budget_bytes``.
    ``spill`` (optional) takes the entries evicted for room; ``make_cache()`` makes the
    empty caches disk entries are read into (without it, disk entries are not used).
    Only the engine thread uses it.
    """

    budget_bytes: int
    spill: KVSpill | None = None
    make_cache: Callable[[], KVCache] | None = None
    entries: list[PrefixEntry] = field(default_factory=list)
    stats: PrefixCacheStats = field(default_factory=PrefixCacheStats)
    _clock: int = 0
    _nbytes: int = 0  # the entries' total, kept as they come and go (read every step)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def __len__(self) -> int:
        return len(self.entries)

    def _best(self, ids: np.ndarray, scope: str) -> tuple[PrefixEntry | None, int]:
        """The RAM entry of ``scope`` with the longest common prefix with ``ids``, and its
        length (the first such entry on a tie; ``(None, 0)`` if none shares a token)."""
        return longest_prefix(self.entries, ids, scope)

    def cached_length(self, tokens: list[int] | np.ndarray, scope: str = "") -> int:
        """The longest common prefix of ``tokens`` with an entry of ``scope`` in RAM
        (nothing moves)."""
        return self._best(np.asarray(tokens, dtype=np.int64), scope)[1]

    def take(
        self,
        tokens: list[int] | np.ndarray,
        record: bool = True,
        ram_only: bool = False,
        scope: str = "",
        keep_diverging: bool = False,
    ) -> KVCache | None:
        """The cache of the entry (in RAM or on disk) sharing the longest prefix with
        ``tokens``, removed from the store and truncated to that prefix — at most
        ``len(tokens) - 1`` positions, so the last token is always computed (its logits are
        needed). RAM wins ties. ``None`` on a miss. ``record``: count it in ``stats``
        (requests' lookups; not the engine's own prefill ahead); ``ram_only``: never read
        the disk; ``scope``: only entries put with the same scope are considered;
        ``keep_diverging``: an entry that goes on past the shared prefix is copied, never
        truncated (a guess at a next prompt must not cost the prompt that exists)."""
        stats = self.stats if record else PrefixCacheStats()
        stats.lookups += 1
        ids = np.asarray(tokens, dtype=np.int64)
        limit = len(ids) - 1
        best, best_len = self._best(ids, scope)
        best_len = min(best_len, limit)
        cache = None if ram_only else self._take_from_disk(ids, best_len, limit, scope)
        if cache is not None:
            stats.disk_hits += 1
        elif best is None or best_len == 0:
            return None
        elif 2 * best_len < len(best.tokens) or (keep_diverging and best_len < len(best.tokens)):
            cache = best.cache.copy(best_len)  # a shared header: the entry stays for its owner
        else:
            self._remove(best)
            best.cache.truncate(best_len)
            cache = best.cache
        stats.hits += 1
        stats.cached_tokens += cache.length
        return cache

    def _take_from_disk(
        self, ids: np.ndarray, ram_len: int, limit: int, scope: str
    ) -> KVCache | None:
        """The disk entry's cache (of ``scope``) if it shares more than ``ram_len`` tokens
        (at most ``limit``) with ``ids``; None otherwise or if its file proves unreadable."""
        if self.spill is None or self.make_cache is None:
            return None
        entry, n = self.spill.best(ids, scope)
        n = min(n, limit)
        if entry is None or n <= ram_len or n < MIN_DISK_TOKENS:
            return None
        return self.spill.load(entry, n, self.make_cache, keep=2 * n < len(entry.tokens))

    def put(self, tokens: list[int] | np.ndarray, cache: KVCache, scope: str = "") -> None:
        """Keep ``cache`` holding the KV of ``tokens[:cache.length]`` for ``scope``; entries
        of that scope that are a prefix of it are dropped (it supersedes them), then the LRU
        ones go (to the spill, if any) until everything fits. A cache that cannot fit on
        its own goes straight to the spill, or is released at once."""
        ids = np.asarray(tokens, dtype=np.int64)[: cache.length]
        if cache.length == 0 or (self.budget_bytes <= 0 and self.spill is None):
            cache.release()
            return
        cache.trim()  # positions written past its tokens (a stop string) hold memory
        if cache.nbytes > self.budget_bytes:
            self._spill_or_release(ids, cache, scope)
            return
        for entry in self.entries[:]:
            if entry.scope == scope and is_prefix(entry.tokens, ids):
                self._drop(entry)
        if self.spill is not None:
            self.spill.discard_prefixes_of(ids, scope)
        self._clock += 1
        self.entries.append(PrefixEntry(ids, cache, self._clock, scope))
        self._nbytes += cache.nbytes
        self._evict(self.budget_bytes)

    def _remove(self, entry: PrefixEntry) -> None:
        """``entry`` leaves the store (its cache unchanged since it came: same bytes)."""
        self.entries.remove(entry)
        self._nbytes -= entry.cache.nbytes

    def _evict(self, budget: int) -> None:
        while self._nbytes > budget and self.entries:
            oldest = min(self.entries, key=lambda e: e.last_used)
            self._remove(oldest)
            self._spill_or_release(oldest.tokens, oldest.cache, oldest.scope)
            self.stats.evictions += 1

    def _spill_or_release(self, ids: np.ndarray, cache: KVCache, scope: str) -> None:
        """Hand ``cache`` to the spill (which releases it once written) or release it."""
        if self.spill is not None and self.spill.save(ids, cache, scope):
            self.stats.spilled += 1
        elif self.spill is None:
            cache.release()

    def _drop(self, entry: PrefixEntry) -> None:
        self._remove(entry)
        entry.cache.release()

    def spill_all(self) -> None:
        """Move every RAM entry to the spill, oldest first (so that the spill's budget
        keeps the newest), and wait for the files; without a spill, release them."""
        for entry in sorted(self.entries, key=lambda e: e.last_used):
            self._remove(entry)
            self._spill_or_release(entry.tokens, entry.cache, entry.scope)
        if self.spill is not None:
            self.spill.flush()

    def clear(self) -> None:
        """Release every entry."""
        for entry in list(self.entries):
            self._drop(entry)
