"""``--max-queue`` bounds every wait: a request that could never fit the queue is a 400
(not a 503 that tells the client to retry), and chats waiting for one conversation's
turn are bounded like the engine's queue (503 + ``Retry-After``)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from api_helpers import AppFactory, chat_body


def test_a_request_larger_than_the_queue_is_400(make_client: AppFactory) -> None:
    with make_client(max_queue=4) as client:
        answer = client.post("/v1/chat/completions", json=chat_body(n=5))
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "n"
        prompts = {"model": "bitnet", "prompt": ["a", "b", "c"], "n": 2, "max_tokens": 2}
        answer = client.post("/v1/completions", json=prompts)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "prompt"
        assert "--max-queue" in answer.json()["error"]["message"]
        # what fits is served
        assert client.post("/v1/chat/completions", json=chat_body(n=4)).status_code == 200
        scoring = {**prompts, "max_tokens": 0, "echo": True, "logprobs": 0}
        assert client.post("/v1/completions", json=scoring).status_code == 200


def test_chats_waiting_for_one_conversation_are_bounded(make_client: AppFactory) -> None:
    with make_client(max_queue=2) as client:
        conv = client.post("/v1/conversations").json()["id"]
        locks = client.app.state.conversations.locks  # type: ignore[attr-defined]
        release = client.portal.call(locks.acquire, conv)  # type: ignore[union-attr]  # a turn in progress
        answers: list[Any] = []

        def chat() -> None:
            answers.append(client.post(f"/v1/conversations/{conv}/chat", json=chat_body()))

        waiting = [threading.Thread(target=chat) for _ in range(2)]
        for thread in waiting:
            thread.start()
        deadline = time.monotonic() + 10
        while locks._locks[conv][1] < 3 and time.monotonic() < deadline:
            time.sleep(0.01)  # both are waiting for the turn in progress
        third = client.post(f"/v1/conversations/{conv}/chat", json=chat_body())
        assert third.status_code == 503 and third.json()["error"]["code"] == "queue_full"
        assert int(third.headers["retry-after"]) >= 1
        client.portal.call(release)  # type: ignore[union-attr]
        for thread in waiting:
            thread.join(30)
        assert [a.status_code for a in answers] == [200, 200]
        messages = client.get(f"/v1/conversations/{conv}").json()["messages"]
        assert len(messages) == 4  # the two waiting turns, one after the other


def test_echo_scoring_is_bounded_by_the_queue_too(make_client: AppFactory) -> None:
    """Scoring a prompt is an engine call, not a generation: a change that counted only
    generations let 40 scoring requests queue past --max-queue 2."""
    with make_client(max_queue=2) as client:
        engine = client.app.state.served.engine  # type: ignore[attr-defined]
        gate = threading.Event()
        blocker = client.portal.start_task_soon(engine.call, lambda _: gate.wait(30))  # type: ignore[union-attr]
        deadline = time.monotonic() + 10
        while engine.queue_depth > 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # the engine is inside the blocking call
        scoring = {"model": "bitnet", "prompt": "a b c", "max_tokens": 0, "echo": True,
                   "logprobs": 0}  # fmt: skip
        answers: list[Any] = []

        def score() -> None:
            answers.append(client.post("/v1/completions", json=scoring))

        threads = [threading.Thread(target=score) for _ in range(5)]
        for thread in threads:
            thread.start()
            time.sleep(0.05)
        while sum(a.status_code == 503 for a in answers) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()
        for thread in threads:
            thread.join(30)
        blocker.result(30)
        assert sorted(a.status_code for a in answers) == [200, 200, 503, 503, 503]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/completion", {"prompt": "a b c", "n_predict": 2}),
        ("/v1/completions", {"model": "bitnet", "prompt": "a b c", "max_tokens": 2}),
        ("/v1/chat/completions", chat_body()),
    ],
)
def test_a_full_queue_is_a_503_before_a_stream_starts(
    make_client: AppFactory, path: str, body: dict[str, Any]
) -> None:
    """llama.cpp's /completion submitted its generation inside the stream: a full queue
    was a 200 whose one event said queue_full, with no Retry-After to retry by."""
    with make_client(max_queue=1) as client:
        engine = client.app.state.served.engine  # type: ignore[attr-defined]
        running, gate = threading.Event(), threading.Event()

        def block(_: object) -> None:
            running.set()
            gate.wait(30)

        portal = client.portal  # type: ignore[union-attr]
        blocker = portal.start_task_soon(engine.call, block)
        assert running.wait(10)  # the engine is inside the blocking call
        queued = portal.start_task_soon(engine.call, lambda _: None)  # the queue's one place
        deadline = time.monotonic() + 10
        while engine.queue_depth < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            answer = client.post(path, json={**body, "stream": True})
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "queue_full"
            assert int(answer.headers["retry-after"]) >= 1
        finally:
            gate.set()
            blocker.result(30)
            queued.result(30)
