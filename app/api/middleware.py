"""The HTTP middleware, installed on the app by `install`; outermost first: request context
(X-Request-ID in and out, access log, HTTP metrics), rate limit (429 + Retry-After), load shedding
(503 + Retry-After past max_requests_in_flight; app/api/loadshed.py), body size limit (413 naming the
setting).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import send_error
from app.api.loadshed import ConcurrencyLimitMiddleware
from app.api.metrics import record_request
from app.api.paths import PROBE_PATHS
from app.api.ratelimit import RateLimitMiddleware
from app.config import Settings
from app.exceptions import LimitExceeded
from app.logs import request_id_var

log = logging.getLogger("gptoss")
access_log = logging.getLogger("gptoss.access")

# A client's id is echoed only when it is short and plain, so it cannot forge log fields or headers.
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _REQUEST_ID_RE.fullmatch(text) else None
    return None


def _route_label(scope: Scope) -> str:
    """The route template ("/jobs/{job_id}"), never the raw path: raw paths would explode label counts."""
    app = scope.get("app")
    if app is None:
        return "unmatched"
    templates = getattr(app.state, "route_templates", None)
    if templates is None:
        templates = app.state.route_templates = _route_templates(app)
    path = scope["path"]
    return next((template for regex, template in templates if regex.match(path)), "unmatched")


def _route_templates(app: Any) -> list[tuple[re.Pattern[str], str]]:
    # Read from the OpenAPI document (public and prefix-resolved; FastAPI's included routers do not
    # expose their full paths on the route objects), plus the top-level routes kept out of it.
    from starlette.routing import compile_path

    try:
        paths = list(app.openapi().get("paths", {}))
    except Exception:  # a broken schema must not break request accounting
        log.warning("metrics: no OpenAPI document; HTTP routes unlabelled", exc_info=True)
        paths = []
    paths += [route.path for route in app.routes if isinstance(getattr(route, "path", None), str)]
    return [(compile_path(path)[0], path) for path in dict.fromkeys(paths)]


class RequestContextMiddleware:
    """Sets the request id (X-Request-ID in and out), writes the access log line, counts the request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_request_id(scope) or uuid.uuid4().hex
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error")
            raise
        finally:
            _record_request(scope, status, time.perf_counter() - started)
            request_id_var.reset(token)


def _record_request(scope: Scope, status: int, duration_s: float) -> None:
    record_request(scope["method"], _route_label(scope), status, duration_s)
    # Probes and scrapes arrive every few seconds; their successes would drown the lines that matter.
    quiet = scope["path"] in PROBE_PATHS and status < 400
    access_log.log(
        logging.DEBUG if quiet else logging.INFO,
        "%s %s %d",
        scope["method"],
        scope["path"],
        status,
        extra={
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "duration_ms": round(duration_s * 1000, 1),
        },
    )


# Uploads get max_upload_bytes plus room for the multipart framing; the files route checks the file's
# exact size itself, with its own message. Every other body gets max_request_bytes.
UPLOAD_PATHS = ("/files",)
MULTIPART_SLACK_BYTES = 64 * 1024


_Limit = tuple[str, int]  # (setting name, its value)


class _BodyTooLarge(Exception):
    pass


class BodySizeLimitMiddleware:
    """413 for a body over its limit: refused from Content-Length, or cut off while streaming in."""

    def __init__(self, app: ASGIApp, *, max_request_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.max_upload_bytes = max_upload_bytes

    def _limit(self, scope: Scope) -> tuple[int, _Limit]:
        """The byte count enforced here, and the setting named in the error."""
        content_type = _header(scope, b"content-type") or ""
        if scope["path"].rstrip("/") in UPLOAD_PATHS and content_type.startswith("multipart/"):
            return self.max_upload_bytes + MULTIPART_SLACK_BYTES, ("max_upload_bytes", self.max_upload_bytes)
        return self.max_request_bytes, ("max_request_bytes", self.max_request_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self._limit(scope)
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_too_large(send, setting)
            return
        await self._guarded(scope, receive, send, limit, setting)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, limit: int, setting: _Limit) -> None:
        """A body without Content-Length (chunked) is counted as it arrives and stopped at the limit."""
        received = 0
        too_large = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                too_large = True
                raise _BodyTooLarge(setting)
            return message

        async def replacing_send(message: Message) -> None:
            nonlocal started
            # Whatever the app made of the interrupted read (a 400, a 500), the client gets the 413.
            if too_large:
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await _send_too_large(send, setting)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, replacing_send)
        except Exception:
            # The app may re-raise the interrupted read as another error; it is still a 413.
            if not too_large or started:
                raise
            await _send_too_large(send, setting)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def _send_too_large(send: Send, setting: _Limit) -> None:
    name, value = setting
    error = LimitExceeded(
        f"request body is larger than {name} ({value} bytes); send less, or raise "
        f"GPTOSS_{name.upper()} on the server",
        field="body",
    )
    await send_error(send, error)


def install(app: FastAPI, settings: Settings) -> None:
    """The four middlewares. Called once by create_app."""
    # add_middleware wraps the stack built so far: the last one added runs first.
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_request_bytes=settings.max_request_bytes,
        max_upload_bytes=settings.max_upload_bytes,
    )
    app.add_middleware(
        ConcurrencyLimitMiddleware,
        max_in_flight=settings.max_requests_in_flight,
        per_client=settings.max_requests_in_flight_per_client,
        queue_s=settings.request_queue_s,
    )
    app.add_middleware(RateLimitMiddleware, per_minute=settings.rate_limit_per_minute)
    app.add_middleware(RequestContextMiddleware)
