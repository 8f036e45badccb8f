"""`python -m tests.service.drain_app PORT`: the replica's DrainingServer around a tiny ASGI app,
with two threads that hold the GIL as the locate pipeline's threads do, so that the event loop
falls behind the kernel's accept queue the way a loaded replica's does."""

from __future__ import annotations

import sys
import threading

import uvicorn

from service.api.server import DrainingServer


class State:
    draining = False

    def begin_drain(self) -> None:
        self.draining = True


async def app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def, type-arg]
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    while (await receive()).get("more_body"):
        pass
    sum(range(20_000))  # a little work on the loop, as a response's rendering
    headers = [(b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


def _hold_gil() -> None:
    while True:
        sum(range(100_000))


if __name__ == "__main__":
    for _ in range(2):
        threading.Thread(target=_hold_gil, daemon=True).start()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", lifespan="on"
    )
    DrainingServer(config, State(), drain_s=0.3).run()  # type: ignore[arg-type]
