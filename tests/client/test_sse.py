"""SSE framing and chat.completion.chunk decoding, on plain strings."""

from __future__ import annotations

import json

import pytest

from bitserve.client.errors import ServerFailed
from bitserve.client.sse import DONE, ChunkDelta, error_message, iter_sse_data, parse_chunk


def chunk(content: str | None = None, role: str | None = None, finish: str | None = None) -> str:
    delta = {k: v for k, v in {"role": role, "content": content}.items() if v is not None}
    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    return json.dumps({"object": "chat.completion.chunk", "choices": [choice]})


def test_events_end_at_blank_lines_and_stop_after_done() -> None:
    lines = ["data: one", "", "data: two", "", "data: [DONE]", "", "data: after", ""]
    assert list(iter_sse_data(lines)) == ["one", "two", DONE]


def test_multiline_data_comments_and_other_fields() -> None:
    lines = [": keep-alive", "event: message", "id: 7", "data: a", "data:b", "retry: 10", ""]
    assert list(iter_sse_data(lines)) == ["a\nb"]


def test_only_one_space_after_the_colon_is_dropped_and_crlf_is_stripped() -> None:
    assert list(iter_sse_data(["data:  x\r\n", "\r\n"])) == [" x"]


def test_last_event_without_blank_line_is_delivered() -> None:
    assert list(iter_sse_data(["", "", "data: tail"])) == ["tail"]


def test_chunks_give_content_and_finish_reason() -> None:
    assert parse_chunk(chunk(role="assistant", content="")) == ChunkDelta("")
    assert parse_chunk(chunk(content="Hel")) == ChunkDelta("Hel")
    assert parse_chunk(chunk(finish="stop")) == ChunkDelta("", "stop")


def test_usage_chunk_has_no_text() -> None:
    payload = json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    assert parse_chunk(payload) == ChunkDelta("")


def test_error_event_raises_with_the_servers_message() -> None:
    payload = json.dumps({"error": {"message": "engine crashed", "type": "server_error"}})
    with pytest.raises(ServerFailed, match="engine crashed"):
        parse_chunk(payload)


@pytest.mark.parametrize("payload", ["{not json", "[1, 2]"])
def test_unreadable_payloads_raise(payload: str) -> None:
    with pytest.raises(ServerFailed):
        parse_chunk(payload)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"error": {"message": "bad field", "type": "x"}}, "bad field."),
        ({"error": "plain"}, "plain."),
        ({"detail": "Not Found"}, "Not Found."),
        ("<html>", "no details given."),
        ({"error": {"message": "Done!"}}, "Done!"),
    ],
)
def test_error_message_is_a_sentence(body: object, expected: str) -> None:
    assert error_message(body) == expected
