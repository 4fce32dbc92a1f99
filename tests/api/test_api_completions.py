"""``/completion`` (llama.cpp), ``/v1/completions`` (OpenAI legacy, echo + logprobs
scoring), ``/tokenize`` and ``/detokenize`` in-process."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import pytest
from api_helpers import sse_events
from fastapi.testclient import TestClient
from starlette.requests import ClientDisconnect

from bitserve.engine.constraint import MAX_GRAMMAR_CHARS


def test_llama_completion_text_prompt(client: TestClient) -> None:
    body = {"prompt": "What is artificial intelligence?", "temperature": 0.7, "n_predict": 8}
    r = client.post("/completion", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert isinstance(data["content"], str) and data["stop"] is True
    assert 1 <= data["tokens_predicted"] <= 8 and data["tokens_evaluated"] > 0
    assert data["stop_type"] in ("eos", "word", "limit")
    assert data["generation_settings"]["temperature"] == 0.7
    assert "completion_probabilities" not in data


def test_llama_completion_token_prompt_probs_and_tokens(client: TestClient) -> None:
    ids = client.post("/tokenize", json={"content": "Hello world", "add_special": True}).json()
    body = {"prompt": ids["tokens"], "n_predict": 4, "n_probs": 3, "return_tokens": True,
            "temperature": 0}  # fmt: skip
    data = client.post("/completion", json=body).json()
    probs = data["completion_probabilities"]
    assert len(probs) == len(data["tokens"]) == data["tokens_predicted"]
    for entry, token_id in zip(probs, data["tokens"], strict=True):
        assert entry["id"] == token_id and entry["logprob"] <= 0
        assert len(entry["top_logprobs"]) == 3 and entry["top_logprobs"][0]["id"] == token_id
        assert set(entry) == {"id", "token", "bytes", "logprob", "top_logprobs"}
    assert data["tokens_evaluated"] == len(ids["tokens"])


def test_llama_completion_stream(client: TestClient) -> None:
    body = {"prompt": "Once upon a time", "n_predict": 5, "stream": True, "temperature": 0}
    events = sse_events(client.post("/completion", json=body).text)
    assert "[DONE]" not in events  # llama.cpp's /completion stream has no [DONE]
    assert all(e["stop"] is False for e in events[:-1]) and events[-1]["stop"] is True
    whole = client.post("/completion", json={**body, "stream": False}).json()
    assert "".join(e["content"] for e in events) == whole["content"]


def test_llama_errors(client: TestClient) -> None:
    r = client.post("/completion", json={"prompt": [10**9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = client.post("/completion", json={"prompt": "x", "n_probs": 50})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n_probs"
    r = client.post("/completion", json={"n_predict": 3})
    assert r.status_code == 422 and r.json()["error"]["param"] == "prompt"


def test_openai_legacy_completion(client: TestClient) -> None:
    body = {"model": "bitnet", "prompt": ["Hi", "Bye"], "max_tokens": 4, "n": 2}
    data = client.post("/v1/completions", json=body).json()
    assert data["id"].startswith("cmpl-") and data["object"] == "text_completion"
    assert [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
    assert all(c["logprobs"] is None for c in data["choices"])
    assert data["usage"]["completion_tokens"] >= 4


def test_legacy_choices_decode_together(client: TestClient) -> None:
    """2 prompts x n=2, 8 tokens each: one after another would take >= 32 engine steps."""
    engine = client.app.state.served.engine  # type: ignore[attr-defined]
    body = {"model": "bitnet", "prompt": ["Hi", "Bye"], "max_tokens": 8, "n": 2, "seed": 3}
    before = engine.stats.steps
    data = client.post("/v1/completions", json={**body, "ignore_eos": True}).json()
    assert data["usage"]["completion_tokens"] == 32
    assert engine.stats.steps - before <= 12
    bye = {**body, "prompt": "Bye", "ignore_eos": True}
    alone = client.post("/v1/completions", json=bye).json()
    assert [c["text"] for c in alone["choices"]] == [c["text"] for c in data["choices"][2:]]
    # streamed: the same texts, the choices' chunks interleaved, one finish chunk each
    streamed = {**body, "ignore_eos": True, "stream": True, "logprobs": 0}
    events = sse_events(client.post("/v1/completions", json=streamed).text)
    chunks = [c["choices"][0] for c in events[:-1]]
    indices = [c["index"] for c in chunks if c["finish_reason"] is None]
    assert indices != sorted(indices)
    assert sorted(c["index"] for c in chunks if c["finish_reason"]) == [0, 1, 2, 3]
    for choice in data["choices"]:
        text = "".join(c["text"] for c in chunks if c["index"] == choice["index"])
        assert text == choice["text"]


def test_echo_logprobs_with_zero_max_tokens_scores_the_prompt(client: TestClient) -> None:
    ids = client.post("/tokenize", json={"content": "The cat sat on the mat"}).json()["tokens"]
    body = {"model": "bitnet", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 2}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None
    assert all(v <= 0 for v in lp["token_logprobs"][1:])
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"][1] == len(lp["tokens"][0])
    assert all(len(t) <= 2 for t in lp["top_logprobs"][1:])
    # the score of the last token equals its logprob when generated greedily after the rest
    prefix = ids[:-1]
    gen = client.post(
        "/v1/completions",
        json={
            "model": "bitnet",
            "prompt": prefix,
            "max_tokens": 1,
            "logprobs": 5,
            "temperature": 0,
        },
    ).json()["choices"][0]["logprobs"]
    top = gen["top_logprobs"][0]
    last_token_text = lp["tokens"][-1]
    if last_token_text in top:
        assert math.isclose(top[last_token_text], lp["token_logprobs"][-1], abs_tol=1e-3)


def test_echo_scores_each_prompt_once_for_its_n_choices(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The n choices of a prompt echo the same prompt: it was scored once per choice (n
    times the engine work, every stream paused for each)."""
    generator = client.app.state.served.generator  # type: ignore[attr-defined]
    scored: list[int] = []
    score_prompt = generator.score_prompt

    def counting(tokens: list[int], *args: Any) -> Any:
        scored.append(len(tokens))
        return score_prompt(tokens, *args)

    monkeypatch.setattr(generator, "score_prompt", counting)
    body = {"model": "bitnet", "prompt": ["The cat sat", "Bye"], "max_tokens": 2, "n": 3,
            "echo": True, "logprobs": 1, "seed": 1}  # fmt: skip
    choices = client.post("/v1/completions", json=body).json()["choices"]
    assert len(scored) == 2 and len(choices) == 6
    prompts = [c["logprobs"]["token_logprobs"][: scored[c["index"] // 3]] for c in choices]
    assert prompts[0] == prompts[1] == prompts[2] != prompts[3] == prompts[4] == prompts[5]


def test_a_client_that_leaves_stops_its_prompt_scoring(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scoring a prompt (echo, max_tokens 0) went on to its end for a client that had
    left: abandoned scorings (an evaluation harness's timeouts and retries) took the
    engine's time from everyone."""
    from bitserve.api.completions.legacy import LegacyCompletion
    from bitserve.api.completions.protocol import CompletionRequest
    from bitserve.api.streaming import RequestGuard
    from bitserve.engine import generate

    monkeypatch.setattr(generate, "PROMPT_LOGPROBS_CHUNK", 4)
    served = client.app.state.served  # type: ignore[attr-defined]
    pieces: list[int] = []
    score_prompt = served.generator.score_prompt

    def counted(*args: Any) -> Any:
        inner = score_prompt(*args)
        while True:
            try:
                next(inner)
            except StopIteration as done:
                return done.value
            pieces.append(1)
            yield

    monkeypatch.setattr(served.generator, "score_prompt", counted)

    class LeavingClient:
        def __init__(self) -> None:
            self.gone = asyncio.Event()

        async def receive(self) -> dict[str, str]:
            await self.gone.wait()
            return {"type": "http.disconnect"}

    body = CompletionRequest(model="bitnet", prompt=list(range(1, 400)), max_tokens=0,
                             echo=True, logprobs=1)  # fmt: skip
    job = LegacyCompletion.plan(served, body)

    async def main() -> None:
        leaving = LeavingClient()
        answer = asyncio.ensure_future(job.run(RequestGuard(leaving)))  # type: ignore[arg-type]
        while len(pieces) < 3:
            await asyncio.sleep(0.001)
        leaving.gone.set()
        with pytest.raises(ClientDisconnect):
            await answer
        at_leaving = len(pieces)
        for _ in range(3):  # three more rounds of the engine's loop
            await served.engine.call(lambda _: None)
        assert len(pieces) <= at_leaving + 1 < 99  # at most the piece under way

    asyncio.run(main())


def test_legacy_streaming(client: TestClient) -> None:
    body = {"model": "bitnet", "prompt": "Hello", "max_tokens": 4, "stream": True,
            "echo": True, "temperature": 0}  # fmt: skip
    events = sse_events(client.post("/v1/completions", json=body).text)
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["text"] for e in events[:-1])
    whole = client.post("/v1/completions", json={**body, "stream": False}).json()
    assert text == whole["choices"][0]["text"] and text.startswith("Hello")
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_legacy_refuses_suffix(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": "bitnet", "prompt": "a", "suffix": "b"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"


def test_tokenize_detokenize_round_trip(client: TestClient) -> None:
    text = "Hello, world! 12345"
    tokens = client.post("/tokenize", json={"content": text}).json()["tokens"]
    assert client.post("/detokenize", json={"tokens": tokens}).json()["content"] == text
    pieces = client.post("/tokenize", json={"content": text, "with_pieces": True}).json()
    assert [p["id"] for p in pieces["tokens"]] == tokens
    assert "".join(p["piece"] for p in pieces["tokens"]) == text
    r = client.post("/detokenize", json={"tokens": [-1]})
    assert r.status_code == 400


ANSWER_GBNF = 'root ::= "answer: " ("yes" | "no") "."'


def test_llama_completion_json_schema_and_grammar(client: TestClient) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
              "maximum": 9}, "ok": {"type": "boolean"}}, "required": ["n", "ok"]}  # fmt: skip
    for seed in range(4):
        body = {"prompt": "JSON:", "json_schema": schema, "temperature": 1.0, "seed": seed,
                "n_predict": 60}  # fmt: skip
        data = client.post("/completion", json=body).json()
        value = json.loads(data["content"])
        assert set(value) == {"n", "ok"} and 0 <= value["n"] <= 9
        assert data["stop_type"] == "eos"
        body = {"prompt": "Q:", "grammar": ANSWER_GBNF, "temperature": 1.0, "seed": seed,
                "n_predict": 20, "ignore_eos": True}  # fmt: skip
        assert client.post("/completion", json=body).json()["content"] in (
            "answer: yes.", "answer: no.",
        )  # fmt: skip
    streamed = sse_events(client.post("/completion", json={**body, "stream": True}).text)
    assert "".join(e["content"] for e in streamed) in ("answer: yes.", "answer: no.")


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"json_schema": {"type": "object"}, "grammar": ANSWER_GBNF}, "json_schema"),
        ({"json_schema": {"type": "nope"}}, "json_schema"),
        ({"grammar": "root ::= (("}, "grammar"),
        ({"grammar": "root ::= undefined"}, "grammar"),
    ],
)
def test_llama_completion_bad_constraints(
    client: TestClient, patch: dict[str, Any], param: str
) -> None:
    r = client.post("/completion", json={"prompt": "x", **patch})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        # 5000 optional properties: ~150 KB, seconds of the library's CPU to compile
        ({"json_schema": {"type": "object", "properties": {
            f"p{i}": {"type": "integer"} for i in range(5000)}}}, "json_schema"),
        ({"grammar": "root ::= " + " | ".join(f'"w{i}"' for i in range(20000))}, "grammar"),
    ],
)  # fmt: skip
def test_llama_completion_constraints_past_the_size_limit(
    client: TestClient, patch: dict[str, Any], param: str
) -> None:
    r = client.post("/completion", json={"prompt": "x", **patch})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and f"above the limit of {MAX_GRAMMAR_CHARS}" in error["message"]


def test_echo_with_one_token_lists_the_prompt_and_the_token_even_at_end_of_text(
    client: TestClient,
) -> None:
    """lm-evaluation-harness scores a continuation with echo, logprobs and max_tokens 1,
    then drops the last entry (the generated token): the list must be prompt + 1 long
    even when that token is end-of-text, as OpenAI's is."""
    prompt = [2000, 417]  # BOS, then a token after which the demo model ends the text
    body = {"model": "bitnet", "prompt": prompt, "max_tokens": 1, "echo": True,
            "logprobs": 1, "temperature": 0}  # fmt: skip
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["finish_reason"] == "stop"  # it did end the text
    assert len(lp["tokens"]) == len(prompt) + 1
    assert lp["tokens"][-1] in ("<|end_of_text|>", "<|eot_id|>")
    scored = client.post("/v1/completions", json={**body, "max_tokens": 0}).json()
    continuation = lp["token_logprobs"][1:-1]  # what lm-eval sums for the token 417
    assert continuation == scored["choices"][0]["logprobs"]["token_logprobs"][1:]
    assert continuation[0] < -1  # a real score, not the (0, True) of an empty list
    streamed = sse_events(client.post("/v1/completions", json={**body, "stream": True}).text)
    listed = [t for e in streamed[:-1] if e["choices"][0]["logprobs"]
              for t in e["choices"][0]["logprobs"]["tokens"]]  # fmt: skip
    assert listed == lp["tokens"][len(prompt) :]


def test_text_offset_counts_from_the_prompt_start(client: TestClient) -> None:
    body = {"model": "bitnet", "prompt": "Hello there", "max_tokens": 5, "logprobs": 0,
            "temperature": 0, "logit_bias": {"2001": -100, "2009": -100}}  # fmt: skip
    whole = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    expected, offset = [], len("Hello there")
    for token in whole["tokens"]:
        expected.append(offset)
        offset += len(token)
    assert whole["text_offset"] == expected
    streamed = sse_events(client.post("/v1/completions", json={**body, "stream": True}).text)
    offsets = [o for e in streamed[:-1] if e["choices"][0]["logprobs"]
               for o in e["choices"][0]["logprobs"]["text_offset"]]  # fmt: skip
    assert offsets == expected


@pytest.mark.parametrize(
    ("prompt", "max_tokens"), [("é🎉 abc", 4), ("hello", 12), ("日本語のテキスト", 6)]
)
def test_text_offsets_index_the_text(client: TestClient, prompt: str, max_tokens: int) -> None:
    """Each token's offset is where its text starts in ``text``: characters split over
    tokens and hidden control tokens do not push later offsets off (or backwards)."""
    body = {"model": "bitnet", "prompt": prompt, "max_tokens": max_tokens, "logprobs": 0,
            "temperature": 0, "echo": True}  # fmt: skip
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    text, lp = choice["text"], choice["logprobs"]
    offsets = lp["text_offset"]
    assert offsets == sorted(offsets) and offsets[-1] <= len(text) and offsets[0] == 0
    for token, at in zip(lp["tokens"], offsets, strict=True):
        if "\ufffd" not in token and not token.startswith("<|"):
            assert text.startswith(token, at), (token, at, text)
    assert text.startswith(" a", prompt.find(" a")) if " a" in prompt else True
    streamed = sse_events(client.post("/v1/completions", json={**body, "stream": True}).text)
    generated = [o for e in streamed[1:-1] if e["choices"][0]["logprobs"]
                 for o in e["choices"][0]["logprobs"]["text_offset"]]  # fmt: skip
    assert generated == offsets[len(offsets) - len(generated) :]


def test_prompt_scored_at_full_context_with_the_servers_kv(client: TestClient) -> None:
    """``max_tokens: 0`` needs no room for a reply; the scores read float16 KV, as the
    server's generation does."""
    ids = client.post("/tokenize", json={"content": "one two " * 2000}).json()["tokens"][:2047]
    body = {"model": "bitnet", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["logprobs"]["tokens"]) == 2047
    r = client.post("/v1/completions", json={**body, "prompt": ids + ids[:10]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    prefix = ids[:40]  # its greedy next token, scored as part of the prompt
    gen = client.post("/v1/completions", json={"model": "bitnet", "prompt": prefix,
                      "max_tokens": 1, "logprobs": 0, "temperature": 0}).json()  # fmt: skip
    token_ids = client.post("/tokenize", json={"content": gen["choices"][0]["text"]}).json()
    body = {**body, "prompt": prefix + token_ids["tokens"]}
    scored = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    generated = gen["choices"][0]["logprobs"]
    assert scored["tokens"][-1] == generated["tokens"][0]
    assert math.isclose(scored["token_logprobs"][-1], generated["token_logprobs"][0], abs_tol=1e-4)


def test_llama_completion_reports_the_prefix_cache_and_true_timings(client: TestClient) -> None:
    prompt = "Once upon a time there was a little model that liked to count: one two three"
    body = {"prompt": prompt, "n_predict": 8, "temperature": 0}
    first = client.post("/completion", json=body).json()
    again = client.post("/completion", json=body).json()
    assert first["tokens_cached"] == 0
    assert again["tokens_cached"] == again["tokens_evaluated"] - 1  # all but the last token
    timings = again["timings"]
    assert timings["cache_n"] == again["tokens_cached"]
    assert timings["prompt_n"] == again["tokens_evaluated"] - again["tokens_cached"]
    for key in ("prompt_ms", "prompt_per_second", "prompt_per_token_ms", "predicted_ms",
                "predicted_per_second", "predicted_per_token_ms"):  # fmt: skip
        assert timings[key] >= 0, key
    assert timings["predicted_n"] == again["tokens_predicted"] == 8


def test_a_completion_its_grammar_ended_is_eos_even_with_stop_strings(client: TestClient) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    body = {"prompt": "JSON:", "json_schema": schema, "temperature": 0, "n_predict": 40,
            "stop": ["never in the reply"]}  # fmt: skip
    data = client.post("/completion", json=body).json()
    assert data["content"] in ('{"ok": true}', '{"ok": false}')
    assert (data["stop_type"], data["stopping_word"]) == ("eos", "")


def test_llama_completion_names_its_stopping_word(client: TestClient) -> None:
    body = {"prompt": "Hello", "n_predict": 30, "temperature": 0}
    text = client.post("/completion", json=body).json()["content"]
    stop = text[3:5]  # a stop string the greedy reply is known to contain
    answer = client.post("/completion", json={**body, "stop": ["zzzz", stop]}).json()
    assert answer["stop_type"] == "word" and answer["stopping_word"] == stop
    assert answer["content"] == text[: text.index(stop)]
    plain = client.post("/completion", json={**body, "n_predict": 2}).json()
    assert plain["stopping_word"] == ""


def test_llama_completion_parses_special_tokens_in_text(client: TestClient) -> None:
    hello = client.post("/tokenize", json={"content": "hello"}).json()["tokens"]
    answer = client.post(
        "/completion", json={"prompt": "<|begin_of_text|>hello<|eot_id|>", "n_predict": 1}
    ).json()
    assert answer["tokens_evaluated"] == 1 + len(hello) + 1  # BOS once, then the control token
    assert answer["prompt"] == "<|begin_of_text|>hello<|eot_id|>"
    # the OpenAI route keeps them as text (OpenAI does not parse them either)
    legacy = client.post(
        "/v1/completions", json={"model": "bitnet", "prompt": "<|eot_id|>", "max_tokens": 1}
    ).json()
    assert legacy["usage"]["prompt_tokens"] > 2


@pytest.mark.parametrize(
    ("field", "on", "off"),
    [("mirostat", 2, 0), ("typical_p", 0.9, 1.0), ("dynatemp_range", 0.5, 0.0),
     ("xtc_probability", 0.5, 0.0), ("dry_multiplier", 0.8, 0.0), ("top_n_sigma", 1.0, -1.0)],
)  # fmt: skip
def test_llama_samplers_not_implemented_are_refused_unless_off(
    client: TestClient, field: str, on: float, off: float
) -> None:
    """They were dropped as unknown fields: the reply was sampled another way than asked."""
    body = {"prompt": "Hello", "n_predict": 2}
    r = client.post("/completion", json={**body, field: on})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    assert "not implemented" in r.json()["error"]["message"]
    assert client.post("/completion", json={**body, field: off}).status_code == 200


def test_llama_completion_reads_fields_as_llama_cpp_does(client: TestClient) -> None:
    """``grammar: ""`` is no grammar, ``[[id, false]]`` bans a token (``true``: no bias),
    and more than OpenAI's 4 stop strings are taken."""
    body: dict[str, Any] = {"prompt": "Hello", "n_predict": 3, "temperature": 0}
    plain = client.post("/completion", json={**body, "return_tokens": True}).json()
    first = plain["tokens"][0]
    r = client.post("/completion", json={**body, "grammar": "", "return_tokens": True})
    assert r.status_code == 200 and r.json()["tokens"] == plain["tokens"], r.text
    banned = client.post(
        "/completion", json={**body, "return_tokens": True, "logit_bias": [[first, False]]}
    ).json()
    assert banned["tokens"][0] != first
    kept = client.post(
        "/completion", json={**body, "return_tokens": True, "logit_bias": [[first, True]]}
    ).json()
    assert kept["tokens"] == plain["tokens"]
    stops = [f"zz{i}" for i in range(20)]
    r = client.post("/completion", json={**body, "stop": stops})
    assert r.status_code == 200 and r.json()["content"] == plain["content"], r.text
    r = client.post("/completion", json={**body, "stop": [f"s{i}" for i in range(129)]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    r = client.post("/v1/completions", json={"model": "bitnet", "prompt": "hi", "stop": stops})
    assert r.status_code == 400  # OpenAI's routes keep OpenAI's limit
    r = client.post("/completion", json={**body, "logit_bias": [[True, -5]]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"
