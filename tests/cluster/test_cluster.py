"""Acceptance of issue 16 on a real cluster (conftest.py): the guide's conversation through
nginx with every turn on one replica and its cache warm; two replicas writing one
conversation at once; PostgreSQL restarted under load; the replica holding a conversation
killed with ``kill -9`` mid-reply. The test that kills a replica runs last."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import httpx
import psycopg

from bitserve.api.settings import DB_POOL_SPARE, DEFAULT_MAX_BATCH
from bitserve.cluster.local import LocalCluster

TIMEOUT = httpx.Timeout(120.0, connect=5.0)
GUIDE = ("Hello, how are you?", "What did I just ask you?")


def chat_body(content: str, max_tokens: int = 20, **extra: Any) -> dict[str, Any]:
    return {"model": "bitnet", "messages": [{"role": "user", "content": content}],
            "temperature": 0.7, "max_tokens": max_tokens, **extra}  # fmt: skip


def new_conversation(url: str) -> str:
    r = httpx.post(f"{url}/v1/conversations", timeout=TIMEOUT)
    r.raise_for_status()
    return str(r.json()["conversation_id"])


def chat(url: str, cid: str, content: str, **extra: Any) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/conversations/{cid}/chat", json=chat_body(content, **extra), timeout=TIMEOUT
    )


def stored(url: str, cid: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{url}/v1/conversations/{cid}", timeout=TIMEOUT)
    r.raise_for_status()
    messages: list[dict[str, Any]] = r.json()["messages"]
    return messages


def assert_whole_turns(messages: list[dict[str, Any]], interrupted: bool = False) -> None:
    """Every user message is followed by its finished reply, and nothing else is there;
    with ``interrupted``, a reply may also be the empty stand-in of one the store lost
    (its turn began, then the database went away before the reply was stored)."""
    assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
    for m in messages[1::2]:
        lost = interrupted and m["finish_reason"] == "interrupted" and m["content"] == ""
        assert m["finish_reason"] in ("stop", "length") or lost, m


def test_the_guide_through_nginx_stays_on_one_replica_with_a_warm_cache(
    cluster: LocalCluster,
) -> None:
    url = cluster.url
    replicas: Counter[str] = Counter()
    for n in range(8):
        cid = new_conversation(url)
        answers = [chat(url, cid, text, max_tokens=20 if n == 0 else 4) for text in GUIDE]
        assert [a.status_code for a in answers] == [200, 200]
        served_by = {a.headers["x-bitserve-replica"] for a in answers}
        assert len(served_by) == 1  # every turn of a conversation on one replica
        replicas[served_by.pop()] += 1
        follow_up = answers[1].json()["usage"]
        assert follow_up["prompt_tokens_details"]["cached_tokens"] > 0
        assert follow_up["prompt_tokens"] > answers[0].json()["usage"]["prompt_tokens"]
        messages = stored(url, cid)
        assert [m["content"] for m in messages[::2]] == list(GUIDE)
        assert_whole_turns(messages)
        log = [line for line in cluster.nginx.access_lines() if f"/{cid}/chat" in line]  # type: ignore[union-attr]
        assert len(log) == 2 and len({line.split('replica="')[1][:9] for line in log}) == 1
    assert len(replicas) > 1  # the hash spreads conversations over the replicas


def test_streams_pass_through_nginx_unbuffered(
    cluster: LocalCluster, no_stop: dict[str, float]
) -> None:
    body = {**chat_body("Tell me a long story.", max_tokens=1500), "stream": True,
            "logit_bias": no_stop}  # fmt: skip
    arrivals: list[float] = []
    started = time.monotonic()
    with httpx.stream(
        "POST", f"{cluster.url}/v1/chat/completions", json=body, timeout=TIMEOUT
    ) as r:
        assert r.status_code == 200 and r.headers["x-bitserve-replica"].startswith("replica-")
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic() - started)
    assert len(arrivals) > 1000
    # buffered, the events would arrive together at the end; unbuffered, the first comes
    # long before the last
    assert arrivals[0] < 0.3 * arrivals[-1], (arrivals[0], arrivals[-1])


def test_large_request_bodies_pass_through_nginx(cluster: LocalCluster) -> None:
    """Past nginx's default in-memory body buffer (16 KB): a long history uploaded at once."""
    pairs = [[{"role": "user", "content": f"{i}: " + "history " * 300},
              {"role": "assistant", "content": "noted"}] for i in range(20)]  # fmt: skip
    messages = [m for pair in pairs for m in pair]
    r = httpx.post(f"{cluster.url}/v1/conversations", json={"messages": messages}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert len(stored(cluster.url, r.json()["id"])) == 40


def test_two_replicas_writing_one_conversation_are_serialized(
    cluster: LocalCluster, no_stop: dict[str, float]
) -> None:
    cid = new_conversation(cluster.url)
    answers: dict[str, httpx.Response] = {}
    spans: list[tuple[float, float]] = []

    def turn(replica: int) -> None:
        url = cluster.replicas[replica].url  # straight to a replica: no affinity
        started = time.monotonic()
        answers[f"replica-{replica}"] = chat(
            url, cid, f"message to replica {replica}", max_tokens=500, logit_bias=no_stop
        )
        spans.append((started, time.monotonic()))

    threads = [threading.Thread(target=turn, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (start_a, end_a), (start_b, end_b) = spans
    assert start_b < end_a and start_a < end_b  # the two requests were in flight together
    assert {name: a.status_code for name, a in answers.items()} == {
        "replica-0": 200,
        "replica-1": 200,
    }
    messages = stored(cluster.url, cid)
    assert_whole_turns(messages)
    assert len(messages) == 4
    first, second = messages[0]["content"][-1], messages[2]["content"][-1]
    assert {first, second} == {"0", "1"}
    replies = {m["content"]: r for m, r in zip(messages[::2], messages[1::2], strict=True)}
    for name, answer in answers.items():
        reply = replies[f"message to replica {name[-1]}"]
        assert answer.json()["choices"][0]["message"]["content"] == reply["content"]
    # the second turn waited for the first and was generated with it in its history
    later = answers[f"replica-{second}"].json()["usage"]["prompt_tokens"]
    earlier = answers[f"replica-{first}"].json()["usage"]["prompt_tokens"]
    assert later > earlier + 500


def test_each_replica_holds_its_pool_of_database_connections(cluster: LocalCluster) -> None:
    """Three replicas at the default flags keep 3 x (--max-batch + 4) connections open,
    no more, however many turns run: within PostgreSQL's default max_connections."""
    with psycopg.connect(cluster.postgres.url) as admin:
        row = admin.execute(
            "SELECT count(*), current_setting('max_connections')::int FROM pg_stat_activity "
            "WHERE application_name = 'bitserve'"
        ).fetchone()
    assert row is not None
    connections, max_connections = row
    assert connections == 3 * (DEFAULT_MAX_BATCH + DB_POOL_SPARE) <= max_connections - 3


def test_postgres_restart_under_load_is_503_then_back(cluster: LocalCluster) -> None:
    url = cluster.url
    conversations = [new_conversation(url) for _ in range(4)]
    statuses: list[tuple[float, int, str | None]] = []
    ok: Counter[str] = Counter()
    stop = threading.Event()
    started = time.monotonic()

    def client(cid: str) -> None:
        n = 0
        while not stop.is_set() and time.monotonic() - started < 60:
            n += 1
            try:
                r = chat(url, cid, f"turn {n}", max_tokens=4)
            except httpx.TransportError:
                statuses.append((time.monotonic() - started, -1, None))
                continue
            statuses.append(
                (time.monotonic() - started, r.status_code, r.headers.get("retry-after"))
            )
            if r.status_code == 200:
                ok[cid] += 1
            else:
                time.sleep(0.2)

    threads = [threading.Thread(target=client, args=(cid,)) for cid in conversations]
    for thread in threads:
        thread.start()
    time.sleep(2)
    cluster.postgres.stop()
    down_at = time.monotonic() - started
    time.sleep(3)
    cluster.postgres.start()
    up_at = time.monotonic() - started
    back = None
    while back is None and time.monotonic() - started < up_at + 15:
        back = next((t for t, s, _ in statuses if s == 200 and t > up_at), None)
        time.sleep(0.1)
    time.sleep(1)
    stop.set()
    for thread in threads:
        thread.join()

    codes = Counter(s for _, s, _ in statuses)
    assert set(codes) <= {200, 503}, codes  # no 500, no 502, no broken connection
    assert codes[503] > 0 and all(r is not None for _, s, r in statuses if s == 503)
    assert any(s == 200 for t, s, _ in statuses if t < down_at)
    assert back is not None and back - up_at < 5, "service not back within seconds"
    for cid in conversations:  # every answered turn stored whole, nothing else
        messages = stored(url, cid)
        assert_whole_turns(messages, interrupted=True)  # a 503 mid-turn: the stand-in
        finished = [m for m in messages[1::2] if m["finish_reason"] != "interrupted"]
        assert len(finished) == ok[cid]


def test_kill_9_mid_reply_moves_the_conversation_with_its_whole_history(
    cluster: LocalCluster, no_stop: dict[str, float]
) -> None:
    url = cluster.url
    cid = new_conversation(url)
    first = chat(url, cid, GUIDE[0])
    holder = first.headers["x-bitserve-replica"]
    before = stored(url, cid)
    assert len(before) == 2

    body = {**chat_body(GUIDE[1], max_tokens=2000), "stream": True, "logit_bias": no_stop}
    events = 0
    with httpx.stream(
        "POST", f"{url}/v1/conversations/{cid}/chat", json=body, timeout=TIMEOUT
    ) as r:
        assert r.headers["x-bitserve-replica"] == holder
        try:
            for line in r.iter_lines():
                events += line.startswith("data: ")
                if events == 20:
                    cluster.replica_named(holder).kill9()  # mid-reply
        except httpx.TransportError:
            pass  # the stream is cut: no [DONE]
    assert 20 <= events < 2000

    after = chat(url, cid, "Are you still there?")
    assert after.status_code == 200, after.text
    assert after.headers["x-bitserve-replica"] != holder
    # the killed turn kept its user message, its reply marked interrupted (never half of
    # it); the next prompt held the whole stored history
    history = stored(url, cid)
    assert history[:2] == before
    assert [m["content"] for m in history[::2]] == [GUIDE[0], GUIDE[1], "Are you still there?"]
    assert (history[3]["content"], history[3]["finish_reason"]) == ("", "interrupted")
    assert_whole_turns(history[:2] + history[4:])
    assert after.json()["usage"]["prompt_tokens"] > first.json()["usage"]["prompt_tokens"]
