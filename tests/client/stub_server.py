"""A stand-in for the conversation routes with controllable timing, run as a script:
``python stub_server.py PORT [API_KEY]``.

Replies stream one ``"word "`` chunk every 20 ms, ``max_tokens`` of them, so a test can
press Ctrl-C in the middle of a reply; when the client goes away mid-stream the stub
prints ``DISCONNECTED <conversation id>`` on stdout. Used to test the client's side of
cancellation exactly; the real server is driven in test_acceptance.py.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CHUNK_INTERVAL_S = 0.02


class StubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: StubServer

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def do_GET(self) -> None:
        parts = self.path.strip("/").split("/")
        if parts == ["health"]:
            self.send_json(200, {"status": "ok"})
        elif self.authorized() and len(parts) == 3 and parts[2] in self.server.conversations:
            messages = self.server.conversations[parts[2]]
            self.send_json(200, {"id": parts[2], "messages": messages})
        elif self.authorized():
            self.send_error_json(404, "conversation not found")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        parts = self.path.strip("/").split("/")
        if not self.authorized():
            return
        if parts == ["v1", "conversations"]:
            with self.server.lock:
                conversation_id = f"conv_{int(time.time() * 1000)}_{len(self.server.conversations)}"
                self.server.conversations[conversation_id] = list(body.get("messages", []))
            self.send_json(200, {"conversation_id": conversation_id, "object": "conversation"})
        elif len(parts) == 4 and parts[2] in self.server.conversations:
            self.stream_reply(parts[2], body)
        else:
            self.send_error_json(404, "conversation not found")

    def authorized(self) -> bool:
        key = self.server.api_key
        if key and self.headers.get("Authorization") != f"Bearer {key}":
            self.send_error_json(401, "invalid API key")
            return False
        return True

    def stream_reply(self, conversation_id: str, body: dict[str, Any]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        words = []
        try:
            for _ in range(int(body.get("max_tokens", 5))):
                chunk = {"choices": [{"index": 0, "delta": {"content": "word "}}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                words.append("word ")
                time.sleep(CHUNK_INTERVAL_S)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            print(f"DISCONNECTED {conversation_id}", flush=True)
            return
        messages = self.server.conversations[conversation_id]
        messages.append({"role": "user", "content": body["messages"][0]["content"]})
        messages.append({"role": "assistant", "content": "".join(words)})

    def send_json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, status: int, message: str) -> None:
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
        self.send_json(status, {"error": error})


class StubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, api_key: str | None) -> None:
        super().__init__(("127.0.0.1", port), StubHandler)
        self.api_key = api_key
        self.conversations: dict[str, list[dict[str, str]]] = {}
        self.lock = threading.Lock()


if __name__ == "__main__":
    stub = StubServer(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
    print("READY", flush=True)
    stub.serve_forever()
