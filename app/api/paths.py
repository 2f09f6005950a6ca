"""The paths that probes and scrapers call every few seconds, spelled once: the health routes and the
metrics route serve them, the rate limit lets them through, the access log keeps their successes quiet."""

from __future__ import annotations

HEALTHZ = "/healthz"
READYZ = "/readyz"
METRICS = "/metrics"
PROBE_PATHS = frozenset({HEALTHZ, READYZ, METRICS})
