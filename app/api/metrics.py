"""Prometheus metrics: `GET /metrics`, installed on the app by `install`.

Job counts and queue depth are read from the database at scrape time (through app.queue), so they
are right even though training runs in other processes; generation latency and throughput are
observed in-process by the generation routes through `observe_generation`, HTTP requests by the
request-context middleware through `record_request`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from app import queue
from app.api.paths import METRICS
from app.inference.base import Engine
from app.models import JOB_STATUSES

log = logging.getLogger("gptoss")

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


def record_request(method: str, route: str, status: int, duration_s: float) -> None:
    """Count one answered HTTP request; `route` is the route template, never the raw path."""
    HTTP_REQUESTS.labels(method, route, str(status)).inc()
    HTTP_LATENCY.labels(method, route).observe(duration_s)


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
    counts = queue.status_counts(session)
    jobs = GaugeMetricFamily("gptoss_jobs", "Jobs by status.", labels=["status"])
    for status in sorted(set(JOB_STATUSES) | set(counts)):
        jobs.add_metric([status], counts.get(status, 0))
    yield jobs
    yield GaugeMetricFamily("gptoss_queue_depth", "Jobs waiting for a worker.", value=counts.get("queued", 0))
    yield GaugeMetricFamily(
        "gptoss_training_tokens_per_second",
        "Training throughput of the running jobs (their latest step), summed.",
        value=queue.running_tokens_per_s(session),
    )
    yield _job_durations(queue.finished_job_durations(session))


def _job_durations(durations: list[tuple[str, float]]) -> Metric:
    """Histogram of finished jobs' run time (started to finished), by final status."""
    family = HistogramMetricFamily(
        "gptoss_job_duration_seconds", "Run time of finished jobs, by final status.", labels=["status"]
    )
    by_status: dict[str, list[float]] = {}
    for status, seconds in durations:
        by_status.setdefault(status, []).append(seconds)
    for status, values in sorted(by_status.items()):
        buckets = [(str(float(b)), sum(v <= b for v in values)) for b in _JOB_DURATION_BUCKETS]
        family.add_metric([status], [*buckets, ("+Inf", len(values))], float(sum(values)))
    return family


class RuntimeCollector(Collector):
    """Loaded adapters (from the app's inference engine) and GPU memory, read at scrape time."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def collect(self) -> Iterable[Metric]:
        engine: Engine | None = getattr(self.app.state, "engine", None)
        if engine is not None:
            loaded = len(engine.loaded_adapters())
            yield GaugeMetricFamily("gptoss_loaded_adapters", "LoRA adapters loaded in memory.", value=loaded)
            yield GaugeMetricFamily(
                "gptoss_generations_in_flight",
                "Generation requests queued or running.",
                value=engine.in_flight(),
            )
        yield from _gpu_memory()


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


def install(app: FastAPI) -> None:
    """This app's scrape-time collectors and GET /metrics. Called once by create_app."""
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(app))
    registry.register(RuntimeCollector(app))
    app.state.metrics_registry = registry
    app.add_api_route(METRICS, metrics_response, methods=["GET"], include_in_schema=False)
