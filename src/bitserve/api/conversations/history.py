"""Fitting a conversation's history into the context, in time linear in its length.

Every stored message carries its content's token count (``StoredMessage.tokens``); with
the chat template's cost of a message (:meth:`ServedModel.message_overhead`, measured once
per role) that gives each message's share of the prompt without encoding anything. The
oldest turns are dropped by those estimates, the kept messages are encoded once, and only
if the estimate fell short is more dropped (by the measured excess) and the prompt encoded
again — never once per dropped turn, which made a 1,000-message conversation cost seconds
of re-encoding per chat.

Stable cuts: a prompt must start the same way turn after turn for the prefix cache to
serve it, and dropping just enough each turn would move its start every turn (a whole
context of prompt processing each time). So the cut lands on a grid instead: the
smallest multiple of half the context (in tokens counted from the conversation's start)
that leaves room. History only grows at its end, so these points never move: the start
of the prompt changes once per half context of conversation, and the turns between reuse
the cache (llama.cpp's context shift also discards half). A finer grid would keep more
history but compute the whole kept history again more often: per turn, about as many
tokens as the history holds divided by the turns between two cuts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from bitserve.api.chat.serving import PromptOptions, encode_chat
from bitserve.api.served import ServedModel

CUT_GRID_FRACTION = 2  # cuts land on multiples of ctx_size / 2 tokens


@dataclass(frozen=True, slots=True)
class FittedPrompt:
    """The messages kept (history then the new ones), how many history messages were
    left out, and the prompt's token ids."""

    messages: list[dict[str, Any]]
    dropped: int
    prompt: list[int]


def droppable_turns(history: Sequence[dict[str, Any]]) -> list[list[int]]:
    """The history's droppable turns, oldest first, as message indices: each non-system
    message with the assistant replies and tool results right after it (history never
    starts with an orphan reply, nor with a tool result without its call). System
    messages are in none: they are never dropped."""
    turns: list[list[int]] = []
    for i, message in enumerate(history):
        if message["role"] == "system":
            continue
        follows = message["role"] in ("assistant", "tool")
        if follows and turns and turns[-1][-1] == i - 1:
            turns[-1].append(i)
        else:
            turns.append([i])
    return turns


def _cut(dropped_costs: list[int], need: int, grid: int) -> int:
    """How many turns to drop: the fewest whose estimated tokens reach ``need`` rounded up
    to the ``grid`` (all of them if even that is not enough)."""
    if need <= 0:
        return 0
    target = -(-need // grid) * grid
    for k, cost in enumerate(dropped_costs):
        if cost >= target:
            return k
    return len(dropped_costs) - 1


def _costs(
    served: ServedModel, messages: Sequence[dict[str, Any]], tokens: Sequence[int]
) -> list[int]:
    """Each message's estimated share of the prompt: its content, its template, and one
    token of slack (text encoded after the template's can merge or split differently),
    so that the first encoding nearly always fits."""
    return [
        n + served.message_overhead(m["role"]) + 1 for m, n in zip(messages, tokens, strict=True)
    ]


def fit_history(
    served: ServedModel,
    history: Sequence[dict[str, Any]],
    history_tokens: Sequence[int],
    new: Sequence[dict[str, Any]],
    new_tokens: Sequence[int],
    max_tokens: int,
    options: PromptOptions | None = None,
) -> FittedPrompt:
    """``history + new``, leaving out the oldest history turns (never a system message,
    never the new messages) until the prompt leaves room for ``max_tokens``, or nothing
    droppable is left (the caller's context check then answers). ``*_tokens`` are the
    messages' content token counts; ``options``: the request's tools and template kwargs
    (their cost is not estimated: the measured excess covers it)."""
    budget = served.ctx_size - max_tokens
    costs = _costs(served, history, history_tokens)
    turns = droppable_turns(history)
    dropped = [0, *accumulate(sum(costs[i] for i in turn) for turn in turns)]  # by k turns
    estimate = sum(costs) + sum(_costs(served, new, new_tokens)) + served.message_overhead(None)
    grid = max(1, served.ctx_size // CUT_GRID_FRACTION)
    need = estimate - budget
    k = _cut(dropped, need, grid)
    while True:
        left_out = {i for turn in turns[:k] for i in turn}
        messages = [m for i, m in enumerate(history) if i not in left_out] + list(new)
        prompt = encode_chat(served, messages, "messages", options)
        excess = len(prompt) - budget
        if excess <= 0 or k == len(turns):
            return FittedPrompt(messages, len(left_out), prompt)
        # the estimate fell short: cover the measured excess too, on the same grid, and
        # drop at least one more turn
        need = max(need, dropped[k]) + excess
        k = max(k + 1, _cut(dropped, need, grid))
