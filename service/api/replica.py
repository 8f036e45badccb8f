"""The ``X-Geoloc-Replica`` response header."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class ReplicaHeaderMiddleware:
    """Adds ``X-Geoloc-Replica: <name>`` to every response: behind a load balancer, which
    replica answered is the first thing to know about a request that went wrong."""

    def __init__(self, app: ASGIApp, name: str) -> None:
        self.app = app
        self.header = (b"x-geoloc-replica", name.encode("ascii", "replace"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)
