"""A whole cluster on loopback: PostgreSQL, N ``bitserve serve`` replicas on it, and nginx
in front with the shipped configuration. Used by ``scripts/cluster`` (python -m
bitserve.cluster), ``bitserve bench --scenario cluster`` and the cluster tests; whoever
starts one stops it (``with`` or :meth:`LocalCluster.stop`), which stops everything.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bitserve.api.process import STARTUP_TIMEOUT_S, ServerProcess, free_port, start_server
from bitserve.cluster.nginx import NginxServer, start_nginx
from bitserve.cluster.postgres import PostgresServer, start_postgres


@dataclass
class LocalCluster:
    """Its ``url`` is nginx's; ``replicas[i]`` is named ``replica-<i>`` (the
    ``X-Bitserve-Replica`` header) and listens on ``replicas[i].url``."""

    workdir: Path
    postgres: PostgresServer
    serve_args: tuple[str, ...]
    replicas: list[ServerProcess] = field(default_factory=list)
    nginx: NginxServer | None = None

    @property
    def url(self) -> str:
        assert self.nginx is not None
        return self.nginx.url

    def replica_named(self, name: str) -> ServerProcess:
        return self.replicas[int(name.rsplit("-", 1)[1])]

    def start_replica(self, index: int, timeout_s: float = STARTUP_TIMEOUT_S) -> ServerProcess:
        """Start replica ``index`` (``replica-<index>``) on a free port."""
        args = ["--db", self.postgres.url, "--replica-id", f"replica-{index}", *self.serve_args]
        return start_server(args, self.workdir / f"replica-{index}", timeout_s=timeout_s)

    def stop(self) -> None:
        """Stop nginx, the replicas, then PostgreSQL (and delete its data)."""
        if self.nginx is not None:
            self.nginx.stop()
        for replica in self.replicas:
            replica.stop()
        self.postgres.remove()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def replica_threads(n_replicas: int, total: int | None = None) -> int:
    """Threads each replica gets when they share ``total`` (default: this machine's cores)."""
    return max(1, (total or os.cpu_count() or 1) // n_replicas)


def start_cluster(
    workdir: Path,
    n_replicas: int = 2,
    serve_args: Sequence[str] = (),
    *,
    port: int | None = None,
    affinity: bool = True,
    durable: bool = True,
    timeout_s: float = STARTUP_TIMEOUT_S,
) -> LocalCluster:
    """Start PostgreSQL, then ``n_replicas`` replicas at once (each with ``serve_args``,
    and ``--threads`` sharing the cores unless given), then nginx on ``port`` (a free one
    by default). ``affinity=False`` routes conversations round-robin (for comparison);
    ``durable=False`` runs PostgreSQL without fsync (tests)."""
    if n_replicas < 1:
        raise ValueError("a cluster needs at least one replica")
    args = list(serve_args)
    if "--threads" not in args:
        args += ["--threads", str(replica_threads(n_replicas))]
    cluster = LocalCluster(workdir, start_postgres(durable=durable), tuple(args))
    try:
        started: dict[int, ServerProcess | BaseException] = {}

        def start(index: int) -> None:
            try:
                started[index] = cluster.start_replica(index, timeout_s)
            except BaseException as exc:
                started[index] = exc

        threads = [threading.Thread(target=start, args=(i,)) for i in range(n_replicas)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        cluster.replicas = [r for _, r in sorted(started.items()) if isinstance(r, ServerProcess)]
        failed = [r for r in started.values() if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
        upstreams = [r.url.removeprefix("http://") for r in cluster.replicas]
        cluster.nginx = start_nginx(
            workdir / "nginx", upstreams, port or free_port(), affinity=affinity
        )
    except BaseException:
        cluster.stop()
        raise
    return cluster
