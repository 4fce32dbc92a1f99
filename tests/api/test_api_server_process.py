"""End-to-end: the real server process on the demo model, driven by the official
``openai`` package and by plain HTTP (every command of the BitNet API guide), plus
disconnect cancellation, a full queue, restarts and ``kill -9`` with the store intact."""

from __future__ import annotations

import itertools
import json
import signal
import socket
import sqlite3
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import requests
from api_server import REPO, Server, metric, start
from openai.types.chat import ChatCompletion

from bitserve.api.process import start_server
from bitserve.engine.loader import LoadedModel
from bitserve.model.demo import DEMO_NOTICE


@pytest.fixture(scope="module")
def no_stop(loaded: LoadedModel) -> dict[str, float]:
    """``logit_bias`` suppressing the demo tokenizer's stop tokens: replies run long."""
    return {str(t): -100.0 for t in loaded.tokenizer.stop_ids}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start(tmp_path_factory.mktemp("e2e"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def sdk(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_demo_model_says_so(server: Server) -> None:
    assert DEMO_NOTICE in server.log()
    assert requests.get(f"{server.url}/health", timeout=10).json()["demo"] is True


def test_every_command_of_the_guide(server: Server) -> None:
    url = server.url
    conv_id = requests.post(f"{url}/v1/conversations", timeout=10).json()["conversation_id"]
    for content in ("Hello, how are you?", "What did I just ask you?"):
        body = {"model": "bitnet", "messages": [{"role": "user", "content": content}],
                "temperature": 0.7, "max_tokens": 100}  # fmt: skip
        r = requests.post(f"{url}/v1/conversations/{conv_id}/chat", json=body, timeout=60)
        assert isinstance(r.json()["choices"][0]["message"]["content"], str)
    conv = requests.get(f"{url}/v1/conversations/{conv_id}", timeout=10).json()
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant"] * 2
    r = requests.post(
        f"{url}/completion",
        json={"prompt": "What is artificial intelligence?", "temperature": 0.7, "n_predict": 100},
        timeout=60,
    )
    assert isinstance(r.json()["content"], str)
    messages = [
        {"role": "system", "content": "You are a helpful AI assistant."},
        {"role": "user", "content": "What is artificial intelligence?"},
    ]
    body = {"model": "bitnet", "messages": messages, "temperature": 0.7, "max_tokens": 150}
    r = requests.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"


def test_openai_sdk_chat_non_streaming(sdk: openai.OpenAI) -> None:
    reply = sdk.chat.completions.create(
        model="bitnet",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=8,
        logprobs=True,
        top_logprobs=2,
    )
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    assert reply.choices[0].logprobs is not None and reply.choices[0].logprobs.content


def test_openai_sdk_chat_streaming_with_logprobs(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model="bitnet",
        messages=[{"role": "user", "content": "Tell me a story"}],
        max_tokens=10,
        stream=True,
        logprobs=True,
        top_logprobs=3,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    entries = [
        e for c in chunks if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content or []
    ]  # fmt: skip
    assert entries and all(len(e.top_logprobs) == 3 for e in entries)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")


def test_openai_sdk_conversation(sdk: openai.OpenAI) -> None:
    conv = sdk.conversations.create(metadata={"title": "sdk"})
    assert conv.id.startswith("conv_") and conv.metadata == {"title": "sdk"}
    body = {"messages": [{"role": "user", "content": "Remember 42"}], "max_tokens": 5}
    first = sdk.post(f"/conversations/{conv.id}/chat", cast_to=ChatCompletion, body=body)
    second = sdk.post(f"/conversations/{conv.id}/chat", cast_to=ChatCompletion, body=body)
    assert first.usage is not None and second.usage is not None
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    assert sdk.conversations.retrieve(conv.id).id == conv.id
    # initial items as the SDK sends them (Conversations API message items)
    seeded = sdk.conversations.create(
        items=[
            {"type": "message", "role": "system", "content": "Be brief."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        ]
    )
    stored = sdk.get(f"/conversations/{seeded.id}", cast_to=dict[str, Any])
    assert [(m["role"], m["content"]) for m in stored["messages"]] == [
        ("system", "Be brief."),
        ("user", "Hi"),
    ]


def test_openai_sdk_typed_errors(sdk: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="gpt-9", messages=messages)
    with pytest.raises(openai.NotFoundError):
        sdk.conversations.retrieve("conv_1_999")
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(model="bitnet", messages=messages, temperature=5)
    assert bad.value.param == "temperature"  # type: ignore[attr-defined]
    with pytest.raises(openai.UnprocessableEntityError):
        sdk.chat.completions.create(model="bitnet", messages=messages, temperature="hot")  # type: ignore[arg-type]


def test_openai_sdk_authentication_error(tmp_path: Path) -> None:
    keyed = start(tmp_path, "--api-key", "right")
    try:
        wrong = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="right", max_retries=0)
        assert right.models.list().data[0].id == "demo-v1"
    finally:
        keyed.stop()


def long_stream_request(
    url: str, no_stop: dict[str, float], conv: str | None = None
) -> tuple[str, dict[str, Any]]:
    path = f"/v1/conversations/{conv}/chat" if conv else "/v1/chat/completions"
    body = {"model": "bitnet", "messages": [{"role": "user", "content": "Talk forever."}],
            "max_tokens": 1800, "stream": True, "logit_bias": no_stop}  # fmt: skip
    return url + path, body


def read_chunks(response: httpx.Response, n: int) -> Iterator[str]:
    """Read ``n`` SSE events; returns the line iterator, which the caller must keep: closing
    it (or breaking out of a for loop over it) closes the connection, i.e. disconnects."""
    lines = response.iter_lines()
    seen = 0
    while seen < n:
        if next(lines).startswith("data: "):
            seen += 1
    return lines


def test_client_disconnect_cancels_generation(server: Server, no_stop: dict[str, float]) -> None:
    cancelled = metric(server.url, "bitserve_requests_cancelled_total")
    url, body = long_stream_request(server.url, no_stop)
    with httpx.Client(timeout=60) as client, client.stream("POST", url, json=body) as r:
        read_chunks(r, 5).close()  # the client goes away mid-reply
    deadline = time.monotonic() + 10
    while metric(server.url, "bitserve_requests_cancelled_total") == cancelled:
        assert time.monotonic() < deadline, "generation was not cancelled"
        time.sleep(0.05)
    generated = metric(server.url, "bitserve_tokens_generated_total")
    time.sleep(0.5)
    assert metric(server.url, "bitserve_tokens_generated_total") == generated  # it stopped
    assert metric(server.url, "bitserve_busy") == 0
    started = time.monotonic()
    r2 = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                    json={"model": "bitnet", "messages": [{"role": "user", "content": "hi"}],
                          "max_tokens": 2})  # fmt: skip
    assert r2.status_code == 200 and time.monotonic() - started < 10


def test_client_disconnect_cancels_a_non_streamed_generation(
    server: Server, no_stop: dict[str, float]
) -> None:
    """No response stream to fail on: the guard's watcher alone sees the client leave."""
    cancelled = metric(server.url, "bitserve_requests_cancelled_total")
    url, body = long_stream_request(server.url, no_stop)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(url, json={**body, "stream": False}, timeout=httpx.Timeout(10, read=0.3))
    deadline = time.monotonic() + 10
    while metric(server.url, "bitserve_requests_cancelled_total") == cancelled:
        assert time.monotonic() < deadline, "generation was not cancelled"
        time.sleep(0.05)
    while metric(server.url, "bitserve_busy") != 0:  # the engine's counters settle
        assert time.monotonic() < deadline, "the engine stayed busy"
        time.sleep(0.05)


def chat_at_once(base_url: str, conv: str, contents: list[str], max_tokens: int) -> list[int]:
    """Each content a user message to one conversation, all sent at the same time, each
    from its own thread; the status codes, in the order the replies came."""
    statuses: list[int] = []

    def chat(content: str) -> None:
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
        r = httpx.post(f"{base_url}/v1/conversations/{conv}/chat", json=body, timeout=120)
        statuses.append(r.status_code)

    threads = [threading.Thread(target=chat, args=(content,)) for content in contents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def test_concurrent_chats_to_one_conversation_never_interleave(server: Server) -> None:
    conv = httpx.post(f"{server.url}/v1/conversations", timeout=10).json()["id"]
    statuses = chat_at_once(server.url, conv, [f"message {i}" for i in range(4)], max_tokens=4)
    assert statuses == [200] * 4
    messages = httpx.get(f"{server.url}/v1/conversations/{conv}", timeout=10).json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 4
    # each reply's prompt holds every earlier turn: prompts grow strictly
    prompts = [m["prompt_tokens"] for m in messages if m["role"] == "assistant"]
    assert prompts == sorted(prompts) and len(set(prompts)) == 4


def test_a_chat_waits_for_the_turn_stored_as_its_client_left(server: Server) -> None:
    """Chat A streams; B waits for A's turn; A's client leaves (a reset) right after the
    finish chunk, while A's turn is being stored. B must still see A's turn: every reply's
    prompt holds every turn stored before it."""
    conv = httpx.post(f"{server.url}/v1/conversations", timeout=10).json()["id"]
    host, port = server.url.removeprefix("http://").split(":")
    path = f"/v1/conversations/{conv}/chat"
    client = httpx.Client(base_url=server.url, timeout=60)  # connected: B queues at once
    client.get("/health")
    for i in range(30):  # the race was lost in 5-8 of 30 rounds, mostly past round 15
        body = json.dumps({"messages": [{"role": "user", "content": f"A{i}"}],
                           "max_tokens": 5, "stream": True}).encode()  # fmt: skip
        a = socket.create_connection((host, int(port)))
        a.sendall(b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body))  # fmt: skip
        time.sleep(0.005)
        b = threading.Thread(
            target=client.post,
            args=(path,),
            kwargs={"json": {"messages": [{"role": "user", "content": f"B{i}"}], "max_tokens": 2}},
        )
        b.start()
        seen = b""
        while b'"finish_reason":"' not in seen and (more := a.recv(65536)):
            seen += more
        a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        a.close()
        b.join()
    client.close()
    messages = httpx.get(f"{server.url}{path.removesuffix('/chat')}", timeout=10).json()["messages"]
    replies = [m for m in messages if m["role"] == "assistant"]
    assert len(replies) >= 30
    for before, after in itertools.pairwise(replies):
        assert after["prompt_tokens"] > before["prompt_tokens"] + before["tokens"], (before, after)


def test_head_is_served_wherever_get_is(server: Server) -> None:
    """Load balancers check health with HEAD: it was a 405 whose Allow named HEAD."""

    def counted(route: str) -> float:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        line = f'bitserve_http_requests_total{{route="{route}",status="200"}} '
        return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(line))

    unmatched, health = counted("unmatched"), counted("/health")
    for path in ("/health", "/v1/models", "/metrics", "/v1/conversations", "/"):
        got = httpx.get(server.url + path, timeout=10)
        head = httpx.head(server.url + path, timeout=10)
        assert head.status_code == got.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"]
    assert counted("/health") == health + 2  # a HEAD probe counts under its route
    assert counted("unmatched") == unmatched
    r = httpx.head(server.url + "/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_a_client_leaving_mid_body_is_no_server_error(server: Server) -> None:
    """It counted as a 500 in /metrics and logged two tracebacks, each time: any client
    could trip 5xx alerts and flood the log. Now a quiet 499 (nginx's 'client closed')."""
    conv = httpx.post(f"{server.url}/v1/conversations", timeout=10).json()["id"]
    host, port = server.url.removeprefix("http://").split(":")
    log_before = len(server.log())
    paths = [
        "/v1/chat/completions",
        "/completion",
        "/v1/conversations",
        f"/v1/conversations/{conv}/chat",
    ]
    for path in paths:
        with socket.create_connection((host, int(port))) as s:
            head = b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n" % path.encode()
            s.sendall(head + b'Content-Type: application/json\r\n\r\n{"messages": [')
            time.sleep(0.2)
    deadline = time.monotonic() + 10
    counts = httpx.get(f"{server.url}/metrics", timeout=10).text
    while counts.count('status="499"') < len(paths):
        assert time.monotonic() < deadline, counts
        time.sleep(0.1)
        counts = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert 'status="500"' not in counts
    assert "Traceback" not in server.log()[log_before:]


@pytest.mark.parametrize(
    ("sig", "grace", "ending"),
    [
        (signal.SIGTERM, "60", "[DONE]"),  # the replies finish within the grace (two of
        # 1800 tokens: ~3 s on an idle machine, far more beside a build)
        (signal.SIGINT, "0", '"code":"cancelled"'),  # none: it ends with the error event
        (signal.SIGTERM, "0", '"code":"cancelled"'),
    ],
)
def test_stopping_the_server_lets_replies_finish_then_ends_them_with_an_event(
    tmp_path: Path, no_stop: dict[str, float], sig: signal.Signals, grace: str, ending: str
) -> None:
    """Ctrl-C with a long reply streaming: uvicorn waited 5 s, cancelled the task with a
    60-line traceback and cut the stream with no event. Replies in flight now get
    --shutdown-grace to finish; what still runs then ends with the 'server is stopping'
    error event."""
    s = start(tmp_path, "--shutdown-grace", grace)
    try:
        url, body = long_stream_request(s.url, no_stop)
        events: list[str] = []
        plain: list[httpx.Response] = []
        side = threading.Thread(target=lambda: plain.append(
            httpx.post(url, json={**body, "stream": False}, timeout=60)))  # fmt: skip
        with httpx.Client(timeout=60) as client, client.stream("POST", url, json=body) as r:
            lines = read_chunks(r, 5)
            side.start()
            deadline = time.monotonic() + 30  # the side request generating: not 0.2 s of
            while metric(s.url, "bitserve_requests_running") < 2:  # hope (under load it had
                assert time.monotonic() < deadline  # not connected when the server stopped)
                time.sleep(0.05)
            s.process.send_signal(sig)
            events = [line for line in lines if line.startswith("data: ")]
        side.join(30)
        if grace == "0":  # a whole-reply request still running: a 503, quietly
            assert plain[0].status_code == 503 and plain[0].json()["error"]["code"] == "cancelled"
        assert ending in events[-1].replace(" ", ""), events[-3:]
        if ending == "[DONE]":
            assert len(events) > 100  # the whole reply, not a cut one
        # uvicorn raises the signal again once shut down: the conventional statuses
        assert s.process.wait(timeout=15) == (130 if sig == signal.SIGINT else -sig)
        assert "Traceback" not in s.log() and "Cancel " not in s.log(), s.log_tail()
    finally:
        s.stop()


def test_full_queue_is_503_with_retry_after(tmp_path: Path, no_stop: dict[str, float]) -> None:
    # one running sequence, so B really waits in the queue (with batching it would join A)
    s = start(tmp_path, "--max-queue", "1", "--max-batch", "1")
    try:
        url, body = long_stream_request(s.url, no_stop)
        with (
            httpx.Client(timeout=60) as client,
            client.stream("POST", url, json=body) as running,
        ):
            kept = read_chunks(running, 2)  # A is generating
            with client.stream("POST", url, json=body) as waiting:  # B waits in the queue
                assert waiting.status_code == 200
                r = client.post(url, json={**body, "stream": False})
                assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
                assert r.json()["error"]["code"] == "queue_full"
                # the refused request never entered the engine: nothing was cancelled
                # (checked while B still waits: closing B's stream would cancel B)
                assert metric(s.url, "bitserve_requests_cancelled_total") == 0
            kept.close()
    finally:
        s.stop()


def test_restart_and_kill_9_keep_every_stored_turn(
    tmp_path: Path, no_stop: dict[str, float]
) -> None:
    db = tmp_path / "keep.db"
    first = start(tmp_path / "a", db=db)
    try:
        conv = httpx.post(f"{first.url}/v1/conversations", json={"metadata": {"title": "k"}},
                          timeout=10).json()["id"]  # fmt: skip
        for text in ("first turn", "second turn"):
            body = {"messages": [{"role": "user", "content": text}], "max_tokens": 4}
            assert httpx.post(f"{first.url}/v1/conversations/{conv}/chat", json=body,
                              timeout=60).status_code == 200  # fmt: skip
    finally:
        first.stop()
    # a clean restart (through the guide's launcher) keeps everything
    launcher = [sys.executable, str(REPO / "bitnet_fast.py")]
    second = start(tmp_path / "b", db=db, launcher=launcher)
    try:
        before = httpx.get(f"{second.url}/v1/conversations/{conv}", timeout=10).json()
        assert before["metadata"] == {"title": "k"} and len(before["messages"]) == 4
        # kill -9 in the middle of a reply
        url, body = long_stream_request(second.url, no_stop, conv)
        with httpx.Client(timeout=60) as client, client.stream("POST", url, json=body) as r:
            kept = read_chunks(r, 5)
            assert metric(second.url, "bitserve_busy") == 1  # still generating when killed
            second.kill9()
            kept.close()
    finally:
        second.stop()  # a no-op after the kill; never leaves a server behind on failure
    with sqlite3.connect(db) as check:
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    third = start(tmp_path / "c", db=db)
    try:
        after = httpx.get(f"{third.url}/v1/conversations/{conv}", timeout=10).json()
        # the user's message is kept (it was lost with the reply); the reply reads as
        # interrupted, never as a complete answer
        assert after["messages"][:4] == before["messages"]
        kept = [(m["role"], m["content"], m["finish_reason"]) for m in after["messages"][4:]]
        assert kept == [("user", "Talk forever.", None), ("assistant", "", "interrupted")]
        body = {"messages": [{"role": "user", "content": "third turn"}], "max_tokens": 4}
        r2 = httpx.post(f"{third.url}/v1/conversations/{conv}/chat", json=body, timeout=60)
        assert r2.status_code == 200
        messages = httpx.get(f"{third.url}/v1/conversations/{conv}", timeout=10).json()["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * 4
        assert messages[-1]["finish_reason"] in ("stop", "length")
    finally:
        third.stop()


def test_kill_9_mid_reply_on_postgresql_keeps_the_message_and_replicas_take_turns(
    tmp_path: Path, no_stop: dict[str, float], postgres_url: str
) -> None:
    """Two replicas on one PostgreSQL database: one is killed mid-reply (its row lock goes
    with its connection), and the other serves the conversation at once, with the user's
    message kept and the reply marked interrupted; chats then sent to the survivor at the
    same time take turns."""
    a = start_server(["--db", postgres_url], tmp_path / "a")
    b = start_server(["--db", postgres_url], tmp_path / "b")
    try:
        conv = httpx.post(f"{a.url}/v1/conversations", timeout=10).json()["id"]
        url, body = long_stream_request(a.url, no_stop, conv)
        with httpx.Client(timeout=60) as client, client.stream("POST", url, json=body) as r:
            kept = read_chunks(r, 5)
            a.kill9()
            kept.close()
        stored = httpx.get(f"{b.url}/v1/conversations/{conv}", timeout=10).json()["messages"]
        said = [(m["role"], m["content"], m["finish_reason"]) for m in stored]
        assert said == [("user", "Talk forever.", None), ("assistant", "", "interrupted")]
        statuses = chat_at_once(b.url, conv, ["m0", "m1", "m2"], max_tokens=3)
        assert statuses == [200] * 3
        messages = httpx.get(f"{b.url}/v1/conversations/{conv}", timeout=10).json()["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * 4
        assert {m["content"] for m in messages[2::2]} == {"m0", "m1", "m2"}
        prompts = [m["prompt_tokens"] for m in messages[1::2]]
        assert prompts == sorted(prompts) and len(set(prompts)) == 4
    finally:
        a.stop()
        b.stop()
