"""A real OpenAI-compatible chat-completions server on loopback, scripted by the tests.

``ChatServer`` listens on 127.0.0.1 (a free port) in a thread and answers
``POST /v1/chat/completions``. Each answer comes from the queue of scripted ``Reply`` objects
(``push``), else from ``script(request) -> Reply``, else a fixed answer. Every request is
recorded (its JSON body, headers and arrival time).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    status: int = 200
    #: The assistant's text (wrapped into a chat completion), unless ``body`` is given.
    content: str = '{"lat": 0, "lon": 0, "reason": "default"}'
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


def answer(obj: Any, **kw: Any) -> Reply:
    """A 200 whose message content is ``obj`` as JSON (or ``obj`` itself if a string)."""
    return Reply(content=obj if isinstance(obj, str) else json.dumps(obj), **kw)


@dataclass
class Received:
    body: dict[str, Any]
    headers: dict[str, str]
    at: float
    #: When the answer started to be sent; None while it is being prepared.
    done_at: float | None = None

    @property
    def text(self) -> str:
        """The text parts of all messages, joined."""
        parts = []
        for m in self.body.get("messages", []):
            content = m.get("content")
            if isinstance(content, str):
                parts.append(content)
            else:
                parts += [p.get("text", "") for p in content if p.get("type") == "text"]
        return "\n".join(parts)

    @property
    def images(self) -> list[str]:
        return [
            p["image_url"]["url"]
            for m in self.body.get("messages", [])
            if isinstance(m.get("content"), list)
            for p in m["content"]
            if p.get("type") == "image_url"
        ]

    @property
    def is_rerank(self) -> bool:
        return '"ranking"' in self.text


def completion(content: str, model: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    ).encode()


class ChatServer:
    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.queue: deque[Reply] = deque()
        self.script: Callable[[Received], Reply] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                raw = self.rfile.read(length)
                if self.path != "/v1/chat/completions":
                    self._send(404, b'{"error": "not found"}', {})
                    return
                req = Received(json.loads(raw), dict(self.headers), time.monotonic())
                with server._lock:
                    server.requests.append(req)
                    reply = server._next(req)
                try:
                    if reply.delay_s:
                        server._stop.wait(reply.delay_s)
                    body = reply.body
                    if body is None:
                        body = completion(reply.content, req.body.get("model", ""))
                    # Before sending: the client can only send its next request after this.
                    req.done_at = time.monotonic()
                    self._send(reply.status, body, reply.headers)
                except OSError:
                    pass  # the client gave up (timeout) and closed the connection

            def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def _next(self, req: Received) -> Reply:
        if self.queue:
            return self.queue.popleft()
        if self.script is not None:
            return self.script(req)
        return Reply()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def push(self, *replies: Reply) -> None:
        self.queue.extend(replies)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.queue.clear()
            self.script = None

    def start(self) -> ChatServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # ends the scripted delays at once
        self._httpd.shutdown()
        self._httpd.server_close()


@contextmanager
def chat_server() -> Iterator[ChatServer]:
    server = ChatServer().start()
    try:
        yield server
    finally:
        server.stop()
