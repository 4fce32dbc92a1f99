"""A long conversation costs a chat turn about what a short one does: history is fitted
to the context by stored token counts (a bounded number of prompt encodings, not one per
dropped turn), its cut points stay put from turn to turn (so the prefix cache serves
them), oversize text is refused before it is tokenized, and a conversation is checked at
creation by the rules every chat into it will meet."""

from __future__ import annotations

from typing import Any

import pytest
from api_helpers import AppFactory, chat_body
from fastapi.testclient import TestClient

from bitserve.api.conversations.history import droppable_turns, fit_history
from bitserve.api.served import ServedModel
from bitserve.engine.loader import LoadedModel
from bitserve.store import NewMessage


def history_of(turns: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": "Be terse."}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"question {i}: what about this?"})
        messages.append({"role": "assistant", "content": f"answer {i} is short"})
    return messages


class CountingChat:
    """The chat formatter, counting ``encode`` calls."""

    def __init__(self, chat: Any) -> None:
        self.chat = chat
        self.encodes = 0

    def encode(self, *args: Any, **kwargs: Any) -> list[int]:
        self.encodes += 1
        return list(self.chat.encode(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.chat, name)


@pytest.fixture
def served(loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> ServedModel:
    served = ServedModel.create(loaded, 4, ctx_size=512)
    counting = CountingChat(loaded.chat)
    monkeypatch.setattr(loaded, "chat", counting)
    return served


def fit(served: ServedModel, history: list[dict[str, Any]], max_tokens: int = 64) -> Any:
    tok = served.loaded.tokenizer
    new = [{"role": "user", "content": "and now?"}]
    return fit_history(
        served,
        history,
        [len(tok.encode(m["content"])) for m in history],
        new,
        [len(tok.encode(m["content"])) for m in new],
        max_tokens,
    )


def test_a_thousand_messages_are_fitted_with_a_few_encodings(served: ServedModel) -> None:
    history = history_of(500)  # 1,001 messages, far more than 512 tokens
    counting: CountingChat = served.loaded.chat  # type: ignore[assignment]
    served.message_overhead("user")  # measured once per role, not per fit
    served.message_overhead("assistant")
    served.message_overhead("system")
    served.message_overhead(None)
    counting.encodes = 0
    fitted = fit(served, history)
    assert counting.encodes <= 3  # was one per dropped turn: ~470 here
    assert len(fitted.prompt) + 64 <= 512
    assert fitted.messages[0] == history[0]  # the system message stays
    assert fitted.messages[-1]["content"] == "and now?"
    assert fitted.dropped % 2 == 0 and fitted.dropped > 900
    kept = history[1 + fitted.dropped :]
    assert fitted.messages[1:-1] == kept  # the newest turns, in order, none skipped


def test_the_cut_stays_put_while_the_conversation_grows(served: ServedModel) -> None:
    history = history_of(60)
    starts = []
    for turn in range(6):
        fitted = fit(served, history)
        starts.append(fitted.dropped)
        history += [
            {"role": "user", "content": f"more {turn}"},
            {"role": "assistant", "content": "fine"},
        ]
    # the prompt starts at the same message on (nearly) every turn: one move at most in
    # six turns, so the prefix cache serves the others
    assert len(set(starts)) <= 2, starts
    assert starts == sorted(starts)


def test_droppable_turns_skip_system_messages_and_keep_replies_with_their_turn() -> None:
    roles = ["system", "user", "assistant", "assistant", "system", "user", "user", "assistant"]
    messages = [{"role": r, "content": ""} for r in roles]
    assert droppable_turns(messages) == [[1, 2, 3], [5], [6, 7]]


def test_oversize_text_is_refused_before_tokenizing(make_client: AppFactory) -> None:
    with make_client(max_input_chars=1000) as client:
        big = "x" * 1001
        for path, body in (
            ("/v1/chat/completions", chat_body(big)),
            ("/v1/completions", {"model": "bitnet", "prompt": big}),
            ("/completion", {"prompt": big}),
            ("/tokenize", {"content": big}),
            ("/v1/conversations", {"messages": [{"role": "system", "content": big}]}),
        ):
            r = client.post(path, json=body)
            assert r.status_code == 400, (path, r.text)
            error = r.json()["error"]
            assert error["code"] == "input_too_long" and "1000" in error["message"], path
        conv = client.post("/v1/conversations").json()["id"]
        r = client.post(f"/v1/conversations/{conv}/chat", json=chat_body(big))
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        assert (
            client.post(f"/v1/conversations/{conv}/chat", json=chat_body("x" * 900)).status_code
            == 200
        )


def test_text_in_tools_reasoning_and_calls_counts_toward_the_input_limit(
    make_client: AppFactory,
) -> None:
    """All the text the template renders is counted before tokenizing, not only content."""
    big = "word " * 200
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": big}}
    tool = {"type": "function", "function": {"name": "f", "description": big}}
    cases = (
        {"messages": [{"role": "user", "content": "hi"}], "tools": [tool]},
        {"messages": [{"role": "assistant", "content": "", "reasoning_content": big},
                      {"role": "user", "content": "hi"}]},
        {"messages": [{"role": "assistant", "content": "", "tool_calls": [call]},
                      {"role": "tool", "content": "1", "tool_call_id": "c"}]},
    )  # fmt: skip
    with make_client(max_input_chars=600) as client:
        conv = client.post("/v1/conversations").json()["id"]
        for extra in cases:
            for path in ("/v1/chat/completions", f"/v1/conversations/{conv}/chat"):
                r = client.post(path, json={**chat_body(), **extra})
                assert r.status_code == 400, (path, r.text)
                assert r.json()["error"]["code"] == "input_too_long", (path, r.text)
        r = client.post("/v1/conversations", json={"messages": cases[1]["messages"]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "input_too_long"
        small = {
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f", "description": "word " * 80}}],
        }
        assert client.post("/v1/chat/completions", json={**chat_body(), **small}).status_code == 200
        cjk = {
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [
                {"type": "function", "function": {"name": "f", "description": "查询城市天气" * 80}}
            ],
        }
        answer = client.post("/v1/chat/completions", json={**chat_body(), **cjk})
        assert answer.status_code == 200, answer.text  # 480 characters, not 2880 escapes


def test_the_default_input_limit_is_what_the_context_could_hold(client: TestClient) -> None:
    served: ServedModel = client.app.state.served  # type: ignore[attr-defined]
    tok = served.loaded.tokenizer
    longest = max(len(tok.token_bytes(i)) for i in range(tok.vocab_size))
    assert served.max_input_chars == served.ctx_size * longest
    r = client.post("/v1/chat/completions", json=chat_body("y" * (served.max_input_chars + 1)))
    assert r.status_code == 400 and r.json()["error"]["code"] == "input_too_long"


def test_a_conversation_is_checked_at_creation_by_the_chat_rules(make_client: AppFactory) -> None:
    with make_client(ctx_size=128) as client:
        call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        bad = {"messages": [{"role": "user", "content": "hi", "tool_calls": [call]}]}
        r = client.post("/v1/conversations", json=bad)  # a message the chat format refuses
        assert r.status_code == 400 and "only assistant" in r.json()["error"]["message"]
        long_system = {"messages": [{"role": "system", "content": "word " * 200}]}
        r = client.post("/v1/conversations", json=long_system)
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "context_length_exceeded"
        # history that can be dropped may be longer than the context
        many = [{"role": r, "content": "word " * 10} for r in ("user", "assistant") * 20]
        conv = client.post("/v1/conversations", json={"messages": many}).json()["id"]
        assert client.get("/v1/conversations").json()["data"][0]["id"] == conv
        r = client.post(f"/v1/conversations/{conv}/chat", json=chat_body("hi"))
        assert r.status_code == 200 and r.json()["truncated_messages"] > 0


def test_a_stored_role_the_format_refuses_is_a_400_not_a_500(client: TestClient) -> None:
    """Conversations stored before creation was checked may hold such a message."""
    conv = client.post("/v1/conversations").json()["id"]
    store = client.app.state.store  # type: ignore[attr-defined]
    store.append_turn("", conv, [NewMessage("narrator", "42", 1)])
    prompt = client.get(f"/v1/conversations/{conv}/prompt")
    assert prompt.status_code == 400 and "role" in prompt.json()["error"]["message"]
    chat = client.post(f"/v1/conversations/{conv}/chat", json=chat_body())
    assert chat.status_code == 400
