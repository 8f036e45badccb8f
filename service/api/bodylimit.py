"""An ASGI middleware that bounds request bodies while they are read.

A Content-Length above the limit is refused before a byte of the body is read. Without one
(chunked uploads) the bytes are counted as they arrive, and the request is cut off with the
same 413 problem as soon as the count passes the limit: whatever the app was doing with the
body is abandoned and its response (if any) replaced.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.problems import RequestTooLargeError, problem_response


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self, size: str) -> RequestTooLargeError:
        return RequestTooLargeError(
            f"the request body {size}; the limit is {self.max_bytes} bytes "
            "(GEOLOC_MAX_REQUEST_BYTES)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path")
        for name, value in scope.get("headers") or []:
            if name == b"content-length":
                text = value.decode("latin-1").strip()
                if text.isdigit() and int(text) > self.max_bytes:
                    response = problem_response(self._error(f"has {text} bytes"), path)
                    await response(scope, receive, send)
                    return
        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the app's answer to a half-read body is replaced by ours
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            response = problem_response(self._error(f"exceeds {self.max_bytes} bytes"), path)
            await response(scope, receive, send)
