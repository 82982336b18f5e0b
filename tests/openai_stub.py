"""A local OpenAI-compatible stub server on 127.0.0.1 for the openai backend's tests
(test_openai_backend.py, test_openai_replies.py): canned chat and completion replies, and
injected failures (status codes, truncated or garbage bodies, dropped connections, delays)."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CONV = [{"role": "user", "content": "Say hi"}]


def chat_reply(body: dict) -> dict:
    n = body.get("n", 1)
    last = body["messages"][-1]["content"]
    return {"choices": [{"index": i, "message": {"role": "assistant",
                                                 "content": f"echo {last} #{i}"}}
                        for i in range(n)],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3}}


def completion_reply(body: dict) -> dict:
    """Every prompt token gets log-prob -1.0 (the first has none), the sampled one -5.0."""
    lps = [None] + [-1.0] * (len(body["prompt"]) - 1) + [-5.0]
    return {"choices": [{"index": 0, "text": "x", "logprobs": {"token_logprobs": lps}}]}


class Stub(ThreadingHTTPServer):
    """An OpenAI-like server. `script` holds actions for the next requests, then "ok":
    an int status (error body), ("status", code, headers), "truncated" (200 with half a JSON
    body), "garbage" (200, not JSON), ("sleep", s) (answer after s seconds), "drop" (close the
    connection without answering), "nologprobs"."""

    daemon_threads = True

    def __init__(self, delay: float = 0.0):
        super().__init__(("127.0.0.1", 0), Handler)
        self.script: list = []
        self.log: list[dict] = []
        self.delay = delay
        self.bad_for: tuple[str, dict] | None = None  # (text in the prompt, malformed reply)
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def next_action(self):
        with self.lock:
            return self.script.pop(0) if self.script else "ok"


class Handler(BaseHTTPRequestHandler):
    server: Stub

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, code: int, payload: bytes, headers: dict | None = None,
              length: int | None = None) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload) if length is None else length))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on this request (its timeout): a real server moves on too

    def do_GET(self):
        self.server.log.append({"path": self.path, "headers": dict(self.headers)})
        self._send(200, json.dumps({"data": [{"id": "stub-model"}]}).encode())

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.log.append({"path": self.path, "headers": dict(self.headers), "body": body})
        action = self.server.next_action()
        if self.server.delay:
            time.sleep(self.server.delay)
        if isinstance(action, tuple) and action[0] == "reply":  # any JSON, e.g. malformed
            return self._send(200, json.dumps(action[1]).encode())
        if self.server.bad_for and self.server.bad_for[0] in json.dumps(body):
            return self._send(200, json.dumps(self.server.bad_for[1]).encode())
        if isinstance(action, tuple) and action[0] == "sleep":
            time.sleep(action[1])
            action = "ok"
        if isinstance(action, int):
            return self._send(action, b'{"error": {"message": "stub error"}}')
        if isinstance(action, tuple) and action[0] == "status":
            return self._send(action[1], b'{"error": "busy"}', action[2])
        if action == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        reply = completion_reply(body) if self.path.endswith("/completions") and \
            "prompt" in body else chat_reply(body)
        if action == "nologprobs":
            reply["choices"][0]["logprobs"] = None
        payload = json.dumps(reply).encode()
        if action == "truncated":  # a body cut short but complete per Content-Length
            return self._send(200, payload[: len(payload) // 2])
        if action == "garbage":
            return self._send(200, b"<html>proxy error</html>")
        self._send(200, payload)


def serve():
    """A running stub, shut down after (`yield from serve()` in a fixture)."""
    s = Stub()
    yield s
    s.shutdown()
    s.server_close()


def dead_url() -> str:
    """A 127.0.0.1 URL with nothing listening (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def make(base_url, **kw):
    from critique.backends.openai_backend import OpenAIBackend

    kw.setdefault("backoff", 0.01)
    kw.setdefault("progress", False)
    return OpenAIBackend(kw.pop("model", "stub-model"), base_url=base_url, **kw)
