"""Metrics, structured logs, request ids and the request limits, installed on the app by `install`.

- `/metrics` (Prometheus): job counts and queue depth are read from the database at scrape time, so
  they are right even though training runs in other processes; generation latency and throughput are
  observed in-process by the inference engine through `observe_generation`.
- Logs: `configure_logging(settings)` (the API and the worker both call it) writes one JSON object per
  line, carrying the request id of the HTTP request and the job id of the job being worked on.
- Middleware, outermost first: request context (X-Request-ID in and out, access log, HTTP metrics),
  rate limit (429 + Retry-After), body size limit (413 naming the setting).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings
from app.exceptions import LimitExceeded

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("gptoss")
access_log = logging.getLogger("gptoss.access")

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
job_id_var: ContextVar[str | None] = ContextVar("job_id", default=None)

# --------------------------------------------------------------------------------------------------
# In-process metrics (one registry per process; every app built in it shares them)
# --------------------------------------------------------------------------------------------------

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
_TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
_JOB_DURATION_BUCKETS = (60, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400)

GENERATE_LATENCY = Histogram(
    "gptoss_generate_latency_seconds",
    "Wall time of one generation request, queueing included.",
    ["adapter"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
GENERATE_TOKENS_PER_S = Histogram(
    "gptoss_generate_tokens_per_second",
    "New tokens per second of one generation request.",
    ["adapter"],
    buckets=_TPS_BUCKETS,
    registry=REGISTRY,
)
GENERATED_TOKENS = Counter("gptoss_generated_tokens", "New tokens generated.", ["adapter"], registry=REGISTRY)
HTTP_REQUESTS = Counter(
    "gptoss_http_requests", "HTTP requests answered.", ["method", "route", "status"], registry=REGISTRY
)
HTTP_LATENCY = Histogram(
    "gptoss_http_request_duration_seconds",
    "HTTP request wall time.",
    ["method", "route"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)


def observe_generation(latency_s: float, tokens: int, adapter: str | None) -> None:
    """Record one finished generation; `adapter` None means the base model."""
    label = adapter or "base"
    GENERATE_LATENCY.labels(label).observe(latency_s)
    GENERATED_TOKENS.labels(label).inc(tokens)
    if latency_s > 0 and tokens > 0:
        GENERATE_TOKENS_PER_S.labels(label).observe(tokens / latency_s)


# --------------------------------------------------------------------------------------------------
# Scrape-time metrics (one registry per app: its database and its inference engine)
# --------------------------------------------------------------------------------------------------


class DatabaseCollector(Collector):
    """Job counts, queue depth, job durations and training throughput, read when Prometheus scrapes."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def collect(self) -> Iterable[Metric]:
        try:
            with self.app.state.sessionmaker() as session:
                # Materialised inside the try: a busy or not-yet-migrated database must not fail the scrape.
                metrics = list(_job_metrics(session))
        except Exception:
            log.warning("metrics: database not readable", exc_info=True)
            return
        yield from metrics


def _job_metrics(session: Any) -> Iterator[Metric]:
    from sqlalchemy import func, select

    from app.models import JOB_STATUSES, Job

    counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    jobs = GaugeMetricFamily("gptoss_jobs", "Jobs by status.", labels=["status"])
    for status in sorted(set(JOB_STATUSES) | set(counts)):
        jobs.add_metric([status], counts.get(status, 0))
    yield jobs
    yield GaugeMetricFamily("gptoss_queue_depth", "Jobs waiting for a worker.", value=counts.get("queued", 0))
    running_tps = session.scalar(select(func.sum(Job.tokens_per_s)).where(Job.status == "running"))
    yield GaugeMetricFamily(
        "gptoss_training_tokens_per_second",
        "Training throughput of the running jobs (their latest step), summed.",
        value=float(running_tps or 0.0),
    )
    yield _job_durations(session)


def _job_durations(session: Any) -> Metric:
    """Histogram of finished jobs' run time (started to finished), bucketed in SQL."""
    from sqlalchemy import case, func, select

    from app.models import Job

    seconds = (func.julianday(Job.finished_at) - func.julianday(Job.started_at)) * 86400.0
    bucket_cols = [func.sum(case((seconds <= b, 1), else_=0)) for b in _JOB_DURATION_BUCKETS]
    query = (
        select(Job.status, func.count(), func.coalesce(func.sum(seconds), 0.0), *bucket_cols)
        .where(Job.finished_at.is_not(None), Job.started_at.is_not(None))
        .group_by(Job.status)
    )
    family = HistogramMetricFamily(
        "gptoss_job_duration_seconds", "Run time of finished jobs, by final status.", labels=["status"]
    )
    for status, count, total, *cumulative in session.execute(query).all():
        buckets = [
            (str(float(b)), int(c or 0)) for b, c in zip(_JOB_DURATION_BUCKETS, cumulative, strict=True)
        ]
        family.add_metric([status], [*buckets, ("+Inf", int(count))], float(total))
    return family


class RuntimeCollector(Collector):
    """Loaded adapters (from the app's inference engine) and GPU memory, read at scrape time."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def collect(self) -> Iterable[Metric]:
        engine = getattr(self.app.state, "engine", None)
        loaded = _loaded_adapter_count(engine)
        if loaded is not None:
            yield GaugeMetricFamily("gptoss_loaded_adapters", "LoRA adapters loaded in memory.", value=loaded)
        in_flight = getattr(engine, "in_flight", None)
        if callable(in_flight):
            yield GaugeMetricFamily(
                "gptoss_generations_in_flight", "Generation requests queued or running.", value=in_flight()
            )
        yield from _gpu_memory()


def _loaded_adapter_count(engine: Any) -> int | None:
    if engine is None:
        return None
    loaded = getattr(engine, "loaded_adapters", None)
    if callable(loaded):
        loaded = loaded()
    return len(loaded) if loaded is not None else None


def _gpu_memory() -> Iterator[Metric]:
    # Only where torch is already imported: a scrape must never pay for importing it.
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return
    families = {
        "allocated": GaugeMetricFamily(
            "gptoss_gpu_memory_allocated_bytes", "GPU memory in the API's tensors.", labels=["device"]
        ),
        "reserved": GaugeMetricFamily(
            "gptoss_gpu_memory_reserved_bytes", "GPU memory held by the API's allocator.", labels=["device"]
        ),
        # Device-wide, so a training worker's share (another process) shows too.
        "used": GaugeMetricFamily(
            "gptoss_gpu_memory_used_bytes", "GPU memory in use by all processes.", labels=["device"]
        ),
        "total": GaugeMetricFamily("gptoss_gpu_memory_total_bytes", "GPU memory in all.", labels=["device"]),
    }
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        device = [str(index)]
        families["allocated"].add_metric(device, torch.cuda.memory_allocated(index))
        families["reserved"].add_metric(device, torch.cuda.memory_reserved(index))
        families["used"].add_metric(device, total - free)
        families["total"].add_metric(device, total)
    yield from families.values()


def metrics_response(request: Request) -> Response:
    """Prometheus text format: the process-wide series, then this app's scrape-time series."""
    app_registry: CollectorRegistry = request.app.state.metrics_registry
    body = generate_latest(REGISTRY) + generate_latest(app_registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


# --------------------------------------------------------------------------------------------------
# Logs
# --------------------------------------------------------------------------------------------------

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged as a field
# (but uvicorn's terminal-coloured copy of the message, which would only be noise).
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id / job_id when set, extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_context_fields(record))
        entry.update({k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and k not in entry})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """For a person at a terminal (log_json=False): the same context, on one readable line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(f"{k}={v}" for k, v in _context_fields(record).items())
        return f"{line} [{context}]" if context else line


def _context_fields(record: logging.LogRecord) -> dict[str, str]:
    fields = {}
    for name, var in (("request_id", request_id_var), ("job_id", job_id_var)):
        value = getattr(record, name, None) or var.get()
        if value:
            fields[name] = str(value)
    return fields


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is when a line is logged: test runners and servers swap it."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, _value: IO[str]) -> None:
        pass


def configure_logging(settings: Settings, *, stream: IO[str] | None = None) -> None:
    """Route every logger (uvicorn's too) to one handler on stderr. Safe to call more than once."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_gptoss", False)]:
        root.removeHandler(old)
    handler: logging.Handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.setFormatter(JsonFormatter() if settings.log_json else TextFormatter())
    handler._gptoss = True  # type: ignore[attr-defined]  # marks the handler this function owns
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    # Our middleware writes the access line, with the request id; uvicorn's own would be a duplicate.
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # a line per plugin, every start
    if settings.log_json:
        _disable_progress_bars()


def _disable_progress_bars() -> None:
    """Hugging Face's tqdm bars redraw a line with carriage returns, which would break a stream of one
    JSON object per line. The variable reaches child processes and libraries imported later; the
    calls cover those already imported."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


@contextmanager
def log_context(*, job_id: str | None = None, request_id: str | None = None) -> Iterator[None]:
    """Every log line inside carries these ids (the worker wraps each job in one)."""
    tokens = []
    if job_id is not None:
        tokens.append((job_id_var, job_id_var.set(job_id)))
    if request_id is not None:
        tokens.append((request_id_var, request_id_var.set(request_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


# --------------------------------------------------------------------------------------------------
# Middleware
# --------------------------------------------------------------------------------------------------

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


_PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def _record_request(scope: Scope, status: int, duration_s: float) -> None:
    route = _route_label(scope)
    HTTP_REQUESTS.labels(scope["method"], route, str(status)).inc()
    HTTP_LATENCY.labels(scope["method"], route).observe(duration_s)
    # Probes and scrapes arrive every few seconds; their successes would drown the lines that matter.
    quiet = scope["path"] in _PROBE_PATHS and status < 400
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
    body = json.dumps({"error": error.to_dict()}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------------------------------
# Install
# --------------------------------------------------------------------------------------------------


def install(app: FastAPI, settings: Settings) -> None:
    """Logging, the three middlewares and GET /metrics. Called once by create_app."""
    from app.api.ratelimit import RateLimitMiddleware

    configure_logging(settings)
    # add_middleware wraps the stack built so far: the last one added runs first.
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_request_bytes=settings.max_request_bytes,
        max_upload_bytes=settings.max_upload_bytes,
    )
    app.add_middleware(RateLimitMiddleware, per_minute=settings.rate_limit_per_minute)
    app.add_middleware(RequestContextMiddleware)
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(app))
    registry.register(RuntimeCollector(app))
    app.state.metrics_registry = registry
    app.add_api_route("/metrics", metrics_response, methods=["GET"], include_in_schema=False)
