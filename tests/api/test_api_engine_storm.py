"""The engine's promise under a storm, on the real server process: a request's answer
does not depend on what else runs (greedy, seeded sampling, logprobs, stop strings,
JSON schema, required tools, ``n``, echo scoring, llama.cpp's route), clients that
leave mid-stream poison nobody, and the gauges are back to idle afterwards."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from api_server import Server, metric, start

LONG = " ".join(f"The mill by the river turned {i} times." for i in range(40))
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": CITY}}]
PERSON = {"type": "json_schema", "json_schema": {"name": "p", "schema": {
    "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"]}}}  # fmt: skip


def chat(content: str, **fields: Any) -> tuple[str, dict[str, Any]]:
    return "/v1/chat/completions", {
        "model": "bitnet", "messages": [{"role": "user", "content": content}], **fields,
    }  # fmt: skip


REQUESTS = {
    "greedy": chat(LONG, max_tokens=40, temperature=0),
    "seeded": chat("Tell me a story", max_tokens=40, temperature=0.9, top_k=20, seed=7),
    "logprobs": chat("Hello", max_tokens=12, temperature=0, logprobs=True, top_logprobs=3),
    "stop": chat("Tell me a story", max_tokens=60, temperature=0, stop=["e", "the"]),
    "one token": chat("Hi", max_tokens=1, temperature=0),
    "long": chat("Go on", max_tokens=300, temperature=0.7, seed=1, frequency_penalty=1.0),
    "json": chat("A person", max_tokens=60, temperature=0.8, seed=3, response_format=PERSON),
    "tools": chat("Paris?", max_tokens=60, temperature=0.8, seed=5, tools=TOOLS,
                  tool_choice="required"),
    "n": chat("Story", max_tokens=20, temperature=0.9, seed=11, n=3),
    "echo": ("/v1/completions", {"model": "bitnet", "prompt": ["The quick fox", LONG],
             "max_tokens": 6, "n": 2, "temperature": 0, "echo": True, "logprobs": 2}),
    "llama": ("/completion", {"prompt": "Once upon a time", "n_predict": 30,
              "temperature": 0.8, "seed": 4, "n_probs": 2}),
}  # fmt: skip


def answer(server: Server, name: str) -> Any:
    """The request's answer without what differs between runs (ids, times, usage, the
    prefix cache's share)."""
    path, body = REQUESTS[name]
    for _ in range(100):  # a 503 is the client's to retry
        r = httpx.post(server.url + path, json=body, timeout=120)
        if r.status_code != 503:
            break
        time.sleep(float(r.headers["retry-after"]) / 10)
    assert r.status_code == 200, (name, r.text)
    text = re.sub(r'"call_[0-9a-f]+"', '"call"', r.text)
    data = json.loads(text)
    for key in ("id", "created", "usage", "timings", "tokens_cached"):
        data.pop(key, None)
    return data


def leave_mid_stream(server: Server, i: int) -> None:
    body = {"model": "bitnet", "messages": [{"role": "user", "content": f"A long tale {i}"}],
            "max_tokens": 400, "temperature": 0.8, "stream": True, "n": 1 + i % 2}  # fmt: skip
    with (
        httpx.Client(timeout=120) as client,
        client.stream("POST", server.url + "/v1/chat/completions", json=body) as r,
    ):
        for n, _ in enumerate(r.iter_lines()):
            if n >= i % 9:
                return  # the connection closes mid-stream


def test_answers_under_a_storm_equal_the_answers_alone(tmp_path: Path) -> None:
    server = start(tmp_path, "--max-queue", "24", "--max-batch", "6", "--cache-ram", "1")
    try:
        alone = {name: answer(server, name) for name in REQUESTS}
        names = list(REQUESTS) * 2
        with ThreadPoolExecutor(24) as pool:
            leaving = [pool.submit(leave_mid_stream, server, i) for i in range(18)]
            stormed = list(pool.map(lambda name: (name, answer(server, name)), names))
            for future in leaving:
                future.result()
        assert [name for name, got in stormed if got != alone[name]] == []
        deadline = time.monotonic() + 10
        while metric(server.url, "bitserve_busy") and time.monotonic() < deadline:
            time.sleep(0.05)
        for gauge in ("bitserve_busy", "bitserve_queue_depth", "bitserve_running_sequences",
                      "bitserve_waiting_sequences", "bitserve_kv_cache_usage"):  # fmt: skip
            assert metric(server.url, gauge) == 0, gauge
        assert metric(server.url, "bitserve_requests_failed_total") == 0
        assert "Traceback" not in server.log()
    finally:
        server.stop()
