"""Per-key rate limit: a token bucket per API key (or per client address when no key is sent).

It runs as ASGI middleware, before authentication, so a flood of requests with a wrong key is
throttled as cheaply as one with a right key. The key is hashed so raw secrets never sit in memory
longer than the request that carried them. One process keeps its own buckets: the service runs one
API process per host, so there is no shared store to consult.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import send_error
from app.api.paths import PROBE_PATHS
from app.exceptions import RateLimited

# Probes and scrapes must keep working while a client is being throttled.
EXEMPT_PATHS = PROBE_PATHS
# Above this many buckets, full (idle) ones are dropped so a scan of random keys cannot grow memory.
MAX_BUCKETS = 10_000


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets: `per_minute` requests in a burst, refilled evenly over a minute."""

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._rate = per_minute / 60.0  # tokens per second
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float:
        """Take one token for `key`. Returns 0 when allowed, else the seconds until one is free."""
        with self._lock:
            now = self._clock()
            bucket = self._refilled(key, now)
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self._rate

    def _refilled(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._drop_idle(now)
            bucket = self._buckets[key] = _Bucket(float(self.per_minute), now)
            return bucket
        bucket.tokens = min(float(self.per_minute), bucket.tokens + (now - bucket.updated) * self._rate)
        bucket.updated = now
        return bucket

    def _drop_idle(self, now: float) -> None:
        full_after = self.per_minute / self._rate
        for key in [k for k, b in self._buckets.items() if now - b.updated >= full_after]:
            del self._buckets[key]


def client_key(scope: Scope) -> str:
    """The bucket a request draws from: its bearer token's hash, else its client address."""
    for name, value in scope.get("headers", []):
        if name == b"authorization" and value.lower().startswith(b"bearer "):
            return "key:" + hashlib.sha256(value[7:].strip()).hexdigest()[:32]
    client = scope.get("client")
    return f"addr:{client[0] if client else 'unknown'}"


class RateLimitMiddleware:
    """Answers 429 with Retry-After once a key has spent its requests for the minute."""

    def __init__(self, app: ASGIApp, *, per_minute: int) -> None:
        self.app = app
        self.limiter = RateLimiter(per_minute) if per_minute > 0 else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.limiter is None or scope["type"] != "http" or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        wait_s = self.limiter.acquire(client_key(scope))
        if wait_s <= 0:
            await self.app(scope, receive, send)
            return
        await _send_rate_limited(send, self.limiter.per_minute, math.ceil(wait_s))


async def _send_rate_limited(send: Send, per_minute: int, retry_after: int) -> None:
    error = RateLimited(
        f"rate limit of {per_minute} requests per minute (rate_limit_per_minute) exceeded for this "
        f"API key; retry after {retry_after} s",
        retry_after=retry_after,
    )
    await send_error(send, error)
