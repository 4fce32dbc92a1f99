"""Conversation replies keep the token ids the model generated, so the next turn's prompt
starts with exactly the tokens the engine processed (what the prefix cache matches on)."""

from __future__ import annotations

import time

import pytest
from api_helpers import AppFactory, chat_body, sse_events
from fastapi.testclient import TestClient

from bitserve.api.conversations.serving import next_turn_prefix, reply_token_ids
from bitserve.api.served import ServedModel
from bitserve.engine.types import TokenEvent
from bitserve.store import NewMessage, StoredMessage

FIRST, SECOND = "Hello, how are you?", "And what did I ask you?"


def stored_user(stored: list[StoredMessage]) -> dict[str, str]:
    assert stored[0].role == "user"
    return {"role": "user", "content": stored[0].content}


@pytest.mark.parametrize("stream", [False, True])
def test_followup_prompt_extends_the_first_turn_token_for_token(
    client: TestClient, stream: bool
) -> None:
    served: ServedModel = client.app.state.served  # type: ignore[attr-defined]
    conv = client.post("/v1/conversations", json={}).json()["id"]
    first = chat_body(FIRST, temperature=0, max_tokens=12, stream=stream)
    r = client.post(f"/v1/conversations/{conv}/chat", json=first)
    assert r.status_code == 200, r.text
    if stream:
        assert sse_events(r.text)[-1] == "[DONE]"
    prompt1 = served.loaded.chat.encode([{"role": "user", "content": FIRST}])
    stored = client.app.state.store.messages("", conv)  # type: ignore[attr-defined]
    ids = stored[1].token_ids
    assert ids is not None
    # the ids are the reply's tokens: they decode to its text, one per generated token
    # (the stop token, if the reply ended on one, left out)
    tok = served.loaded.tokenizer
    assert tok.decode(list(ids)) == stored[1].content
    ended_on_stop = stored[1].finish_reason == "stop"
    assert len(ids) == stored[1].completion_tokens - ended_on_stop
    assert stored[1].tokens == len(ids)
    expected = list(ids)
    shown = client.get(f"/v1/conversations/{conv}/prompt").json()  # uses the ids too
    reply = {"role": "assistant", "content": stored[1].content, "token_ids": expected}
    assert shown["prompt_tokens"] == len(served.loaded.chat.encode([stored_user(stored), reply]))

    settled(client)  # the client reads the reply: the engine computes ahead meanwhile
    second = client.post(f"/v1/conversations/{conv}/chat", json=chat_body(SECOND, max_tokens=2))
    history = client.app.state.store.messages("", conv)[:2]  # type: ignore[attr-defined]
    messages = [{"role": m.role, "content": m.content, "token_ids": m.token_ids} for m in history]
    prompt2 = served.loaded.chat.encode([*messages, {"role": "user", "content": SECOND}])
    eot = served.loaded.tokenizer.eot_id
    head = [*prompt1, *expected, eot]
    assert prompt2[: len(head)] == head
    usage = second.json()["usage"]
    assert usage["prompt_tokens"] == len(prompt2)
    # the prefix cache served turn 1, and the engine computed the start of turn 2 (up to
    # the new message's text) while the client read the reply
    user = stored_user(stored)
    ahead = next_turn_prefix(
        served, [user], NewMessage("assistant", reply["content"], 0, token_ids=ids)
    )
    assert ahead is not None and ahead[: len(head)] == head and prompt2[: len(ahead)] == ahead
    assert usage["prompt_tokens_details"]["cached_tokens"] == len(ahead)


def test_clients_cannot_supply_token_ids(client: TestClient) -> None:
    forged = {"role": "assistant", "content": "hi", "token_ids": [1, 2, 3]}
    r = client.post("/v1/conversations", json={"messages": [forged]})
    conv = r.json()["id"]
    body = chat_body(SECOND, max_tokens=1)
    body["messages"].insert(0, forged)
    assert client.post(f"/v1/conversations/{conv}/chat", json=body).status_code == 200
    stored = client.app.state.store.messages("", conv)  # type: ignore[attr-defined]
    assert [m.role for m in stored] == ["assistant", "assistant", "user", "assistant"]
    assert [m.token_ids for m in stored[:3]] == [None, None, None]
    assert stored[3].token_ids is not None


def event(token_id: int, finish: str | None = None) -> TokenEvent:
    return TokenEvent(token_id, "x", finish_reason=finish)


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        ([event(5), event(6), event(9, "stop")], (5, 6)),  # stop token: the template adds it
        ([event(5), event(6, "length")], (5, 6)),
        ([event(9, "stop")], ()),
        ([], ()),
        ([event(5), event(6, "stop")], (5, 6)),  # the grammar completed: every id is text
        # a stop string cut the text inside the ids
        ([event(5), TokenEvent(6, "", finish_reason="stop", stop_string="x")], None),
        ([event(5), TokenEvent(9, "", finish_reason="stop", stop_string="x")], None),
    ],
)
def test_reply_token_ids(events: list[TokenEvent], expected: tuple[int, ...] | None) -> None:
    assert reply_token_ids(events, {9}) == expected


def test_a_reply_its_grammar_ended_keeps_its_ids(client: TestClient) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    conv = client.post("/v1/conversations", json={}).json()["id"]
    body = chat_body(FIRST, temperature=0, max_tokens=40, response_format=fmt)
    assert client.post(f"/v1/conversations/{conv}/chat", json=body).status_code == 200
    reply = client.app.state.store.messages("", conv)[1]  # type: ignore[attr-defined]
    assert reply.finish_reason == "stop" and reply.content in ('{"ok": true}', '{"ok": false}')
    assert reply.token_ids is not None  # the next turn's prompt extends this one's tokens
    served: ServedModel = client.app.state.served  # type: ignore[attr-defined]
    assert served.loaded.tokenizer.decode(list(reply.token_ids)) == reply.content


def settled(client: TestClient) -> None:
    """Wait until the prefill ahead queued after the last turn is done: the task that
    fits and encodes it has finished, and then the engine's counter stays put for three
    polls in a row with nothing queued (its pieces queue one another)."""
    served: ServedModel = client.app.state.served  # type: ignore[attr-defined]
    service = client.app.state.conversations  # type: ignore[attr-defined]
    engine, stable, last = served.engine, 0, -1
    assert engine.scheduler is not None
    deadline = time.monotonic() + 30
    while stable < 3:
        assert time.monotonic() < deadline, "the prefill ahead did not settle"
        time.sleep(0.05)
        now = engine.scheduler.stats.prefilled_ahead
        quiet = not service._background and engine.queue_depth == 0 and now == last
        stable, last = stable + 1 if quiet else 0, now


def test_a_turn_whose_history_cut_moves_finds_its_kept_history_computed_ahead(
    make_client: AppFactory,
) -> None:
    """Once per half context of conversation the oldest turns are left out and the prompt
    starts anew (the cut moves): the prefill ahead after the turn before has computed the
    history the next turn keeps, so such a turn, too, computes only its own message."""
    with make_client(ctx_size=256) as client:
        served: ServedModel = client.app.state.served  # type: ignore[attr-defined]
        conv = client.post("/v1/conversations", json={}).json()["id"]
        no_stop = {str(t): -100.0 for t in served.loaded.tokenizer.stop_ids}
        cuts, dropped = 0, 0
        for i in range(24):
            body = chat_body(f"Question {i}: and what comes after {i}?", temperature=0)
            body["logit_bias"] = no_stop
            answer = client.post(f"/v1/conversations/{conv}/chat", json=body).json()
            usage = answer["usage"]
            uncached = usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
            # its message and generation prompt (~16 tokens), the template's start of a
            # turn when the cut was foreseen a turn early (~7); a missed cut: ~100
            if i > 0:
                assert uncached <= 32, (i, answer["truncated_messages"], usage)
            cuts += answer["truncated_messages"] > dropped > 0
            dropped = answer["truncated_messages"]
            settled(client)
        assert cuts >= 2  # the cut moved at least twice after the first one
