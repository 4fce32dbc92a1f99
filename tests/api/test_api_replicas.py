"""What a replica behind a load balancer adds: its name on every response, and a 503 with
``Retry-After`` (never a 500, never half a turn) when the conversation store is down."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from api_helpers import chat_body, sse_events
from fastapi.testclient import TestClient

from bitserve.api.app import create_app
from bitserve.api.served import ServedModel
from bitserve.api.settings import ServerSettings
from bitserve.engine.loader import LoadedModel
from bitserve.store import NewMessage, SQLiteStore, StoredMessage, StoreUnavailableError, Turn


class FlakyStore(SQLiteStore):
    """SQLite whose database 'goes away' while ``down`` is set: what ``PostgresStore``
    raises then (the real outage is in tests/cluster), to check what the API makes of it."""

    down = False
    down_at_commit = False  # a turn begins, then the database goes away

    def _check(self, committing: bool = False) -> None:
        if self.down or (committing and self.down_at_commit):
            raise StoreUnavailableError("connection refused", retry_after=3)

    def get(self, owner: str, conversation_id: str):  # type: ignore[no-untyped-def]
        self._check()
        return super().get(owner, conversation_id)

    def begin_turn(self, owner: str, conversation_id: str) -> Turn:
        self._check()
        turn = super().begin_turn(owner, conversation_id)
        store = self

        class FlakyTurn(Turn):
            conversation, messages = turn.conversation, turn.messages

            def start(self, messages: Sequence[NewMessage]) -> None:
                turn.start(messages)

            def commit(self, messages: Sequence[NewMessage]) -> list[StoredMessage]:
                store._check(committing=True)
                return turn.commit(messages)

            def abandon(self) -> None:
                turn.abandon()

        return FlakyTurn()


@contextmanager
def app_client(loaded: LoadedModel, store: SQLiteStore, **settings: object) -> Iterator[TestClient]:
    config = ServerSettings(db_path=store.path, **settings)  # type: ignore[arg-type]
    served = ServedModel.create(loaded, 4, None, config.aliases, int(time.time()))
    with TestClient(create_app(config, served, store), raise_server_exceptions=False) as client:
        yield client


def test_every_response_names_the_replica(loaded: LoadedModel, tmp_path: Path) -> None:
    with app_client(loaded, SQLiteStore(tmp_path / "a.db"), replica="replica-a") as client:
        for r in (
            client.get("/health"),
            client.get("/no/such/route"),
            client.post("/v1/chat/completions", json=chat_body(stream=True)),
        ):
            assert r.headers["x-bitserve-replica"] == "replica-a", r.url
        assert client.get("/health").json()["replica"] == "replica-a"
    with app_client(loaded, SQLiteStore(tmp_path / "b.db"), port=9123) as client:
        expected = f"{socket.gethostname()}:9123"
        assert client.get("/health").headers["x-bitserve-replica"] == expected


def test_a_store_that_is_down_is_a_503_with_retry_after(
    loaded: LoadedModel, tmp_path: Path
) -> None:
    store = FlakyStore(tmp_path / "c.db")
    with app_client(loaded, store) as client:
        cid = client.post("/v1/conversations").json()["id"]
        store.down = True
        r = client.post(f"/v1/conversations/{cid}/chat", json=chat_body())
        assert r.status_code == 503 and r.headers["retry-after"] == "3"
        assert r.json()["error"]["code"] == "store_unavailable"
        store.down = False
        assert client.post(f"/v1/conversations/{cid}/chat", json=chat_body()).status_code == 200
        assert len(client.get(f"/v1/conversations/{cid}").json()["messages"]) == 2


def test_a_store_lost_while_streaming_ends_the_stream_with_the_error(
    loaded: LoadedModel, tmp_path: Path
) -> None:
    """The user's message was stored as the reply began; the reply reads as interrupted."""
    store = FlakyStore(tmp_path / "d.db")
    with app_client(loaded, store) as client:
        cid = client.post("/v1/conversations").json()["id"]
        store.down_at_commit = True
        r = client.post(f"/v1/conversations/{cid}/chat", json=chat_body(stream=True))
        events = sse_events(r.text)
        store.down_at_commit = False
        assert r.status_code == 200 and events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert events[-1]["error"]["code"] == "store_unavailable"
        stored = client.get(f"/v1/conversations/{cid}").json()["messages"]
        assert [(m["role"], m["content"], m["finish_reason"]) for m in stored] == [
            ("user", chat_body()["messages"][0]["content"], None),
            ("assistant", "", "interrupted"),
        ]


def test_a_full_database_pool_is_a_503_that_says_so(loaded: LoadedModel, postgres_url: str) -> None:
    """Every connection held by turns in flight (here: held by the test): the next chat
    gets a 503 + Retry-After within a second or so, naming the cause, not a hang."""
    from bitserve.store.postgres import PostgresStore

    store = PostgresStore(postgres_url, max_connections=2)
    config = ServerSettings(db_path=postgres_url, db_pool_size=2)
    served = ServedModel.create(loaded, 4, None, config.aliases, int(time.time()))
    with TestClient(create_app(config, served, store), raise_server_exceptions=False) as client:
        cid = client.post("/v1/conversations").json()["id"]
        held = [store.begin_turn("", store.create("").id) for _ in range(2)]
        r = client.post(f"/v1/conversations/{cid}/chat", json=chat_body())
        assert r.status_code == 503 and r.headers["retry-after"] == "2"
        error = r.json()["error"]
        assert error["code"] == "store_unavailable"
        assert error["message"].endswith("no free database connection (all 2 in use)")
        for turn in held:
            turn.abandon()
        assert client.post(f"/v1/conversations/{cid}/chat", json=chat_body()).status_code == 200
    store.close()
