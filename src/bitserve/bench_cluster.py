"""`bitserve bench --scenario cluster`: conversation affinity through the shipped nginx
against round-robin, and nginx's added latency (see :mod:`bitserve.bench_serving`)."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from bitserve.api.process import free_port
from bitserve.bench_serving import (
    FILLER,
    HEALTH_TIMEOUT_S,
    READ_PAUSE_S,
    REQUEST_TIMEOUT_S,
    StreamResult,
    conversation_turn,
    post,
)
from bitserve.cluster.local import replica_threads, start_cluster
from bitserve.cluster.nginx import start_nginx


def two_turns(client: httpx.Client, n: int) -> tuple[StreamResult, StreamResult]:
    """A conversation of its own (a first message no other shares) and a follow-up."""
    conv = post(client, "/v1/conversations", {})["id"]
    first = conversation_turn(client, conv, f"Conversation {n}. {FILLER * 2}", 8)
    time.sleep(READ_PAUSE_S)
    return first, conversation_turn(client, conv, "What did the miller keep?", 4)


def followups(url: str, n: int, offset: int) -> dict[str, Any]:
    """``n`` conversations through ``url``: the share of follow-ups whose first turn was
    in the cache (``cached_tokens`` ≥ the first turn's prompt), and their median TTFT."""
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        runs = [two_turns(client, offset + i) for i in range(n)]
    warm = [late.cached_tokens >= first.prompt_tokens for first, late in runs]
    return {
        "warm_share": round(sum(warm) / len(warm), 3),
        "followup_ttft_s": round(statistics.median(late.ttft_s for _, late in runs), 4),
        "followup_cached_tokens": round(statistics.median(late.cached_tokens for _, late in runs)),
    }


def hop_latency(direct: str, balanced: str, n: int) -> dict[str, Any]:
    """Median ``GET /health`` time straight to a replica and through nginx (alternating,
    keep-alive on both), and the difference: what the extra hop adds to every request."""
    times: dict[str, list[float]] = {direct: [], balanced: []}
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
        for _ in range(n):
            for url in (direct, balanced):
                start = time.perf_counter()
                client.get(f"{url}/health").raise_for_status()
                times[url].append(time.perf_counter() - start)
    direct_ms = statistics.median(times[direct]) * 1000
    lb_ms = statistics.median(times[balanced]) * 1000
    return {
        "direct_ms": round(direct_ms, 3),
        "lb_ms": round(lb_ms, 3),
        "lb_added_ms": round(lb_ms - direct_ms, 3),
    }


def run_cluster(model: Path, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    # the replicas share this machine: --threads is the total, split between them
    threads = replica_threads(args.replicas, args.threads)
    serve_args = ["-m", str(model), "--max-queue", "64", "--threads", str(threads)]
    with start_cluster(workdir, args.replicas, serve_args, timeout_s=HEALTH_TIMEOUT_S) as cluster:
        upstreams = [r.url.removeprefix("http://") for r in cluster.replicas]
        with start_nginx(workdir / "round-robin", upstreams, free_port(), affinity=False) as rr:
            n = max(1, args.conversations)
            affinity = followups(cluster.url, n, 0)
            round_robin = followups(rr.url, n, n)
        hop = hop_latency(cluster.replicas[0].url, cluster.url, max(1, args.lb_requests))
    return {
        "scenario": "cluster",
        "replicas": args.replicas,
        "conversations": n,
        **{f"affinity_{k}": v for k, v in affinity.items()},
        **{f"round_robin_{k}": v for k, v in round_robin.items()},
        **hop,
        "lb_requests": max(1, args.lb_requests),
        "threads_per_replica": threads,
    }
