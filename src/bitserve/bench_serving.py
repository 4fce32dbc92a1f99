"""`bitserve bench --scenario conversation|concurrent`: the serving goals, measured against
the REAL server process over loopback HTTP.

- ``conversation``: a conversation with ~``--history-tokens`` of history, one turn, then a
  ~20-token follow-up; its time to first token against the same message in a fresh
  conversation. Each repeat's message opens with its own word, so no fresh request finds
  an earlier one's message in the cache: both requests compute the same tokens (the
  message and the template around it; ``fresh_new_tokens``/``followup_new_tokens``), and
  only the follow-up has the history to attend to. Goal: ``ttft_ratio`` ≤ 1.5 (a
  follow-up costs only the new message).
- ``concurrent``: one stream's tokens/s, then ``--streams`` at once (goal: ``speedup`` ≥
  2.5), then ``--clients`` at once (all served, per-client tok/s spread).
- ``cluster``: ``--replicas`` (2) replicas on one PostgreSQL behind nginx with the shipped
  configuration (:mod:`bitserve.cluster`). ``--conversations`` conversations of two turns
  each, through nginx as shipped (consistent hash on the conversation id) and through a
  round-robin nginx in front of the same replicas: the share of follow-ups that found
  their first turn in the cache (``*_warm_share``) and their time to first token. Then
  nginx's added latency: ``--lb-requests`` ``GET /health`` straight to a replica and
  through nginx, alternating, medians and the difference (``lb_added_ms``); in
  :mod:`bitserve.bench_cluster`.

The model defaults to a synthetic one with BitNet-b1.58-2B-4T's shapes and a LLaMA-3-shaped
tokenizer (the plain bench model has no tokenizer, and the server needs one), cached next
to it. Prints ONE JSON line. The server is always killed, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bitserve.api.process import start_server
from bitserve.bench import cache_dir

CHAT_MODEL_NAME = "synthetic-2b4t-chat-seed0.gguf"
HEALTH_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 900.0
READ_PAUSE_S = 0.5  # between a reply and the next timed request of the conversation scenario
# candidate first words of the repeats' follow-ups (see openings())
OPENINGS = (
    "Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot", "Golf", "Hotel", "India", "Juliet",
    "Kilo", "Lima", "Mike", "November", "Oscar", "Papa", "Quebec", "Romeo", "Sierra", "Tango",
    "Uniform", "Victor", "Whiskey", "Xray", "Yankee", "Zulu",
)  # fmt: skip
FILLER = (
    "The river ran past the old mill where the miller kept his ledgers of grain and salt, "
    "and every spring the water rose over the lower field until the geese came back. "
)


def add_scenario_arguments(parser: argparse.ArgumentParser) -> None:
    """The scenario options (``--scenario`` itself is bench's dispatch)."""
    g = parser.add_argument_group("serving scenarios")
    g.add_argument("--history-tokens", type=int, default=1500, help="conversation history size")
    g.add_argument("--followup-tokens", type=int, default=20, help="follow-up message size")
    # on a shared VM about 1 repeat in 6 has one request running 1.2-1.8x slow (18 measured
    # conversation repeats: ratios 0.94-2.43 around a median of 1.36): a median of 3 lands
    # on such a repeat far more often than a median of 7
    g.add_argument(
        "--repeats",
        type=int,
        default=7,
        help="timed repeats, medians reported (concurrent: pairs of 1 stream and --streams)",
    )
    g.add_argument("--streams", type=int, default=4, help="concurrent streams for the speedup")
    g.add_argument("--clients", type=int, default=16, help="concurrent clients that must be served")
    g.add_argument("--stream-tokens", type=int, default=128, help="tokens each stream generates")
    g.add_argument("--replicas", type=int, default=2, help="cluster: replicas behind nginx")
    g.add_argument(
        "--conversations", type=int, default=8, help="cluster: two-turn conversations per mode"
    )
    g.add_argument(
        "--lb-requests", type=int, default=200, help="cluster: requests timing nginx's hop"
    )


def chat_model() -> Path:
    """The cached 2B-4T-shaped model with a tokenizer (written once, atomically)."""
    path = cache_dir() / CHAT_MODEL_NAME
    if not path.exists():
        from bitserve.model.demo import llama3_tokenizer_metadata
        from bitserve.model.synthetic import SHAPE_2B4T, write_synthetic_model

        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"bench: writing {path} (2B-4T shapes + tokenizer, ~1.2 GB)", file=sys.stderr)
        write_synthetic_model(
            path, SHAPE_2B4T, seed=0, tokenizer_metadata=llama3_tokenizer_metadata()
        )
    return path


# -- the server process -----------------------------------------------------------------------


@contextmanager
def server(model: Path, threads: int | None, workdir: Path) -> Iterator[str]:
    """``bitserve serve`` on a free loopback port; yields its URL once /health answers.
    The process is terminated (then killed) on the way out, whatever happened."""
    args = ["-m", str(model), "--db", str(workdir / "bench.db"), "--max-queue", "256"]
    if threads:
        args += ["--threads", str(threads)]
    with start_server(args, workdir, timeout_s=HEALTH_TIMEOUT_S) as proc:
        yield proc.url


# -- HTTP helpers -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamResult:
    ttft_s: float  # request sent → first chunk of a generated token (or the finish)
    total_s: float
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    @property
    def new_tokens(self) -> int:
        """Prompt tokens the server computed (not found in its prefix cache)."""
        return self.prompt_tokens - self.cached_tokens


def post(client: httpx.Client, path: str, body: dict[str, Any]) -> Any:
    r = client.post(path, json=body)
    r.raise_for_status()
    return r.json()


def _is_token_chunk(data: dict[str, Any]) -> bool:
    """A chunk sent for a generated token: not the role chunk, not the usage chunk. With
    ``logprobs`` on, every token but a stop token gets one, even with empty text."""
    return any("role" not in choice.get("delta", {}) for choice in data.get("choices") or ())


def stream_chat(client: httpx.Client, path: str, body: dict[str, Any]) -> StreamResult:
    """POST a streaming chat (usage and logprobs switched on) and time its chunks."""
    body = {**body, "stream": True, "logprobs": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first: float | None = None
    usage: dict[str, Any] = {}
    with client.stream("POST", path, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if first is None and _is_token_chunk(data):
                first = time.perf_counter()
            usage = data.get("usage") or usage
    end = time.perf_counter()
    details = usage.get("prompt_tokens_details") or {}
    return StreamResult(
        ttft_s=(first or end) - start,
        total_s=end - start,
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", 0)),
        cached_tokens=int(details.get("cached_tokens", 0)),
    )


def message_of(client: httpx.Client, text: str, n_tokens: int) -> str:
    """The first ``n_tokens`` tokens of ``text`` (repeated as needed), as text."""
    ids = post(client, "/tokenize", {"content": text})["tokens"]
    while len(ids) < n_tokens:
        ids = ids + ids
    return str(post(client, "/detokenize", {"tokens": ids[:n_tokens]})["content"])


def first_token(client: httpx.Client, text: str) -> int | None:
    """The first token of ``text`` after a space (as a message after the role name)."""
    ids = post(client, "/tokenize", {"content": f" {text}"})["tokens"]
    return int(ids[0]) if ids else None


def openings(client: httpx.Client, n: int, taken: set[int]) -> list[str]:
    """``n`` words for the follow-ups to open with, each starting with its own token after a
    space (none of ``taken``, the first tokens already sent), so that no fresh request
    finds an earlier one's message in the cache. Past the tokenizer's distinct words they
    repeat, with a warning: those fresh requests then find cached message tokens (which
    ``fresh_new_tokens`` shows)."""
    words, firsts = [], set(taken)
    for word in OPENINGS:
        first = first_token(client, word)
        if (
            first is not None
            and first not in firsts
            and post(client, "/detokenize", {"tokens": [first]})["content"].strip()
        ):
            words.append(word)
            firsts.add(first)
    words = words or list(OPENINGS)
    if n > len(words):
        print(
            f"bench: only {len(words)} distinct follow-ups; {n} repeats reuse some", file=sys.stderr
        )
    return [words[i % len(words)] for i in range(n)]


def paired_ratio(name: str, ratios: list[float]) -> dict[str, Any]:
    """``{name: median, name_range: [min, max]}`` of per-repeat ratios (None if none)."""
    if not ratios:
        return {name: None, f"{name}_range": None}
    return {
        name: round(statistics.median(ratios), 3),
        f"{name}_range": [round(min(ratios), 3), round(max(ratios), 3)],
    }


# -- conversation -----------------------------------------------------------------------------


def history_messages(client: httpx.Client, n_tokens: int) -> list[dict[str, str]]:
    """A system prompt and user/assistant pairs of about ``n_tokens`` tokens in all."""
    per_message = max(1, min(120, n_tokens // 4))
    messages = [{"role": "system", "content": "You are a patient assistant who remembers."}]
    total = 0
    while total < n_tokens:
        role = "user" if len(messages) % 2 else "assistant"
        size = min(per_message, max(1, n_tokens - total))
        text = message_of(client, f"Note {len(messages)}. {FILLER}", size)
        messages.append({"role": role, "content": text})
        total += size
    if messages[-1]["role"] == "user":
        messages.append({"role": "assistant", "content": "Noted."})
    return messages


def conversation_turn(client: httpx.Client, conv: str, text: str, max_tokens: int) -> StreamResult:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}
    return stream_chat(client, f"/v1/conversations/{conv}/chat", {**body, "temperature": 0})


def conversation_repeat(
    client: httpx.Client, history: list[dict[str, str]], followup: str
) -> tuple[StreamResult, StreamResult, int]:
    """One repeat: (follow-up after a turn on the long history, the same message fresh,
    history tokens before the follow-up). Each timed request is sent ``READ_PAUSE_S``
    after the previous reply, as a person reading it would: what the server does between
    turns (storing the turn, preparing the next one) is not the next request's cost."""
    conv = post(client, "/v1/conversations", {"messages": history})["id"]
    conversation_turn(client, conv, "Please remember all of that.", 8)
    history_tokens = int(client.get(f"/v1/conversations/{conv}/prompt").json()["prompt_tokens"])
    time.sleep(READ_PAUSE_S)
    late = conversation_turn(client, conv, followup, 4)
    fresh_conv = post(client, "/v1/conversations", {})["id"]
    time.sleep(READ_PAUSE_S)
    fresh = conversation_turn(client, fresh_conv, followup, 4)
    return late, fresh, history_tokens


def run_conversation(url: str, args: argparse.Namespace) -> dict[str, Any]:
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        history = history_messages(client, args.history_tokens)
        # a first fresh conversation caches the template's start, as any running server has
        # it: every fresh request below then computes exactly what its follow-up computes
        warm, warm_text = post(client, "/v1/conversations", {})["id"], "Warm-up: hello there. "
        conversation_turn(client, warm, message_of(client, warm_text * 4, 20), 1)
        warm_first = first_token(client, warm_text)
        taken = set() if warm_first is None else {warm_first}
        runs = []
        for opening in openings(client, max(1, args.repeats), taken):
            followup = message_of(client, f"{opening}: what did the miller keep? " * 4, 20)
            runs.append(conversation_repeat(client, history, followup))
    late = statistics.median(run[0].ttft_s for run in runs)
    fresh = statistics.median(run[1].ttft_s for run in runs)
    # each repeat's follow-up and fresh request run a second apart: their ratio is immune
    # to the machine's speed drifting between repeats, as the ratio of medians is not
    ratios = [run[0].ttft_s / run[1].ttft_s for run in runs if run[1].ttft_s > 0]
    return {
        "scenario": "conversation",
        "fresh_ttft_s": round(fresh, 4),
        "followup_ttft_s": round(late, 4),
        **paired_ratio("ttft_ratio", ratios),
        "history_tokens": runs[-1][2],
        "followup_prompt_tokens": runs[-1][0].prompt_tokens,
        "cached_tokens": runs[-1][0].cached_tokens,
        # tokens computed (prompt - cached), medians over the repeats
        "followup_new_tokens": round(statistics.median(run[0].new_tokens for run in runs)),
        "fresh_new_tokens": round(statistics.median(run[1].new_tokens for run in runs)),
        "repeats": len(runs),
    }


# -- concurrent -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientRun:
    ok: bool
    tokens: int
    seconds: float

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def completion(url: str, prompt: str, max_tokens: int) -> ClientRun:
    """One non-streamed completion of exactly ``max_tokens`` tokens (EOS ignored)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    start = time.perf_counter()
    try:
        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
            r = client.post("/v1/completions", json={"model": "bitnet", **body})
        tokens = int(r.json()["usage"]["completion_tokens"]) if r.status_code == 200 else 0
    except (httpx.HTTPError, ValueError, KeyError):
        return ClientRun(False, 0, time.perf_counter() - start)
    return ClientRun(r.status_code == 200 and tokens > 0, tokens, time.perf_counter() - start)


def run_clients(url: str, n: int, max_tokens: int, tag: str) -> tuple[list[ClientRun], float]:
    """``n`` clients at once (distinct prompts); their runs and the wall time of all."""
    runs: list[ClientRun | None] = [None] * n
    jobs: list[Callable[[], None]] = []
    for i in range(n):

        def job(i: int = i) -> None:
            runs[i] = completion(url, f"{tag} client {i}: tell me about the river.", max_tokens)

        jobs.append(job)
    threads = [threading.Thread(target=job) for job in jobs]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_TIMEOUT_S)
    wall = time.perf_counter() - start
    return [r or ClientRun(False, 0, wall) for r in runs], wall


def run_concurrent(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Goal 2: ``--repeats`` pairs of (one stream alone, ``--streams`` at once), each pair
    back to back so that both see the same machine (a shared VM's speed drifts over
    seconds); medians of the rates and of the pairs' speedups. Then ``--clients`` at once,
    which must all be served."""
    n_tokens = args.stream_tokens
    completion(url, "warm-up", 2)
    singles: list[float] = []
    aggregates: list[float] = []
    speedups: list[float] = []
    streams_served = args.streams
    for r in range(max(1, args.repeats)):
        single, single_wall = run_clients(url, 1, n_tokens, f"single {r}")
        many, many_wall = run_clients(url, args.streams, n_tokens, f"streams {r}")
        singles.append(single[0].tokens / single_wall)
        aggregates.append(sum(run.tokens for run in many) / many_wall)
        if singles[-1] > 0:
            speedups.append(aggregates[-1] / singles[-1])
        streams_served = min(streams_served, sum(run.ok for run in many))
    crowd, _ = run_clients(url, args.clients, max(4, n_tokens // 2), "crowd")
    served = [r for r in crowd if r.ok]
    return {
        "scenario": "concurrent",
        "single_tok_s": round(statistics.median(singles), 2),
        "aggregate_tok_s": round(statistics.median(aggregates), 2),
        **paired_ratio("speedup", speedups),
        "repeats": len(singles),
        "streams": args.streams,
        "streams_served": streams_served,
        "clients": args.clients,
        "clients_served": len(served),
        "client_min_tok_s": round(min((r.tok_s for r in served), default=0.0), 2),
        "client_max_tok_s": round(max((r.tok_s for r in served), default=0.0), 2),
    }


SCENARIOS: dict[str, Callable[[str, argparse.Namespace], dict[str, Any]]] = {
    "conversation": run_conversation,
    "concurrent": run_concurrent,
}


def run_scenario(args: argparse.Namespace) -> int:
    """Start the server on ``args.model`` (default: the cached chat model), run
    ``args.scenario``, print one JSON line. 0 on success, 1 if the run failed. The
    ``cluster`` scenario starts its own PostgreSQL, replicas and nginx."""
    scenario = SCENARIOS.get(args.scenario)
    if scenario is None and args.scenario != "cluster":
        print(f"bench: unknown scenario {args.scenario!r}", file=sys.stderr)
        return 2
    model = Path(args.model) if args.model else chat_model()
    with tempfile.TemporaryDirectory(prefix="bitserve-bench-") as tmp:
        try:
            if scenario is None:
                from bitserve.bench_cluster import run_cluster  # it imports this module

                result = run_cluster(model, args, Path(tmp))
            else:
                with server(model, args.threads, Path(tmp)) as url:
                    result = scenario(url, args)
        except (RuntimeError, httpx.HTTPError) as exc:
            print(f"bench: {args.scenario} scenario failed: {exc}", file=sys.stderr)
            return 1
    result.update(model=str(model), threads=args.threads, load=os.getloadavg())
    print(json.dumps(result))
    return 0
