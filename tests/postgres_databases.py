"""New databases on the tests' PostgreSQL server (tests/conftest.py starts it)."""

from __future__ import annotations

import itertools

import psycopg
from psycopg import sql

from bitserve.cluster.postgres import PostgresServer

_NUMBERS = itertools.count()


def new_postgres_database(server: PostgresServer) -> str:
    """The URL of a new, empty database on ``server``."""
    name = f"test_{next(_NUMBERS)}"
    with psycopg.connect(server.url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return server.url.rsplit("/", 1)[0] + "/" + name
