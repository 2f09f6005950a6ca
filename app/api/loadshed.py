"""Load shedding: at most `max_requests_in_flight` requests are worked on at once; the rest wait up to
`request_queue_s` for a turn and are then answered 503 with Retry-After. One client (an API key, or an
address when keys are off) gets at most `max_requests_in_flight_per_client` of those turns; past that
its requests are answered 429 with Retry-After at once, so one busy client cannot take the server
from the others (nor make its own requests wait behind each other for seconds).

Without it, a burst of requests queues inside the server without bound (in the thread pool, then for
database connections) and every client waits for all of them; with it, a client past the server's
capacity learns so in seconds and can back off, while the requests let in finish quickly. A turn ends
when the response starts, so a streamed generation does not hold one (the inference engine has its
own limit, max_concurrent_generations). Probes and /metrics never wait: they must answer while the
API is saturated.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import send_error
from app.api.paths import PROBE_PATHS
from app.api.ratelimit import client_key
from app.exceptions import Busy, RateLimited

RETRY_AFTER_S = 1


class ConcurrencyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_in_flight: int, per_client: int, queue_s: float) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.per_client = per_client
        self.queue_s = queue_s
        self._slots: asyncio.Semaphore | None = None  # made on first use, inside the server's loop
        # Requests of each client admitted or waiting; only touched on the event loop, so no lock.
        self._clients: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        client = client_key(scope)
        if self._clients[client] >= self.per_client:
            await send_error(send, self._client_busy())
            return
        self._clients[client] += 1
        try:
            await self._admitted(scope, receive, send)
        finally:
            self._clients[client] -= 1
            if not self._clients[client]:
                del self._clients[client]

    async def _admitted(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_in_flight)
        slots = self._slots
        try:
            await asyncio.wait_for(slots.acquire(), timeout=self.queue_s)
        except TimeoutError:
            await send_error(send, self._busy())
            return
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                slots.release()

        async def send_releasing(message: Message) -> None:
            if message["type"] == "http.response.start":
                release()
            await send(message)

        try:
            await self.app(scope, receive, send_releasing)
        finally:
            release()

    def _busy(self) -> Busy:
        return Busy(
            f"the server is at its limit of {self.max_in_flight} requests in flight "
            f"(max_requests_in_flight) and none finished within {self.queue_s:g} s; "
            f"retry after {RETRY_AFTER_S} s",
            retry_after=RETRY_AFTER_S,
        )

    def _client_busy(self) -> RateLimited:
        return RateLimited(
            f"this client already has {self.per_client} requests in progress "
            f"(max_requests_in_flight_per_client); wait for one to finish, or retry after {RETRY_AFTER_S} s",
            retry_after=RETRY_AFTER_S,
        )
