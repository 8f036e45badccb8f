"""An OpenAI-compatible chat-completions client with image input, for the optional LLM stages.

It speaks ``POST {base_url}/chat/completions`` (vLLM, Ollama, llama.cpp server, OpenAI) with
the image as a ``data:`` URL. What a call goes through, in order:

1. a circuit breaker: after ``breaker_failures`` consecutive failed attempts the client fails
   fast (no HTTP) for ``breaker_cooldown_s``; then one trial call goes through (half-open) and
   its outcome closes or re-opens the breaker;
2. a concurrency limit (one semaphore per client, i.e. per process);
3. one HTTP attempt whose timeout is ``timeout_s`` clipped to what is left before the
   caller's deadline;
4. on 429, 5xx, connection errors and timeouts: a retry after an exponential backoff with
   jitter, at most ``max_retries`` times, and only when the wait fits before the deadline; a
   ``Retry-After`` header replaces the backoff (a wait past the deadline ends the call).

A 429 does not count against the breaker (the server is alive and asks us to slow down).
Every request and answer is logged at debug level on the ``geoloc.llm`` logger with the
caller's context (the prediction id); image bytes are logged as their size and hash.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

log = logging.getLogger("geoloc.llm")


@dataclass(frozen=True)
class LLMConfig:
    base_url: str
    model: str
    api_key: str = ""
    timeout_s: float = 15.0
    connect_timeout_s: float = 2.0
    max_retries: int = 2
    backoff_s: float = 0.5
    backoff_max_s: float = 8.0
    breaker_failures: int = 5
    breaker_cooldown_s: float = 30.0
    max_concurrency: int = 4
    max_tokens: int = 300
    #: Ask for ``response_format: {"type": "json_object"}`` (servers that refuse it: off).
    json_mode: bool = True


class LLMError(Exception):
    """A call that produced no answer. ``kind`` is a short stable word for reports."""

    kind = "error"

    def __init__(self, message: str, *, attempts: int = 0) -> None:
        super().__init__(message)
        self.attempts = attempts


class LLMUnavailableError(LLMError):
    """The circuit breaker is open: no call was made."""

    kind = "breaker-open"


class LLMDeadlineError(LLMError):
    """No time left before the caller's deadline (for the call, a wait or a retry)."""

    kind = "deadline"


class LLMTimeoutError(LLMError):
    kind = "timeout"


class LLMCallError(LLMError):
    """HTTP errors, refused connections, bodies that are not chat completions."""

    kind = "http-error"


@dataclass(frozen=True)
class ChatReply:
    text: str
    attempts: int
    elapsed_ms: float


class CircuitBreaker:
    """closed -> (N consecutive failures) -> open -> (cool-down) -> half-open -> closed/open.

    Used from one event loop, so no lock: every method runs to completion between awaits.
    """

    def __init__(
        self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.consecutive = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        if self._probing or self.clock() >= self._opened_at + self.cooldown_s:
            return "half-open"
        return "open"

    def retry_in(self) -> float:
        """Seconds until a trial call is let through (0 when calls go through now)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self.cooldown_s - self.clock())

    def describe(self) -> str:
        """Why calls are refused, for reports and errors."""
        return (
            f"circuit breaker open after {self.consecutive} consecutive failures; "
            f"next try in {self.retry_in():.1f} s"
        )

    def allow(self) -> bool:
        """May a call start? In half-open state only one trial call at a time."""
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self.consecutive = 0
        self._opened_at = None
        self._probing = False

    def failure(self) -> None:
        self.consecutive += 1
        if self._probing or self.consecutive >= self.failures:
            self._opened_at = self.clock()
        self._probing = False

    def abandon(self) -> None:
        """A trial call ended without an outcome (cancelled): let the next call try."""
        self._probing = False


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _loggable(messages: list[dict[str, Any]]) -> str:
    """The messages as JSON with each data: URL replaced by its size and sha256."""

    def scrub(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: scrub(v) for k, v in x.items()}
        if isinstance(x, list):
            return [scrub(v) for v in x]
        if isinstance(x, str) and x.startswith("data:"):
            digest = hashlib.sha256(x.encode()).hexdigest()[:16]
            return f"<data URL, {len(x)} chars, sha256 {digest}>"
        return x

    return json.dumps(scrub(messages), ensure_ascii=False)


def _content(body: Any) -> str:
    """The text of the first choice (a string, or a list of text parts)."""
    message = body["choices"][0]["message"]
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise TypeError("content is neither text nor a list of parts")
    return content


class ChatClient:
    """One per process; ``chat`` from the event loop the client was first used in."""

    def __init__(self, config: LLMConfig, *, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self.breaker = CircuitBreaker(config.breaker_failures, config.breaker_cooldown_s, clock)
        self._sem = asyncio.Semaphore(config.max_concurrency)
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        # Environment proxies are ignored: the LLM server is named explicitly by its URL.
        self._http = httpx.AsyncClient(
            base_url=config.base_url.rstrip("/") + "/",
            headers=headers,
            trust_env=False,
            limits=httpx.Limits(max_connections=config.max_concurrency),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def _backoff(self, attempt: int) -> float:
        cap = min(self.config.backoff_max_s, self.config.backoff_s * 2**attempt)
        return cap / 2 + random.uniform(0, cap / 2)  # "equal jitter": spread, never zero

    async def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        deadline: float,
        temperature: float = 0.0,
        context: str = "",
    ) -> ChatReply:
        """One chat completion, retried within ``deadline`` (a ``clock()`` time)."""
        cfg = self.config
        probe = self.breaker.state == "half-open"
        if not self.breaker.allow():
            raise LLMUnavailableError(self.breaker.describe())
        payload: dict[str, Any] = {
            "model": cfg.model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": cfg.max_tokens,
        }
        if cfg.json_mode:
            payload["response_format"] = {"type": "json_object"}
        if log.isEnabledFor(logging.DEBUG):  # the scrub and hash are not free
            log.debug("llm request [%s] model=%s: %s", context, cfg.model, _loggable(messages))
        start = self.clock()
        attempt = 0
        try:
            while True:
                attempt += 1
                text, retry, error = await self._attempt(payload, deadline, context, attempt)
                if error is None:
                    elapsed = (self.clock() - start) * 1000
                    log.debug("llm answer [%s] attempt %d: %s", context, attempt, text)
                    return ChatReply(text=text or "", attempts=attempt, elapsed_ms=elapsed)
                error.attempts = attempt
                if retry is None or attempt > cfg.max_retries:
                    raise error
                if self.breaker.state == "open":
                    raise LLMUnavailableError(
                        f"{error}; the circuit breaker opened, no more retries", attempts=attempt
                    )
                if self.clock() + retry >= deadline:
                    raise LLMDeadlineError(
                        f"{error}; a retry in {retry:.1f} s would pass the deadline",
                        attempts=attempt,
                    )
                log.debug("llm retry [%s] in %.2f s after: %s", context, retry, error)
                await asyncio.sleep(retry)
        finally:
            if probe:
                self.breaker.abandon()  # a no-op once the probe's outcome was recorded

    async def _attempt(
        self, payload: dict[str, Any], deadline: float, context: str, attempt: int
    ) -> tuple[str | None, float | None, LLMError | None]:
        """One HTTP attempt -> (text, None, None) or (None, retry delay or None, error)."""
        cfg = self.config
        remaining = deadline - self.clock()
        if remaining <= 0:
            return None, None, LLMDeadlineError("no time left before the deadline")
        try:
            await asyncio.wait_for(self._sem.acquire(), remaining)
        except TimeoutError:
            return None, None, LLMDeadlineError("waited for a free LLM slot until the deadline")
        try:
            remaining = deadline - self.clock()
            per_call = min(cfg.timeout_s, remaining)
            timeout = httpx.Timeout(per_call, connect=min(cfg.connect_timeout_s, per_call))
            try:
                # httpx times each read, not the whole answer: the outer bound makes a
                # trickling server stop at the per-call timeout too.
                response = await asyncio.wait_for(
                    self._http.post("chat/completions", json=payload, timeout=timeout), per_call
                )
            except (httpx.TimeoutException, TimeoutError):
                self.breaker.failure()
                err = LLMTimeoutError(f"no answer within {per_call:.2f} s")
                return None, self._backoff(attempt - 1), err
            except httpx.TransportError as exc:
                self.breaker.failure()
                err = LLMCallError(f"connection failed ({type(exc).__name__}: {exc})")
                return None, self._backoff(attempt - 1), err
        finally:
            self._sem.release()
        status = response.status_code
        log.debug("llm http [%s] attempt %d: status %d", context, attempt, status)
        if status == 429:
            wait = _retry_after_s(response.headers.get("retry-after"))
            err = LLMCallError("rate limited (429)")
            return None, wait if wait is not None else self._backoff(attempt - 1), err
        if status >= 500:
            self.breaker.failure()
            wait = _retry_after_s(response.headers.get("retry-after"))
            err = LLMCallError(f"server error {status}")
            return None, wait if wait is not None else self._backoff(attempt - 1), err
        if status != 200:
            self.breaker.failure()  # a wrong key or model fails every call alike
            return None, None, LLMCallError(f"HTTP {status}: {response.text[:200]}")
        try:
            text = _content(response.json())
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            self.breaker.failure()
            err = LLMCallError(f"the answer is not a chat completion: {response.text[:200]!r}")
            return None, None, err
        self.breaker.success()
        return text, None, None
