"""The conversation store interface: what the API needs from a database, nothing more.

A conversation is an id, an owner, a creation time, string metadata and an ordered list of
messages. Messages are appended a whole turn at a time (the user message(s) and the
assistant reply in one transaction). ``SQLiteStore`` is the default; ``PostgresStore``
fills the same ABC for several replicas sharing one database.

A chat turn reads the history, generates the reply and appends both: :meth:`begin_turn`
holds the conversation for that whole time (a :class:`Turn`), so two turns into one
conversation run one after the other even from two replicas. Once the reply is under way
the turn is stored with a stand-in for the reply (:meth:`Turn.start`, an empty assistant
message whose ``finish_reason`` is :data:`INTERRUPTED`), which the reply replaces when it
is complete: a server killed mid-reply, a client that left or a reply that failed keeps
the user's message, and the reply reads as interrupted, never as a complete answer.
"""

from __future__ import annotations

import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# The finish_reason of a reply that never completed (the server stopped or was killed, the
# client left, the generation failed): its stand-in, stored when the reply began.
INTERRUPTED = "interrupted"

# Metadata follows OpenAI's Conversations API: at most 16 string pairs.
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512


class StoreError(Exception):
    """Base class of store errors."""


class StorageFullError(StoreError):
    """The store's disk (or its configured size) is full: the write did not happen, and
    everything stored before it is intact and readable."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(
            "the conversation store is full: nothing was written (stored conversations can "
            "still be read)" + (f"; {detail}" if detail else "")
        )


class InvalidTextError(StoreError, ValueError):
    """Text that is not valid Unicode (a lone surrogate such as ``"\\ud800"``, legal in
    JSON): it could be stored but never sent back as UTF-8, so it is refused."""

    def __init__(self, where: str) -> None:
        super().__init__(f"{where}: text must be valid Unicode (no lone surrogates)")
        self.where = where


class ConversationNotFoundError(StoreError, LookupError):
    """No conversation with this id belongs to this owner (other owners' ones look absent)."""

    def __init__(self, conversation_id: str) -> None:
        super().__init__(f"conversation {conversation_id!r} not found")
        self.conversation_id = conversation_id


class ConversationChangedError(StoreError):
    """A turn's conversation got messages its history does not hold, from another process
    writing the same SQLite file (one process's turns into a conversation run one after
    another; PostgreSQL's run so across replicas): nothing was written."""

    def __init__(self, conversation_id: str) -> None:
        super().__init__(
            f"conversation {conversation_id!r} changed while this turn was prepared (another "
            "server process wrote to it): nothing was stored, send the message again"
        )
        self.conversation_id = conversation_id


class StoreUnavailableError(StoreError):
    """The database cannot be reached (connection lost, server down or restarting, every
    pooled connection busy). Nothing was written; retry after ``retry_after`` seconds."""

    def __init__(self, reason: str, retry_after: int = 2) -> None:
        super().__init__(f"the conversation store is unavailable: {reason}")
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call an assistant message made: OpenAI's ``tool_calls[i]`` with
    ``function.name`` and ``function.arguments`` (JSON text, as the model wrote it)."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to append. ``tokens`` is the token count of ``content`` alone;
    ``prompt_tokens``/``completion_tokens`` are set on assistant replies (usage of the turn).
    ``token_ids`` (assistant replies) are the ids the model generated for ``content``,
    without the stop token; the next turn's prompt reuses them verbatim.

    Tools and reasoning: an assistant message may carry ``tool_calls`` (then ``content``
    may be ``""``) and ``reasoning_content`` (the text it wrote inside ``<think>``); a
    ``role="tool"`` message answers the call named by ``tool_call_id``."""

    role: str
    content: str
    tokens: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    token_ids: tuple[int, ...] | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    reasoning_content: str | None = None


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message as stored: ``index`` counts from 0 within its conversation."""

    index: int
    role: str
    content: str
    created_at: float  # unix seconds
    tokens: int
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None
    token_ids: tuple[int, ...] | None = None  # generated ids of an assistant reply
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    reasoning_content: str | None = None


@dataclass(frozen=True, slots=True)
class Conversation:
    """A conversation row (without its messages). ``seq`` orders conversations by creation."""

    id: str
    owner: str
    created_at: float  # unix seconds
    metadata: dict[str, str] = field(default_factory=dict)
    seq: int = 0
    num_messages: int = 0


@dataclass(frozen=True, slots=True)
class ConversationPage:
    """One page of a newest-first listing; ``has_more`` says whether older ones remain."""

    conversations: list[Conversation]
    has_more: bool


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def is_valid_text(text: object) -> bool:
    """False for a string that cannot be encoded as UTF-8 (it holds a lone surrogate);
    anything else is the database's to judge."""
    if not isinstance(text, str) or text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def repaired_text(text: str) -> str:
    """``text`` with any lone surrogate replaced by U+FFFD (rows written before the store
    refused them stay readable)."""
    return text if is_valid_text(text) else _SURROGATE.sub("\ufffd", text)


def check_texts(metadata: dict[str, str] | None, messages: Iterable[NewMessage] = ()) -> None:
    """Raise :class:`InvalidTextError` for metadata or message text that could not be
    read back as UTF-8. Every store calls it before writing."""
    for key, value in (metadata or {}).items():
        if not (is_valid_text(key) and is_valid_text(value)):
            raise InvalidTextError("metadata")
    for i, m in enumerate(messages):
        texts = [m.role, m.content, m.tool_call_id, m.reasoning_content]
        texts += [t for c in m.tool_calls for t in (c.id, c.name, c.arguments)]
        if not all(t is None or is_valid_text(t) for t in texts):
            raise InvalidTextError(f"messages[{i}]")


def new_conversation_id(unix_ms: int, number: int) -> str:
    """``conv_<unix-ms>_<n>``: the creation time and a number never reused by the store."""
    return f"conv_{unix_ms}_{number}"


def now() -> float:
    return time.time()


class Turn(ABC):
    """One chat turn into a conversation, open from reading its history to storing the
    reply: ``conversation`` and ``messages`` as they were when it began, then at most one
    :meth:`start`, then exactly one of :meth:`commit` or :meth:`abandon`: whichever comes
    first ends the turn (abandon after commit does nothing; commit after abandon raises
    ``TurnEndedError`` and stores nothing, so a turn whose client left never lands after
    the next turn has read the history). What :meth:`start` stored stays if the turn is
    abandoned, or if the process dies before it ends."""

    conversation: Conversation
    messages: list[StoredMessage]

    @abstractmethod
    def start(self, messages: Sequence[NewMessage]) -> None:
        """Append ``messages`` now, committed, while the turn goes on holding the
        conversation (the new message(s) and the reply's stand-in, as the reply begins)."""

    @abstractmethod
    def commit(self, messages: Sequence[NewMessage]) -> list[StoredMessage]:
        """Append ``messages`` (the new message(s) and the reply) in one transaction; after
        :meth:`start`, they replace what it stored, in the same transaction."""

    @abstractmethod
    def abandon(self) -> None:
        """Store nothing and let the next turn in; idempotent, never raises, never waits on
        the database (it runs on the event loop when a client leaves)."""


class TurnEndedError(RuntimeError):
    """``commit`` of a turn already abandoned (its client left)."""

    def __init__(self) -> None:
        super().__init__("this turn has already ended: its client left, nothing was stored")


class _AppendTurn(Turn):
    """The plain turn: a read now, ``append_turn`` at the end. Enough where one process
    owns the database (its chat route already runs one turn per conversation at a time)."""

    def __init__(self, store: ConversationStore, owner: str, conversation_id: str) -> None:
        self.store = store
        self.owner = owner
        self.conversation, self.messages = store.read(owner, conversation_id)
        self._open = True
        self._started = False
        self._lock = threading.Lock()

    def start(self, messages: Sequence[NewMessage]) -> None:
        first = self.conversation.num_messages
        self.store.append_turn(self.owner, self.conversation.id, messages, at=first)
        self._started = True

    def commit(self, messages: Sequence[NewMessage]) -> list[StoredMessage]:
        with self._lock:  # claimed here, so abandon (on the event loop) never waits on it
            if not self._open:
                raise TurnEndedError()
            self._open = False
        if self._started:
            first = self.conversation.num_messages
            return self.store.replace_turn(self.owner, self.conversation.id, first, messages)
        return self.store.append_turn(self.owner, self.conversation.id, messages)

    def abandon(self) -> None:
        with self._lock:
            self._open = False


class ConversationStore(ABC):
    """Conversations and their messages, scoped by ``owner`` (an API-key fingerprint, or
    ``""`` when the server has no keys). Every method that takes an id raises
    ``ConversationNotFoundError`` when the id does not exist *for that owner*.

    Implementations must be safe to call from several threads at once and must make every
    method atomic: a reader never sees half a turn. Writes refuse text that is not valid
    Unicode (:func:`check_texts`, ``InvalidTextError``), so whatever is stored can be sent
    back; a full disk is a ``StorageFullError`` that writes nothing and leaves reads
    working.
    """

    @abstractmethod
    def create(
        self,
        owner: str,
        metadata: dict[str, str] | None = None,
        messages: Sequence[NewMessage] = (),
    ) -> Conversation:
        """Create a conversation (optionally with initial messages) and return it."""

    @abstractmethod
    def get(self, owner: str, conversation_id: str) -> Conversation:
        """The conversation row."""

    @abstractmethod
    def messages(self, owner: str, conversation_id: str) -> list[StoredMessage]:
        """Every message, oldest first."""

    @abstractmethod
    def read(self, owner: str, conversation_id: str) -> tuple[Conversation, list[StoredMessage]]:
        """The conversation row and every message, oldest first, read at one moment (a
        concurrent turn or delete is either wholly in it or not at all)."""

    @abstractmethod
    def list_conversations(
        self, owner: str, limit: int = 20, after: str | None = None
    ) -> ConversationPage:
        """Newest first, at most ``limit``; ``after`` is the last id of the previous page."""

    @abstractmethod
    def update_metadata(
        self, owner: str, conversation_id: str, metadata: dict[str, str]
    ) -> Conversation:
        """Replace the metadata (OpenAI semantics: the new dict replaces the old one)."""

    @abstractmethod
    def delete(self, owner: str, conversation_id: str) -> None:
        """Delete the conversation and its messages."""

    @abstractmethod
    def append_turn(
        self,
        owner: str,
        conversation_id: str,
        messages: Sequence[NewMessage],
        at: int | None = None,
    ) -> list[StoredMessage]:
        """Append ``messages`` (one turn) in a single transaction; all or nothing. With
        ``at`` (the number of messages the caller read), a conversation that holds another
        number by then is a ``ConversationChangedError``."""

    @abstractmethod
    def replace_turn(
        self, owner: str, conversation_id: str, first: int, messages: Sequence[NewMessage]
    ) -> list[StoredMessage]:
        """Replace as many messages as ``messages`` holds, from index ``first`` on, with
        them, in a single transaction (a started turn's commit)."""

    def begin_turn(self, owner: str, conversation_id: str) -> Turn:
        """Open a chat turn (see :class:`Turn`). Stores that several processes share must
        make a second turn into the same conversation wait until the first one ends; the
        default suits a store one process owns."""
        return _AppendTurn(self, owner, conversation_id)

    @abstractmethod
    def close(self) -> None:
        """Release connections. The store is unusable afterwards."""
