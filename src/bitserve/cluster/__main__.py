"""``python -m bitserve.cluster`` (``scripts/cluster``): PostgreSQL, N replicas and nginx
on loopback, in one command; prints the URL and stops everything on Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
from pathlib import Path

from bitserve.api.process import ServerStartError
from bitserve.cluster.local import start_cluster
from bitserve.cluster.nginx import NginxError
from bitserve.cluster.postgres import PostgresError

DEFAULT_PORT = 8080


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="scripts/cluster",
        description="A local cluster: PostgreSQL, N bitserve replicas sharing it, and nginx "
        "in front (deploy/nginx/bitserve.conf) on 127.0.0.1. Ctrl-C stops everything.",
        epilog="Arguments after -- go to every replica's `bitserve serve` (e.g. -- -m model.gguf).",
    )
    p.add_argument("-n", "--replicas", type=int, default=2, help="replicas to start (2)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="nginx's port (8080)")
    p.add_argument("--workdir", type=Path, help="logs and files (default: a temporary folder)")
    p.add_argument("serve_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    serve_args = args.serve_args[1:] if args.serve_args[:1] == ["--"] else args.serve_args
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bitserve-cluster-"))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"cluster: starting PostgreSQL and {args.replicas} replicas (logs in {workdir})",
          file=sys.stderr)  # fmt: skip
    try:
        cluster = start_cluster(workdir, args.replicas, serve_args, port=args.port)
    except (PostgresError, NginxError, ServerStartError, OSError, ValueError) as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 1
    with cluster:
        for replica in cluster.replicas:
            print(f"cluster: replica {replica.url} (log {replica.log_path})", file=sys.stderr)
        print(f"cluster: PostgreSQL {cluster.postgres.url}", file=sys.stderr)
        print(f"cluster: nginx access log {cluster.nginx.access_log}", file=sys.stderr)  # type: ignore[union-attr]
        print(cluster.url, flush=True)
        print("cluster: Ctrl-C stops everything", file=sys.stderr)
        try:
            while not stop.wait(1.0):
                dead = [r.url for r in cluster.replicas if r.process.poll() is not None]
                if dead:
                    print(f"cluster: replica(s) {', '.join(dead)} exited", file=sys.stderr)
                    stop.wait()  # keep serving with the others until stopped
        except KeyboardInterrupt:
            pass
        print("cluster: stopping", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
