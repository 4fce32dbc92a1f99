"""``POST /v1/chat/completions`` in-process: OpenAI's exact shapes, streaming order,
logprobs, sampling parameters."""

from __future__ import annotations

import math

from api_helpers import chat_body, sse_events
from fastapi.testclient import TestClient


def test_non_streaming_has_every_required_field(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and body["model"] == "demo-v1"
    assert body["system_fingerprint"].startswith("fp_")
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["message"]["role"] == "assistant" and isinstance(
        choice["message"]["content"], str
    )
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}


def test_prompt_tokens_match_the_chat_format(client: TestClient) -> None:
    messages = [
        {"role": "system", "content": "You are a helpful AI assistant."},
        {"role": "user", "content": "What is artificial intelligence?"},
    ]
    r = client.post("/v1/chat/completions", json=chat_body(messages=messages))
    expected = client.app.state.served.loaded.chat.encode(messages)  # type: ignore[attr-defined]
    assert r.json()["usage"]["prompt_tokens"] == len(expected)


def test_streaming_follows_openais_sequence(client: TestClient) -> None:
    body = chat_body(stream=True, stream_options={"include_usage": True}, max_tokens=6)
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finish = chunks[-2]["choices"][0]
    assert finish["delta"] == {} and finish["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert all(c["usage"] is None for c in chunks[:-1])
    middle = chunks[1:-2]
    assert all(c["choices"][0]["finish_reason"] is None for c in middle)


def test_stream_text_equals_non_stream_text_for_a_seed(client: TestClient) -> None:
    body = chat_body(temperature=1.0, seed=7, max_tokens=10)
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    events = sse_events(client.post("/v1/chat/completions", json={**body, "stream": True}).text)
    streamed = "".join(
        e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"]
    )
    assert streamed == whole["content"]


def test_without_include_usage_chunks_have_no_usage_key(client: TestClient) -> None:
    events = sse_events(client.post("/v1/chat/completions", json=chat_body(stream=True)).text)
    assert all("usage" not in e for e in events[:-1])


def test_logprobs_non_streaming(client: TestClient) -> None:
    body = chat_body(logprobs=True, top_logprobs=3, temperature=0, max_tokens=5)
    choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert 1 <= len(content) <= 5
    for entry in content:
        assert entry["logprob"] <= 0 and isinstance(entry["bytes"], list)
        assert len(entry["top_logprobs"]) == 3
        # greedy: the chosen token is the most likely one
        assert math.isclose(entry["logprob"], entry["top_logprobs"][0]["logprob"], abs_tol=1e-5)
        assert entry["token"] == entry["top_logprobs"][0]["token"]
    assert choice["logprobs"]["refusal"] is None


def test_logprobs_streaming(client: TestClient) -> None:
    body = chat_body(logprobs=True, top_logprobs=2, stream=True, max_tokens=5, temperature=0)
    events = sse_events(client.post("/v1/chat/completions", json=body).text)[:-1]
    entries = [
        lp
        for e in events
        if e["choices"] and e["choices"][0]["logprobs"]
        for lp in e["choices"][0]["logprobs"]["content"]
    ]
    assert entries and all(len(e["top_logprobs"]) == 2 for e in entries)


def test_seed_makes_sampling_reproducible_and_n_gives_choices(client: TestClient) -> None:
    body = chat_body(temperature=1.5, seed=123, max_tokens=12, n=2)
    a = client.post("/v1/chat/completions", json=body).json()
    b = client.post("/v1/chat/completions", json=body).json()
    assert [c["index"] for c in a["choices"]] == [0, 1]
    texts = [c["message"]["content"] for c in a["choices"]]
    assert texts == [c["message"]["content"] for c in b["choices"]]
    assert (
        a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"]
    )  # counted once, not per choice
    assert 2 <= a["usage"]["completion_tokens"] <= 24


def test_n_choices_are_generated_together_and_streamed_interleaved(client: TestClient) -> None:
    """The choices join the batch at once: their chunks interleave (each with its index),
    and each choice streams the text the non-streamed answer gives it."""
    body = chat_body(temperature=0.9, seed=7, max_tokens=10, n=3, logprobs=True)
    plain = client.post("/v1/chat/completions", json=body).json()
    events = sse_events(client.post("/v1/chat/completions", json={**body, "stream": True}).text)
    chunks = [e for e in events if e != "[DONE]"]
    assert [c["choices"][0]["delta"].get("role") for c in chunks[:3]] == ["assistant"] * 3
    indices = [
        c["choices"][0]["index"] for c in chunks[3:] if c["choices"][0]["finish_reason"] is None
    ]
    assert indices != sorted(indices)  # interleaved, not one choice after another
    finished = {
        c["choices"][0]["index"]: c["choices"][0]["finish_reason"]
        for c in chunks
        if c["choices"][0]["finish_reason"]
    }
    for choice in plain["choices"]:
        i = choice["index"]
        text = "".join(
            c["choices"][0]["delta"].get("content") or ""
            for c in chunks[3:]
            if c["choices"][0]["index"] == i
        )
        assert text == choice["message"]["content"] and finished[i] == choice["finish_reason"]


def test_max_completion_tokens_and_default_max_tokens(client: TestClient) -> None:
    body = chat_body(max_completion_tokens=3)
    body.pop("max_tokens")
    assert client.post("/v1/chat/completions", json=body).json()["usage"]["completion_tokens"] <= 3
    eos = client.app.state.served.stop_token_ids  # type: ignore[attr-defined]
    no_stop = {str(t): -100 for t in eos}
    body = {
        "model": "bitnet",
        "messages": [{"role": "user", "content": "hi"}],
        "logit_bias": no_stop,
    }
    usage = client.post("/v1/chat/completions", json=body).json()["usage"]
    assert usage["completion_tokens"] == 100  # the guide's default max_tokens


def test_stop_string_cuts_the_reply(client: TestClient) -> None:
    body = chat_body(temperature=0, max_tokens=20)
    text = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert len(text) >= 5, text  # the demo model's greedy reply to this prompt
    cut = text[2:5]
    stopped = client.post("/v1/chat/completions", json={**body, "stop": [cut]}).json()
    choice = stopped["choices"][0]
    assert choice["message"]["content"] == text[: text.index(cut)]
    assert choice["finish_reason"] == "stop"


def test_aliases_and_model_id_are_accepted(client: TestClient) -> None:
    for name in ("bitnet", "demo-v1"):
        assert client.post("/v1/chat/completions", json=chat_body(model=name)).status_code == 200


def test_threads_is_accepted_and_validated(client: TestClient) -> None:
    assert client.post("/v1/chat/completions", json=chat_body(threads=4)).status_code == 200
    r = client.post("/v1/chat/completions", json=chat_body(threads=0))
    assert r.status_code == 400 and r.json()["error"]["param"] == "threads"
