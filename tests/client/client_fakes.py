"""An in-memory stand-in for the conversation routes, served through ``httpx.MockTransport``
for the client's in-process tests (the real server is exercised in test_acceptance.py)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

BASE_URL = "http://bitserve.test"


def sse(*payloads: Any) -> list[bytes]:
    """Server-sent event frames for each payload (dicts become JSON), then [DONE]."""
    frames = [f"data: {p if isinstance(p, str) else json.dumps(p)}\n\n" for p in payloads]
    return [f.encode() for f in [*frames, "data: [DONE]\n\n"]]


def content_chunk(text: str) -> dict[str, Any]:
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
    return {"object": "chat.completion.chunk", "choices": [choice]}


def openai_error(status: int, message: str, **headers: str) -> httpx.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None}}
    return httpx.Response(status, json=body, headers=headers)


@dataclass
class FakeServer:
    """Conversations in a dict; replies echo the user's text back in three chunks.

    ``requests`` records every request; ``closed_streams`` counts reply streams whose
    response body was closed (fully read or abandoned); ``reply_stream`` may replace the
    chunk iterator to script failures.
    """

    api_key: str | None = None
    conversations: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)
    closed_streams: int = 0
    reply_stream: Any = None

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return openai_error(401, "Invalid API key.")
        parts = request.url.path.strip("/").split("/")
        if parts[:2] != ["v1", "conversations"]:
            return httpx.Response(404, json={"detail": "Not Found"})
        if len(parts) == 2 and request.method == "POST":
            return self._create(json.loads(request.content or b"{}"))
        conv = self.conversations.get(parts[2])
        if conv is None:
            return openai_error(404, f"Conversation {parts[2]} not found.")
        if len(parts) == 3 and request.method == "GET":
            return httpx.Response(200, json={"id": parts[2], "messages": conv})
        return self._chat(conv, json.loads(request.content))

    def _create(self, body: dict[str, Any]) -> httpx.Response:
        conversation_id = f"conv_1700000000000_{len(self.conversations)}"
        self.conversations[conversation_id] = list(body.get("messages", []))
        return httpx.Response(200, json={"conversation_id": conversation_id, "id": conversation_id})

    def _chat(self, conv: list[dict[str, str]], body: dict[str, Any]) -> httpx.Response:
        text = body["messages"][0]["content"]
        reply = f"echo: {text}"
        conv.append({"role": "user", "content": text})
        conv.append({"role": "assistant", "content": reply})
        thirds = (reply[:4], reply[4:8], reply[8:])
        pieces = self.reply_stream or sse(*(content_chunk(p) for p in thirds))
        stream = TrackedStream(pieces, self)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=stream)


class TrackedStream(httpx.SyncByteStream):
    """A response body that tells the fake server when the client closed it."""

    def __init__(self, pieces: Iterable[bytes], server: FakeServer) -> None:
        self.pieces = pieces
        self.server = server

    def __iter__(self) -> Iterator[bytes]:
        yield from self.pieces

    def close(self) -> None:
        self.server.closed_streams += 1
