"""Logs for every process (API, worker, training child): one JSON object per line (or a readable line
for a terminal), carrying the request id of the HTTP request and the job id of the job being worked on.

Standard library only (plus app.config), so the worker and the child log the same way as the API
without importing a web framework.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any

from app.config import Settings

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
job_id_var: ContextVar[str | None] = ContextVar("job_id", default=None)

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
