"""Everything that can go wrong talking to a server, as one sentence for the user.

Every error the client shows is a :class:`ChatClientError` whose ``str()`` is a complete,
self-contained sentence (no traceback ever reaches the user). The tree::

    ChatClientError
    ├── ServerUnreachable      connection refused, DNS failure, timeout, bad URL
    ├── NotABitserveServer     the URL answers, but not with the conversation API
    ├── AuthenticationFailed   401: missing or wrong API key
    ├── ConversationNotFound   404 on a conversation route
    ├── RequestRejected        400/422: the server refused what we sent
    ├── ServerBusy             503: the request queue is full
    └── ServerFailed           5xx, malformed answers, error events mid-stream
"""

from __future__ import annotations

__all__ = [
    "AuthenticationFailed",
    "ChatClientError",
    "ConversationNotFound",
    "NotABitserveServer",
    "RequestRejected",
    "ServerBusy",
    "ServerFailed",
    "ServerUnreachable",
]


class ChatClientError(Exception):
    """Base class; ``str(error)`` is one sentence fit to print as is."""

    #: whether the interactive client can go on after this error (vs. exit at startup)
    recoverable: bool = True


class ServerUnreachable(ChatClientError):
    """No HTTP answer at all: the server is down or the URL points nowhere."""


class NotABitserveServer(ChatClientError):
    """Something answered, but the conversation routes are not there."""

    recoverable = False


class AuthenticationFailed(ChatClientError):
    """The server wants an API key we do not have, or rejected ours."""

    recoverable = False


class ConversationNotFound(ChatClientError):
    """The conversation id is unknown to the server (or belongs to another key)."""


class RequestRejected(ChatClientError):
    """The server refused the request as malformed or out of range (400/422)."""


class ServerBusy(ChatClientError):
    """The server's queue is full (503); trying again later may work."""


class ServerFailed(ChatClientError):
    """The server failed while answering (5xx, an error event, or an unreadable reply)."""
