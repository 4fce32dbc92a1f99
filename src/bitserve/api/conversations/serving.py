"""Conversation logic: the store behind the routes, history in front of each chat turn.

A chat turn holds the conversation's lock from reading the history until the reply is
stored (or abandoned), so concurrent chats to one conversation run one after another and
never interleave: an ``asyncio`` lock within this process, and the store's
:meth:`~bitserve.store.ConversationStore.begin_turn` across processes (PostgreSQL holds
the conversation's row lock for the turn). Once the engine has taken the request, the
user message(s) are stored with a stand-in for the reply (an empty assistant message,
``finish_reason: "interrupted"``); the complete reply replaces it, in one transaction with
them. A reply that is cancelled or fails, or a server killed mid-reply, leaves the stand-in:
the user's message is never lost, and the reply never reads as complete.

Each reply is stored with the token ids the model generated (:func:`reply_token_ids`), and
the history hands them to the chat formatter, which uses them verbatim: the next turn's
prompt then starts with exactly the tokens the engine already processed (its prompt, the
reply, the template's end of turn), so the prefix cache serves the whole history and only
the new message is computed. Re-encoding the reply's text would often give other ids.

Once a turn is stored, the template's start of the next turn (the reply's last token, its
end of turn, the user header: every token before the next message's text) is queued for
the engine to compute into the conversation's cache entry while the user reads the reply
(:func:`next_turn_prefix`, ``EngineLoop.prefill_ahead``), so a follow-up's first token
waits only for the message itself.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from bitserve.api.chat.response import ChoiceResult
from bitserve.api.chat.serving import (
    ChatPlan,
    PromptOptions,
    encode_chat,
    input_chars,
    plan_chat,
    prompt_options,
    respond_chat,
    wire_messages,
)
from bitserve.api.chat.tools import wire_tool_calls
from bitserve.api.conversations.history import fit_history
from bitserve.api.conversations.protocol import (
    ConversationChatRequest,
    ConversationMessage,
    ConversationObject,
)
from bitserve.api.errors import InvalidParameterError
from bitserve.api.served import ServedModel
from bitserve.api.streaming import RequestGuard
from bitserve.engine.loop import QueueFullError
from bitserve.engine.types import TokenEvent
from bitserve.store import (
    INTERRUPTED,
    Conversation,
    ConversationStore,
    NewMessage,
    StoredMessage,
    ToolCall,
)
from bitserve.store import Turn as StoreTurn
from bitserve.store.base import (
    MAX_METADATA_KEY_CHARS,
    MAX_METADATA_PAIRS,
    MAX_METADATA_VALUE_CHARS,
)

MAX_LIST_LIMIT = 100
NEXT_MESSAGE_MARGIN = 32  # tokens a next message may exceed this one by, for the cut ahead
PREFILL_AHEAD_CHUNK = 64  # a turn's start is ~6 tokens (LLaMA 3); a moved cut, all kept history


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Mark a shielded task's exception read: the request awaiting it reports it, and one
    whose client left has nothing to report it to (its turn is simply not stored)."""
    if not task.cancelled():
        task.exception()


class ConversationLocks:
    """One ``asyncio.Lock`` per conversation id, dropped when nobody holds or waits. At
    most ``max_waiting`` chats wait for one conversation (``--max-queue``): a client that
    queues more gets ``QueueFullError`` (503 + ``Retry-After``) like the engine's queue,
    instead of piling up requests that hold a connection each."""

    def __init__(self, max_waiting: int = 16, seconds_per_turn: Callable[[], float] = lambda: 1.0):
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self.max_waiting = max_waiting
        self.seconds_per_turn = seconds_per_turn

    async def acquire(self, key: str) -> Callable[[], None]:
        """Wait for ``key``'s lock; returns an idempotent release function."""
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        if lock.locked() and users - 1 >= self.max_waiting:  # users: the holder + waiters
            retry = math.ceil(self.seconds_per_turn() * users)
            raise QueueFullError(self.max_waiting, max(1, min(retry, 60)))
        self._locks[key] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._forget(key)
            raise
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                lock.release()
                self._forget(key)

        return release

    def _forget(self, key: str) -> None:
        lock, users = self._locks[key]
        if users <= 1:
            del self._locks[key]
        else:
            self._locks[key] = (lock, users - 1)


def check_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    metadata = metadata or {}
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidParameterError(
            f"metadata: at most {MAX_METADATA_PAIRS} pairs, got {len(metadata)}", "metadata"
        )
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY_CHARS or len(value) > MAX_METADATA_VALUE_CHARS:
            raise InvalidParameterError(
                f"metadata: keys are at most {MAX_METADATA_KEY_CHARS} characters and values "
                f"at most {MAX_METADATA_VALUE_CHARS} (key {key[:20]!r})",
                "metadata",
            )
    return metadata


def conversation_object(conv: Conversation) -> dict[str, Any]:
    return ConversationObject(
        id=conv.id, conversation_id=conv.id, created_at=int(conv.created_at), metadata=conv.metadata
    ).model_dump(mode="json")


def message_object(m: StoredMessage) -> dict[str, Any]:
    return ConversationMessage.model_validate(
        {
            "role": m.role,
            "content": m.content,
            "created_at": int(m.created_at),
            "tokens": m.tokens,
            "prompt_tokens": m.prompt_tokens,
            "completion_tokens": m.completion_tokens,
            "finish_reason": m.finish_reason,
            "tool_calls": wire_tool_calls(m.tool_calls) or None,
            "tool_call_id": m.tool_call_id,
            "reasoning_content": m.reasoning_content,
        }
    ).model_dump(mode="json")


def reply_token_ids(events: list[TokenEvent], stop_token_ids: set[int]) -> tuple[int, ...] | None:
    """The ids to store with a reply: every generated token but a final stop token (the
    chat template writes its own end of turn, and the engine never fed the stop token to
    the model). None when a stop *string* ended the reply: its text was cut inside the
    last tokens, so the ids would say more than the stored text. (A reply its grammar
    completed keeps every id: its text is all of theirs.)"""
    ids = [e.token_id for e in events]
    last = events[-1] if events else None
    if last is not None and last.stop_string is not None:
        return None
    if last is not None and last.finish_reason == "stop" and last.token_id in stop_token_ids:
        ids.pop()
    return tuple(ids)


def next_turn_prefix(
    served: ServedModel, messages: list[dict[str, Any]], reply: NewMessage
) -> list[int] | None:
    """The token ids every next turn's prompt starts with, after ``messages`` (this turn's
    prompt) and ``reply``: the prompts of a next message "x" and "y" agree up to the
    message's text, which the formatter encodes apart from the template. None if the
    format rejects it."""
    said = _history_message(reply)
    role = "tool" if reply.tool_calls else "user"  # what answers a call is its result
    try:
        a = served.loaded.chat.encode([*messages, said, {"role": role, "content": "x"}])
        b = served.loaded.chat.encode([*messages, said, {"role": role, "content": "y"}])
    except ValueError:
        return None
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return a[:n]


def next_turn_history(served: ServedModel, turn: Turn, reply: NewMessage) -> list[dict[str, Any]]:
    """The history messages before ``reply`` that the next turn will keep if its message
    is like this turn's (up to ``NEXT_MESSAGE_MARGIN`` tokens longer) and it asks for as
    many tokens: :func:`fit_history` of the whole history with ``reply`` and this turn's
    last message again as the probe, counted with the margin.

    Where the cut moves at the next turn (once per half context) its prompt starts anew,
    and computing that ahead spares the turn a whole kept history of prompt processing.
    The margin foresees a cut a turn or two early rather than late: a cut's points never
    move (the grid), so a history computed early is still the next cut's, and a turn that
    does not cut yet computes only its template's few tokens itself."""
    new = turn.messages[len(turn.messages) - len(turn.new) :]
    said = _history_message(reply)
    history = [*turn.history, *new, said]
    tokens = [*(m.tokens for m in turn.held.messages), *(m.tokens for m in turn.new), reply.tokens]
    like = turn.new[-1]
    probe = {"role": "tool" if reply.tool_calls else "user", "content": like.content}
    try:
        size = like.tokens + NEXT_MESSAGE_MARGIN
        kept = fit_history(served, history, tokens, [probe], [size], turn.max_new).messages
    except InvalidParameterError:  # the format rejects it: the prefix says so again
        return [*turn.messages]
    return kept[:-2]  # without the reply and the probe


def _history_message(m: StoredMessage | NewMessage) -> dict[str, Any]:
    """A stored message as the chat formatter takes it: replies with their generated
    ``token_ids``, calls in OpenAI's shape, tool results' ids, reasoning."""
    message: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.token_ids is not None:
        message["token_ids"] = list(m.token_ids)
    if m.tool_calls:
        message["tool_calls"] = wire_tool_calls(m.tool_calls)
    if m.tool_call_id is not None:
        message["tool_call_id"] = m.tool_call_id
    if m.reasoning_content is not None:
        message["reasoning_content"] = m.reasoning_content
    return message


def _new_message(m: dict[str, Any], tokens: int) -> NewMessage:
    calls = tuple(
        ToolCall(c["id"], c["function"]["name"], c["function"]["arguments"])
        for c in m.get("tool_calls", ())
    )
    return NewMessage(
        m["role"], m["content"], tokens, tool_calls=calls,
        tool_call_id=m.get("tool_call_id"), reasoning_content=m.get("reasoning_content"),
    )  # fmt: skip


@dataclass(slots=True)
class Turn:
    """A chat turn ready to generate: its plan, the prompt's messages (history kept and
    the new ones), the new messages as they will be stored, and the store's turn that
    holds the conversation until they are."""

    plan: ChatPlan
    messages: list[dict[str, Any]]
    new: list[NewMessage]
    held: StoreTurn
    history: list[dict[str, Any]]  # every stored message, as fit_history took them
    max_new: int


class ConversationService:
    """The conversation routes' logic for one app: ``store`` + the served model."""

    def __init__(self, store: ConversationStore, served: ServedModel) -> None:
        self.store = store
        self.served = served
        engine = served.engine
        self.locks = ConversationLocks(engine.max_queue, engine.stats.mean_request_seconds)
        self._background: set[asyncio.Task[None]] = set()

    def count_tokens(self, text: str) -> int:
        return len(self.served.loaded.tokenizer.encode(text))

    def new_messages(self, messages: list[dict[str, Any]]) -> list[NewMessage]:
        return [_new_message(m, self.count_tokens(m["content"])) for m in messages]

    def history(self, owner: str, conversation_id: str) -> list[dict[str, Any]]:
        """The stored messages as the chat formatter takes them; replies carry their
        generated ``token_ids``."""
        return [_history_message(m) for m in self.store.messages(owner, conversation_id)]

    def create(
        self, owner: str, metadata: dict[str, str], messages: list[dict[str, str]]
    ) -> Conversation:
        """(worker thread) A new conversation with initial ``messages``, checked by the
        rules every chat into it will meet: the chat format must take them (roles), and
        the messages no truncation can drop (system ones) must leave room for a reply."""
        if messages:
            self.served.check_input_chars(input_chars(messages), "messages")
            probe = {"role": "user", "content": "x"}
            encode_chat(self.served, [*messages, probe], "messages")
            system = [m for m in messages if m["role"] == "system"]
            if system:
                self.served.check_fits(
                    len(encode_chat(self.served, system, "messages")), "messages"
                )
        return self.store.create(owner, metadata, self.new_messages(messages))

    def next_prompt(self, owner: str, conversation_id: str) -> tuple[str, list[int], int]:
        """(worker thread) The history chat-formatted as the next turn's prompt starts:
        its text, its token ids and the number of messages (``GET …/prompt``)."""
        history = self.history(owner, conversation_id)
        if not history:
            return "", [], 0
        tokens = encode_chat(self.served, history, "messages")  # a 400 for a bad history
        return self.served.loaded.chat.render(history), tokens, len(history)

    def reply_message(self, plan_prompt_tokens: int, reply: ChoiceResult) -> NewMessage:
        """The assistant message to store for a finished ``reply``: its content, calls
        and reasoning apart, as the template re-renders them (Qwen3 drops old reasoning),
        so the generated ids are kept only for a reply that is all content."""
        calls = tuple(ToolCall(c.id, c.name, c.arguments) for c in reply.tool_calls)
        ids = reply_token_ids(reply.events, self.served.stop_token_ids)
        if calls or reply.reasoning is not None:
            ids = None
        tokens = len(ids) if ids is not None else self.count_tokens(reply.content)
        return NewMessage(
            "assistant", reply.content, tokens, plan_prompt_tokens, len(reply.events),
            reply.finish_reason, ids, calls, None, reply.reasoning,
        )  # fmt: skip

    async def chat(
        self, owner: str, conversation_id: str, body: ConversationChatRequest, guard: RequestGuard
    ) -> Response:
        """One turn: lock, history + new messages (fitted), generate, store the turn."""
        model = self.served.resolve(body.model)
        if body.n != 1:
            raise InvalidParameterError("n: conversation chats generate one reply (n=1)", "n")
        options = prompt_options(self.served, body)  # tool fields: 400s before waiting
        new = wire_messages(body.messages)
        if not new:
            raise InvalidParameterError("messages: must contain the new message", "messages")
        self.served.check_input_chars(input_chars(new, body.tools), "messages")
        await run_in_threadpool(self.store.get, owner, conversation_id)  # 404 before waiting
        release = await self.locks.acquire(conversation_id)
        storing: list[asyncio.Task[NewMessage]] = []

        def release_when_stored() -> None:
            """The next chat in once this turn's start or commit (if one began) has ended:
            a client that leaves while its turn is stored must not let the next turn read
            the history without it."""
            if storing and not storing[-1].done():
                storing[-1].add_done_callback(lambda _: release())
            else:
                release()

        guard.add(release_when_stored)
        try:
            held = await run_in_threadpool(self.store.begin_turn, owner, conversation_id)
            guard.add(held.abandon)  # added before any await: a cancelled request runs it
            # tokenizing and fitting the history is CPU work: off the event loop
            turn = await run_in_threadpool(self.prepare_turn, held, body, new, model, options)
            for req in turn.plan.requests:  # its KV is reused by this key's requests only
                req.cache_scope = owner

            async def stored(call: Callable[[], Any]) -> Any:
                """``call`` on a worker thread, finished even if the client leaves."""
                task = asyncio.ensure_future(run_in_threadpool(call))
                task.add_done_callback(_retrieved)
                storing.append(task)
                return await asyncio.shield(task)

            async def start_turn() -> None:
                await stored(lambda: self.start_turn(turn))

            async def store_turn(results: list[ChoiceResult]) -> None:
                reply = await stored(lambda: self.store_turn(turn, results[0]))
                self.prefill_ahead_later(turn, reply, owner)

            return await respond_chat(
                self.served, turn.plan, guard, body.stream, store_turn, start_turn
            )
        except BaseException:
            guard.close()
            raise

    def prepare_turn(
        self,
        held: StoreTurn,
        body: ConversationChatRequest,
        new: list[dict[str, Any]],
        model: str,
        options: PromptOptions,
    ) -> Turn:
        """(worker thread) The history ``held`` read and the new messages, fitted to the
        context by their token counts (:func:`fit_history`), planned for the engine."""
        stored = held.messages
        new_stored = self.new_messages(new)
        history = [_history_message(m) for m in stored]
        fitted = fit_history(
            self.served,
            history,
            [m.tokens for m in stored],
            new,
            [m.tokens for m in new_stored],
            body.max_new_tokens(),
            options,
        )
        plan = plan_chat(
            self.served, body, fitted.messages, model, prompt=fitted.prompt, options=options
        )
        conversation_id = held.conversation.id
        plan.extra = {"conversation_id": conversation_id, "truncated_messages": fitted.dropped}
        return Turn(plan, fitted.messages, new_stored, held, history, body.max_new_tokens())

    def start_turn(self, turn: Turn) -> None:
        """(worker thread) Store the new messages and a stand-in for the reply (empty,
        ``finish_reason`` :data:`~bitserve.store.INTERRUPTED`) as the reply begins, so
        a server killed or a client gone before it is stored keeps the user's message,
        and the reply reads as interrupted."""
        stand_in = NewMessage("assistant", "", 0, turn.plan.prompt_tokens, 0, INTERRUPTED)
        turn.held.start([*turn.new, stand_in])

    def store_turn(self, turn: Turn, result: ChoiceResult) -> NewMessage:
        """(worker thread) Store the new messages and the reply in one transaction (the
        held turn's commit, in place of what :meth:`start_turn` stored); returns the
        reply as stored."""
        reply = self.reply_message(turn.plan.prompt_tokens, result)
        turn.held.commit([*turn.new, reply])
        return reply

    def prefill_ahead_later(self, turn: Turn, reply: NewMessage, scope: str) -> None:
        """Queue the next turn's prompt start (:func:`next_turn_prefix` of the history the
        next turn will keep, :func:`next_turn_history`) for the engine to compute ahead,
        once a worker thread has encoded it: after the answer, not in its way (encoding a
        long history takes a while)."""

        def prefix() -> list[int] | None:
            return next_turn_prefix(self.served, next_turn_history(self.served, turn, reply), reply)

        async def queue_it() -> None:
            ahead = await run_in_threadpool(prefix)
            if ahead is not None:
                self.served.engine.prefill_ahead(ahead, PREFILL_AHEAD_CHUNK, scope)

        task = asyncio.get_running_loop().create_task(queue_it())
        self._background.add(task)  # a reference until it is done (asyncio keeps weak ones)
        task.add_done_callback(self._background.discard)
