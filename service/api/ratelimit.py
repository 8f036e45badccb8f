"""Per-client request limits: a token bucket in the process, or a fixed window in Redis.

In-process (no GEOLOC_REDIS_URL): each identity has a bucket of ``per_minute`` tokens that
refills continuously, so bursts up to the limit pass and the long-run rate is the limit.
With Redis, replicas share one counter per identity and minute (INCR + EXPIRE): at most
``per_minute`` requests in each calendar minute across all replicas. When Redis cannot be
reached the limiter falls back to the in-process bucket (and logs it) rather than refusing
every request.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Protocol

from service.api.problems import RateLimitedError

log = logging.getLogger(__name__)


class RateLimiter(Protocol):
    async def hit(self, identity: str) -> None:
        """Count one request of ``identity``; raise RateLimitedError when over the limit."""

    async def close(self) -> None: ...


def _refuse(per_minute: int, retry_after: float) -> RateLimitedError:
    wait = max(1, math.ceil(retry_after))
    return RateLimitedError(
        f"more than {per_minute} requests per minute; retry in {wait} s",
        headers={"Retry-After": str(wait)},
    )


class TokenBucketLimiter:
    #: Buckets not touched for this long are dropped (they would be full anyway).
    IDLE_S = 120.0

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self._buckets: dict[str, tuple[float, float]] = {}  # identity -> (tokens, last time)
        self._lock = threading.Lock()
        self._last_sweep = time.monotonic()

    def take(self, identity: str, now: float | None = None) -> float:
        """0 when allowed, else the seconds until a token is free."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if now - self._last_sweep > self.IDLE_S:
                self._buckets = {
                    k: v for k, v in self._buckets.items() if now - v[1] <= self.IDLE_S
                }
                self._last_sweep = now
            tokens, last = self._buckets.get(identity, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[identity] = (tokens - 1.0, now)
                return 0.0
            self._buckets[identity] = (tokens, now)
            return (1.0 - tokens) / self.rate

    async def hit(self, identity: str) -> None:
        wait = self.take(identity)
        if wait > 0:
            raise _refuse(self.per_minute, wait)

    async def close(self) -> None:
        return None


class RedisWindowLimiter:
    def __init__(self, url: str, per_minute: int, prefix: str) -> None:
        import redis.asyncio as aioredis

        self.per_minute = per_minute
        self.prefix = prefix
        self.client = aioredis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
        self.fallback = TokenBucketLimiter(per_minute)
        self._warned = False

    async def hit(self, identity: str) -> None:
        from redis.exceptions import RedisError

        now = time.time()
        window = int(now // 60)
        key = f"{self.prefix}:ratelimit:{identity}:{window}"
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.expire(key, 120)
                count, _ = await pipe.execute()
            self._warned = False
        except (RedisError, OSError) as exc:
            if not self._warned:
                log.warning("Redis rate limiter unavailable (%s); limiting in-process", exc)
                self._warned = True
            await self.fallback.hit(identity)
            return
        if int(count) > self.per_minute:
            raise _refuse(self.per_minute, (window + 1) * 60 - now)

    async def close(self) -> None:
        await self.client.aclose()


def make_limiter(per_minute: int, redis_url: str, prefix: str) -> RateLimiter | None:
    if per_minute <= 0:
        return None
    if redis_url:
        return RedisWindowLimiter(redis_url, per_minute, prefix)
    return TokenBucketLimiter(per_minute)
