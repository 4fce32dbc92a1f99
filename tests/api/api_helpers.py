"""Helpers shared by the API tests (request bodies, SSE parsing)."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from fastapi.testclient import TestClient

AppFactory = Callable[..., AbstractContextManager[TestClient]]


def chat_body(content: str = "Hello, how are you?", **extra: Any) -> dict[str, Any]:
    """The guide's chat request body (short replies keep tests fast)."""
    body: dict[str, Any] = {
        "model": "bitnet",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0.7,
        "max_tokens": 8,
    }
    body.update(extra)
    return body


def sse_events(text: str) -> list[Any]:
    """The ``data:`` payloads of an SSE body, JSON-decoded (``[DONE]`` kept as a string)."""
    out = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out
