"""ConversationAPI against an in-memory stand-in: requests sent, replies parsed, every HTTP
failure turned into its one-sentence error."""

from __future__ import annotations

import json
import socket

import httpx
import pytest
from client_fakes import BASE_URL, FakeServer, content_chunk, openai_error, sse

from bitserve.client.api_client import ChatMessage, ConversationAPI, ReplyOptions
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


def api_for(handler: httpx.MockTransport | FakeServer, key: str | None = None) -> ConversationAPI:
    transport = handler if isinstance(handler, httpx.MockTransport) else None
    if isinstance(handler, FakeServer):
        transport = httpx.MockTransport(handler.handle)
    return ConversationAPI(BASE_URL + "/", api_key=key, transport=transport)


def answering(response: httpx.Response) -> ConversationAPI:
    return api_for(httpx.MockTransport(lambda request: response))


def test_create_sends_the_system_prompt(api: ConversationAPI, fake_server: FakeServer) -> None:
    conversation_id = api.create_conversation("Be brief.")
    assert conversation_id.startswith("conv_")
    assert json.loads(fake_server.requests[0].content) == {
        "messages": [{"role": "system", "content": "Be brief."}]
    }
    assert api.get_messages(conversation_id) == [ChatMessage("system", "Be brief.")]


def test_stream_reply_sends_one_user_message_and_yields_pieces(
    api: ConversationAPI, fake_server: FakeServer
) -> None:
    conversation_id = api.create_conversation()
    pieces = list(api.stream_reply(conversation_id, "hi there", ReplyOptions(0.0, 7)))
    assert len(pieces) == 3
    assert "".join(pieces) == "echo: hi there"
    request = fake_server.requests[-1]
    assert request.url.path == f"/v1/conversations/{conversation_id}/chat"
    body = json.loads(request.content)
    assert body == {
        "messages": [{"role": "user", "content": "hi there"}],
        "stream": True,
        "temperature": 0.0,
        "max_tokens": 7,
    }


def test_unset_options_are_left_to_the_server(
    api: ConversationAPI, fake_server: FakeServer
) -> None:
    conversation_id = api.create_conversation()
    list(api.stream_reply(conversation_id, "x"))
    body = json.loads(fake_server.requests[-1].content)
    assert "temperature" not in body and "max_tokens" not in body


def test_api_key_is_sent_as_bearer_token() -> None:
    server = FakeServer(api_key="sekrit")
    api = api_for(server, key="sekrit")
    api.create_conversation()
    assert server.requests[0].headers["authorization"] == "Bearer sekrit"


@pytest.mark.parametrize(("key", "hint"), [(None, "requires an API key"), ("wrong", "rejected")])
def test_bad_or_missing_key(key: str | None, hint: str) -> None:
    with pytest.raises(AuthenticationFailed, match=hint):
        api_for(FakeServer(api_key="sekrit"), key=key).create_conversation()


def test_unknown_conversation(api: ConversationAPI) -> None:
    with pytest.raises(ConversationNotFound, match="conv_nope was not found"):
        api.get_messages("conv_nope")
    with pytest.raises(ConversationNotFound):
        list(api.stream_reply("conv_nope", "hello"))


def test_a_server_without_the_conversation_api_is_named_as_such() -> None:
    not_found = httpx.Response(404, json={"detail": "Not Found"})
    with pytest.raises(NotABitserveServer, match="check --url"):
        answering(not_found).create_conversation()
    with pytest.raises(NotABitserveServer, match="does not look like a bitserve server"):
        answering(httpx.Response(200, text="<html>hello</html>")).create_conversation()
    # python -m http.server takes no POST: it said "The server failed (HTTP 501)"
    unsupported = httpx.Response(501, text="<html>Unsupported method ('POST')</html>")
    with pytest.raises(NotABitserveServer, match="answered 501"):
        answering(unsupported).create_conversation()


@pytest.mark.parametrize(
    ("response", "error", "text"),
    [
        (openai_error(422, "messages: field required"), RequestRejected, "field required"),
        (openai_error(400, "max_tokens must be > 0"), RequestRejected, "max_tokens"),
        (openai_error(503, "queue full", **{"Retry-After": "3"}), ServerBusy, "again in 3 s"),
        (openai_error(503, "queue full"), ServerBusy, "again later"),
        (httpx.Response(500, text="boom"), ServerFailed, "HTTP 500"),
    ],
)
def test_error_statuses(response: httpx.Response, error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text):
        list(answering(response).stream_reply("conv_1", "hi"))


@pytest.mark.parametrize(
    ("frames", "says"),
    [
        (sse(content_chunk("par"), {"error": {"message": "out of memory"}}), "out of memory"),
        # a proxy that ends the stream cleanly mid-reply: the client showed the partial
        # text as a whole reply (exit 0) while the server stored no turn
        (sse(content_chunk("par"))[:-1], "in the middle of a reply"),  # no [DONE]
    ],
)
def test_a_stream_that_fails_or_is_cut_raises_after_the_text_so_far(
    fake_server: FakeServer, frames: list[bytes], says: str
) -> None:
    fake_server.reply_stream = frames
    api = api_for(fake_server)
    conversation_id = api.create_conversation()
    received: list[str] = []
    with pytest.raises(ServerFailed, match=says):
        received.extend(api.stream_reply(conversation_id, "hi"))
    assert received == ["par"]


def test_a_conversation_id_is_one_path_segment(fake_server: FakeServer) -> None:
    """`--conversation 'ID?x=1'` reached the metadata route: every message failed."""
    api = api_for(fake_server)
    with pytest.raises(ConversationNotFound):
        api.get_messages("conv_1?x=1")
    assert fake_server.requests[-1].url.raw_path == b"/v1/conversations/conv_1%3Fx%3D1"


def test_a_non_streaming_answer_is_still_shown() -> None:
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "whole"}}]}
    assert list(answering(httpx.Response(200, json=body)).stream_reply("conv_1", "hi")) == ["whole"]


def test_closing_the_reply_early_closes_the_response(fake_server: FakeServer) -> None:
    api = api_for(fake_server)
    pieces = api.stream_reply(api.create_conversation(), "a long message")
    next(pieces)
    assert fake_server.closed_streams == 0
    pieces.close()
    assert fake_server.closed_streams == 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_nothing_listening_is_one_sentence() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    api = ConversationAPI(url)
    with pytest.raises(ServerUnreachable) as caught:
        api.create_conversation()
    message = str(caught.value)
    assert message.startswith(f"Cannot connect to a bitserve server at {url}")
    assert "\n" not in message and message.endswith("?")


def test_every_error_is_a_chat_client_error() -> None:
    for error in (ServerUnreachable, NotABitserveServer, AuthenticationFailed, ServerFailed):
        assert issubclass(error, ChatClientError)
    assert not AuthenticationFailed.recoverable and ServerUnreachable.recoverable
