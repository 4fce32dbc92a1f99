"""The conversation API over HTTP: the only part of the client that knows about httpx.

Routes used (issue 4): ``POST /v1/conversations`` → ``{"conversation_id", ...}``;
``GET /v1/conversations/{id}`` → ``{"messages": [{"role", "content", ...}]}``;
``POST /v1/conversations/{id}/chat`` with ``stream: true`` → ``chat.completion.chunk``
server-sent events. Every failure surfaces as a :class:`~bitserve.client.errors.ChatClientError`
whose text is one sentence for the user.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from bitserve.client.errors import (
    AuthenticationFailed,
    ChatClientError,
    ConversationNotFound,
    NotABitserveServer,
    RequestRejected,
    ServerBusy,
    ServerFailed,
    ServerUnreachable,
)
from bitserve.client.sse import DONE, error_message, iter_sse_data, parse_chunk

CUT_REPLY = "The server closed the connection in the middle of a reply."

__all__ = ["ChatMessage", "ConversationAPI", "ReplyOptions"]

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 600.0  # a queued request may wait long for its first token


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One stored message as the server returns it: an assistant's may carry its
    reasoning and its tool calls (each as ``name(arguments)``), and is ``interrupted``
    where its reply never completed (stopped, or the server stopped)."""

    role: str
    content: str
    reasoning: str = ""
    tool_calls: tuple[str, ...] = ()
    interrupted: bool = False


@dataclass(frozen=True, slots=True)
class ReplyOptions:
    """Sampling fields sent with each chat turn; ``None`` leaves the server's default."""

    temperature: float | None = None
    max_tokens: int | None = None

    def to_json(self) -> dict[str, Any]:
        fields = {"temperature": self.temperature, "max_tokens": self.max_tokens}
        return {k: v for k, v in fields.items() if v is not None}


class ConversationAPI:
    """A connection to one bitserve server, optionally with an API key.

    ``transport`` is the httpx seam for in-process tests (``httpx.MockTransport``).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self._transport = transport
        self._http = self._new_http()

    def _new_http(self) -> httpx.Client:
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        return httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=self._transport
        )

    def reset(self) -> None:
        """Drop every connection (after an interrupted stream) and start a fresh pool."""
        self._http.close()
        self._http = self._new_http()

    def close(self) -> None:
        self._http.close()

    # -- routes ------------------------------------------------------------------------

    def create_conversation(self, system: str | None = None) -> str:
        """Create a conversation (with ``system`` as its system prompt) and return its id."""
        body: dict[str, Any] = {}
        if system:
            body["messages"] = [{"role": "system", "content": system}]
        data = self._json("POST", "/v1/conversations", json=body)
        conversation_id = data.get("conversation_id") or data.get("id")
        if not isinstance(conversation_id, str):
            raise NotABitserveServer(self._not_bitserve("its answer had no conversation_id"))
        return conversation_id

    def get_messages(self, conversation_id: str) -> list[ChatMessage]:
        """The stored messages of a conversation, oldest first."""
        path = f"/v1/conversations/{_segment(conversation_id)}"
        data = self._json("GET", path, conv=conversation_id)
        messages = data.get("messages")
        if not isinstance(messages, list):
            raise ServerFailed("The server's conversation record had no message list.")
        return [_message(m) for m in messages if isinstance(m, dict)]

    def stream_reply(
        self,
        conversation_id: str,
        content: str,
        options: ReplyOptions | None = None,
        on_reasoning: Callable[[str], None] | None = None,
    ) -> Generator[str, None, None]:
        """Send one user message and yield the reply's text pieces as they arrive; pieces
        of the model's reasoning go to ``on_reasoning`` (dropped without it).

        Closing the generator early (or an exception inside the loop, e.g. Ctrl-C) closes
        the HTTP response, which is how the server learns to stop generating.
        """
        body: dict[str, Any] = {
            "messages": [{"role": "user", "content": content}],
            "stream": True,
            **(options or ReplyOptions()).to_json(),
        }
        path = f"/v1/conversations/{_segment(conversation_id)}/chat"
        with (
            _translated_errors(self.base_url),
            self._http.stream("POST", path, json=body) as response,
        ):
            if response.status_code >= 400:
                response.read()
                self._raise_for_status(response, conversation_id)
            yield from self._reply_pieces(response, on_reasoning)

    # -- helpers -----------------------------------------------------------------------

    def _reply_pieces(
        self, response: httpx.Response, on_reasoning: Callable[[str], None] | None
    ) -> Iterator[str]:
        if response.headers.get("content-type", "").startswith("application/json"):
            response.read()  # a server that ignored stream: true answered in one piece
            yield _completion_text(self._decode(response))
            return
        for payload in iter_sse_data(response.iter_lines()):
            if payload == DONE:
                return
            delta = parse_chunk(payload)
            if delta.reasoning and on_reasoning is not None:
                on_reasoning(delta.reasoning)
            if delta.content:
                yield delta.content
        # closed without [DONE] (a proxy that ends cleanly): the server stored no turn
        raise ServerFailed(CUT_REPLY)

    def _json(self, method: str, path: str, conv: str | None = None, **kw: Any) -> dict[str, Any]:
        with _translated_errors(self.base_url):
            response = self._http.request(method, path, **kw)
        self._raise_for_status(response, conv)
        return self._decode(response)

    def _decode(self, response: httpx.Response) -> dict[str, Any]:
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise NotABitserveServer(self._not_bitserve("it did not answer with JSON"))
        return data

    def _raise_for_status(self, response: httpx.Response, conv: str | None) -> None:
        status = response.status_code
        if status < 400:
            return
        try:
            body = response.json()
        except ValueError:
            body = None
        raise _status_error(status, body, conv, self, response.headers.get("retry-after"))

    def _not_bitserve(self, why: str) -> str:
        return f"{self.base_url} does not look like a bitserve server ({why}); check --url."


def _segment(conversation_id: str) -> str:
    """A conversation id as one path segment: ``?``, ``#`` or ``/`` in it cannot reach
    another route."""
    return quote(conversation_id, safe="")


@contextmanager
def _translated_errors(base_url: str) -> Iterator[None]:
    """Turn httpx's transport exceptions into one-sentence client errors."""
    try:
        yield
    except httpx.ConnectError as exc:
        raise ServerUnreachable(
            f"Cannot connect to a bitserve server at {base_url} ({_reason(exc)}); is it running?"
        ) from None
    except httpx.TimeoutException:
        raise ServerUnreachable(f"The server at {base_url} did not answer in time.") from None
    except httpx.RemoteProtocolError:
        raise ServerFailed(CUT_REPLY) from None
    except httpx.HTTPError as exc:
        raise ServerUnreachable(f"Talking to {base_url} failed: {_reason(exc)}.") from None


def _status_error(
    status: int, body: Any, conv: str | None, api: ConversationAPI, retry_after: str | None
) -> ChatClientError:
    """The user-facing error for an HTTP error status (``conv``: the conversation route's id)."""
    message = error_message(body)
    if status in (401, 403):
        if api.api_key:
            return AuthenticationFailed(
                "The server rejected the API key; check --api-key or BITSERVE_API_KEY."
            )
        return AuthenticationFailed(
            "The server requires an API key; pass --api-key or set BITSERVE_API_KEY."
        )
    if status in (404, 405, 501):  # 501: a server that does not even take POST
        if conv is not None and isinstance(body, dict) and isinstance(body.get("error"), dict):
            return ConversationNotFound(f"Conversation {conv} was not found on the server.")
        return NotABitserveServer(api._not_bitserve(f"the conversation API answered {status}"))
    if status in (400, 413, 422):
        return RequestRejected(f"The server refused the request: {message}")
    if status == 503:
        later = f" in {retry_after} s" if retry_after and retry_after.isdigit() else " later"
        return ServerBusy(f"The server is busy ({message.rstrip('.')}); try again{later}.")
    return ServerFailed(f"The server failed (HTTP {status}): {message}")


def _reason(exc: httpx.HTTPError) -> str:
    text = str(exc).strip()
    if "refused" in text.lower():
        return "connection refused"
    if "name or service not known" in text.lower() or "nodename nor servname" in text.lower():
        return "unknown host name"
    return text.rstrip(".") or type(exc).__name__


def _text(content: Any) -> str:
    """Message content as text (OpenAI also allows a list of ``{"type": "text"}`` parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def _message(m: dict[str, Any]) -> ChatMessage:
    calls = m.get("tool_calls")
    calls = calls if isinstance(calls, list) else []
    functions = [c["function"] for c in calls if isinstance(c, dict) and "function" in c]
    shown = tuple(
        f"{f.get('name', '?')}({f.get('arguments', '')})" for f in functions if isinstance(f, dict)
    )
    role, reasoning = str(m.get("role", "?")), _text(m.get("reasoning_content"))
    interrupted = m.get("finish_reason") == "interrupted"
    return ChatMessage(role, _text(m.get("content")), reasoning, shown, interrupted)


def _completion_text(data: dict[str, Any]) -> str:
    choices = data.get("choices") or [{}]
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    return _text(message.get("content")) if isinstance(message, dict) else ""
