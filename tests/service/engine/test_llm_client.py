"""The chat-completions client against a real HTTP server on loopback (tests/service/
llm_server.py): image input, retries with backoff and Retry-After, deadlines, the circuit
breaker and the concurrency limit. Every test is bounded to a few seconds."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from llm_server import ChatServer, Reply, answer
from PIL import Image

from service.engine.llm_client import (
    ChatClient,
    CircuitBreaker,
    LLMCallError,
    LLMConfig,
    LLMDeadlineError,
    LLMTimeoutError,
    LLMUnavailableError,
)
from service.engine.llm_stages import image_data_url

pytest_plugins = ["llm_fixtures"]  # the `chat` fixture: the scripted server

MESSAGES = [{"role": "user", "content": [{"type": "text", "text": "where?"}]}]


def run(config: LLMConfig, body: Callable[[ChatClient], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        client = ChatClient(config)
        try:
            return await body(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def cfg(chat: ChatServer, **kw: Any) -> LLMConfig:
    values: dict[str, Any] = {
        "base_url": chat.url,
        "model": "test-vlm",
        "timeout_s": 2.0,
        "max_retries": 2,
        "backoff_s": 0.05,
        "backoff_max_s": 0.2,
        "breaker_failures": 100,
        "breaker_cooldown_s": 0.3,
    }
    values.update(kw)
    return LLMConfig(**values)


def deadline(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def test_sends_the_image_as_a_data_url_with_model_key_and_json_mode(chat):
    image = Image.new("RGB", (900, 300), (200, 120, 40))
    url = image_data_url(image, 256)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "where?"},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]
    chat.push(answer({"lat": 1, "lon": 2}))
    reply = run(
        cfg(chat, api_key="sk-test"),
        lambda c: c.chat(messages, deadline=deadline(), temperature=0.5),
    )
    assert reply.text == '{"lat": 1, "lon": 2}' and reply.attempts == 1
    (req,) = chat.requests
    assert req.headers["Authorization"] == "Bearer sk-test"
    assert req.body["model"] == "test-vlm" and req.body["temperature"] == 0.5
    assert req.body["response_format"] == {"type": "json_object"}
    (sent,) = req.images
    assert sent.startswith("data:image/jpeg;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(sent.split(",", 1)[1])))
    assert decoded.format == "JPEG" and max(decoded.size) == 256


def test_429_then_success_is_retried_after_retry_after(chat):
    chat.push(Reply(status=429, headers={"Retry-After": "0.4"}), answer({"lat": 3, "lon": 4}))
    t0 = time.monotonic()
    reply = run(cfg(chat), lambda c: c.chat(MESSAGES, deadline=deadline()))
    assert reply.attempts == 2 and '"lat": 3' in reply.text
    gap = chat.requests[1].at - chat.requests[0].at
    assert 0.4 <= gap < 1.5, gap
    assert time.monotonic() - t0 < 2


def test_retry_after_past_the_deadline_ends_the_call_at_once(chat):
    chat.push(Reply(status=429, headers={"Retry-After": "30"}))
    t0 = time.monotonic()
    with pytest.raises(LLMDeadlineError, match="would pass the deadline"):
        run(cfg(chat), lambda c: c.chat(MESSAGES, deadline=deadline(2.0)))
    assert time.monotonic() - t0 < 1.0
    assert len(chat.requests) == 1


def test_5xx_is_retried_with_growing_backoff_then_fails(chat):
    chat.script = lambda req: Reply(status=503)
    with pytest.raises(LLMCallError, match="server error 503") as err:
        run(
            cfg(chat, max_retries=3, backoff_s=0.1, backoff_max_s=1.0),
            lambda c: c.chat(MESSAGES, deadline=deadline()),
        )
    assert err.value.attempts == 4 and len(chat.requests) == 4
    gaps = [b.at - a.at for a, b in zip(chat.requests, chat.requests[1:], strict=False)]
    # Equal jitter: wait k is in [cap_k / 2, cap_k] with cap_k = 0.1 * 2**k.
    for k, gap in enumerate(gaps):
        assert 0.1 * 2**k / 2 <= gap < 0.1 * 2**k + 0.3, gaps


def test_4xx_other_than_429_is_not_retried(chat):
    chat.push(Reply(status=400, body=b'{"error": "unknown model"}'))
    with pytest.raises(LLMCallError, match="HTTP 400"):
        run(cfg(chat), lambda c: c.chat(MESSAGES, deadline=deadline()))
    assert len(chat.requests) == 1


def test_a_hang_hits_the_per_call_timeout(chat):
    chat.script = lambda req: Reply(delay_s=10)
    t0 = time.monotonic()
    with pytest.raises(LLMTimeoutError):
        run(
            cfg(chat, timeout_s=0.3, max_retries=0),
            lambda c: c.chat(MESSAGES, deadline=deadline()),
        )
    assert 0.3 <= time.monotonic() - t0 < 1.5


def test_the_deadline_clips_the_per_call_timeout_and_the_retries(chat):
    chat.script = lambda req: Reply(delay_s=10)
    t0 = time.monotonic()
    with pytest.raises((LLMTimeoutError, LLMDeadlineError)):
        run(
            cfg(chat, timeout_s=5.0, max_retries=5),
            lambda c: c.chat(MESSAGES, deadline=deadline(0.6)),
        )
    assert time.monotonic() - t0 < 1.2


def test_refused_connections_are_retried_then_reported():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: nothing listens there
    config = LLMConfig(
        base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=2, backoff_s=0.05
    )
    with pytest.raises(LLMCallError, match="connection failed") as err:
        run(config, lambda c: c.chat(MESSAGES, deadline=deadline()))
    assert err.value.attempts == 3


def test_a_body_that_is_not_a_chat_completion_is_an_error(chat):
    chat.push(Reply(body=b"<html>proxy error</html>"))
    with pytest.raises(LLMCallError, match="not a chat completion"):
        run(cfg(chat), lambda c: c.chat(MESSAGES, deadline=deadline()))


def test_500s_open_the_breaker_which_skips_calls_then_lets_one_trial_through(chat):
    chat.script = lambda req: Reply(status=500)

    async def body(c: ChatClient) -> None:
        for _ in range(3):
            with pytest.raises(LLMError_):
                await c.chat(MESSAGES, deadline=deadline())
        assert c.breaker.state == "open"
        assert len(chat.requests) == 3
        with pytest.raises(LLMUnavailableError, match="circuit breaker open"):
            await c.chat(MESSAGES, deadline=deadline())
        assert len(chat.requests) == 3  # no HTTP while open
        await asyncio.sleep(0.35)  # the cool-down
        assert c.breaker.state == "half-open"
        chat.script = lambda req: answer({"lat": 5, "lon": 6})
        # The trial call and a concurrent one: only the trial goes through.
        results = await asyncio.gather(
            c.chat(MESSAGES, deadline=deadline()),
            c.chat(MESSAGES, deadline=deadline()),
            return_exceptions=True,
        )
        assert sum(isinstance(r, LLMUnavailableError) for r in results) == 1
        assert len(chat.requests) == 4
        assert c.breaker.state == "closed"
        await c.chat(MESSAGES, deadline=deadline())
        assert len(chat.requests) == 5

    run(cfg(chat, max_retries=0, breaker_failures=3), body)


def test_the_breaker_stops_the_retries_of_the_call_that_opens_it(chat):
    chat.script = lambda req: Reply(status=502)
    with pytest.raises(LLMUnavailableError, match="breaker opened"):
        run(
            cfg(chat, max_retries=5, breaker_failures=2),
            lambda c: c.chat(MESSAGES, deadline=deadline()),
        )
    assert len(chat.requests) == 2


def test_a_failed_trial_call_reopens_the_breaker():
    now = [0.0]
    breaker = CircuitBreaker(failures=2, cooldown_s=10, clock=lambda: now[0])
    breaker.failure()
    assert breaker.state == "closed" and breaker.allow()
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 10.0
    assert breaker.allow() and not breaker.allow()  # one trial at a time
    breaker.failure()
    assert breaker.state == "open" and breaker.retry_in() == 10
    now[0] = 20.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.consecutive == 0


def test_429s_do_not_open_the_breaker(chat):
    chat.script = lambda req: Reply(status=429, headers={"Retry-After": "0"})

    async def body(c: ChatClient) -> None:
        for _ in range(2):
            with pytest.raises(LLMCallError, match="429"):
                await c.chat(MESSAGES, deadline=deadline())
        assert c.breaker.state == "closed"

    run(cfg(chat, max_retries=1, breaker_failures=2), body)
    assert len(chat.requests) == 4


def test_concurrency_limit_bounds_calls_in_flight(chat):
    chat.script = lambda req: answer({"lat": 0, "lon": 0}, delay_s=0.2)

    async def body(c: ChatClient) -> list[Any]:
        return await asyncio.gather(*(c.chat(MESSAGES, deadline=deadline()) for _ in range(6)))

    t0 = time.monotonic()
    replies = run(cfg(chat, max_concurrency=2), body)
    assert len(replies) == 6 and len(chat.requests) == 6
    # Never more than two at once (counted at each arrival), and two did run together; six
    # answers of 0.2 s two at a time take at least three answer times.
    reqs = chat.requests
    at_once = [sum(o.at <= r.at < (o.done_at or np.inf) for o in reqs) for r in reqs]
    assert max(at_once) == 2, at_once
    assert time.monotonic() - t0 >= 0.6


LLMError_ = (LLMCallError, LLMUnavailableError)
