"""Server-sent events as OpenAI streams them: ``data: {...}`` events, then ``data: [DONE]``.

Parsing is split from transport so it can be tested on plain strings:
:func:`iter_sse_data` turns text lines into event payloads (the SSE framing rules), and
:func:`parse_chunk` turns one ``chat.completion.chunk`` payload into the text it adds.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from bitserve.client.errors import ServerFailed

__all__ = ["DONE", "ChunkDelta", "error_message", "iter_sse_data", "parse_chunk"]

DONE = "[DONE]"


def iter_sse_data(lines: Iterable[str]) -> Iterator[str]:
    """Yield the data payload of each event in ``lines`` (without line terminators).

    Follows the SSE framing rules: an event ends at a blank line; several ``data:`` lines
    in one event are joined with ``\\n``; one space after the colon is dropped; comment
    lines (``:...``) and other fields (``event:``, ``id:``, ``retry:``) are ignored. A
    final event without its blank line is still delivered. Stops after ``[DONE]``.
    """
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                payload = "\n".join(data)
                data = []
                yield payload
                if payload == DONE:
                    return
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


@dataclass(frozen=True, slots=True)
class ChunkDelta:
    """What one streamed chunk adds: text (possibly ""), reasoning text (a model's
    ``<think>`` part, possibly ""), and the finish reason if last."""

    content: str
    finish_reason: str | None = None
    reasoning: str = ""


def parse_chunk(payload: str) -> ChunkDelta:
    """Decode one ``chat.completion.chunk`` payload (choice 0 only).

    Role-only chunks and the usage chunk (``choices: []``) give empty content. An error
    event (``{"error": {...}}``, sent when a stream fails mid-way) raises
    :class:`ServerFailed` with the server's message; so does a payload that is not JSON.
    """
    try:
        chunk = json.loads(payload)
    except json.JSONDecodeError:
        raise ServerFailed(
            f"The server sent an unreadable stream event: {payload[:80]!r}."
        ) from None
    if not isinstance(chunk, dict):
        raise ServerFailed("The server sent a stream event that is not a JSON object.")
    if "error" in chunk:
        raise ServerFailed(f"The server stopped the reply: {error_message(chunk)}")
    choices = chunk.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return ChunkDelta("")
    choice: dict[str, Any] = choices[0]
    delta = choice.get("delta")
    delta = delta if isinstance(delta, dict) else {}
    content, reasoning = delta.get("content"), delta.get("reasoning_content")
    return ChunkDelta(
        content if isinstance(content, str) else "",
        choice.get("finish_reason"),
        reasoning if isinstance(reasoning, str) else "",
    )


def error_message(body: Any) -> str:
    """The message of an OpenAI-shaped error body, as a sentence ending in a period."""
    message = ""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            message = str(error.get("message") or "")
        elif isinstance(error, str):
            message = error
        elif isinstance(body.get("detail"), str):
            message = body["detail"]
    message = message.strip() or "no details given"
    return message if message.endswith((".", "!", "?")) else message + "."
