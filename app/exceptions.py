"""Domain errors. Raised anywhere (API, queue, inference); mapped to HTTP status codes at the edge.

Messages say what went wrong and what to do about it, e.g.
``InvalidInput("max_new_tokens", "must be at most 4096; ask for fewer")``.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base class. `code` is a stable machine-readable string; `status` the HTTP status at the edge."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "field": self.field}

    def headers(self) -> dict[str, str]:
        """HTTP headers every response carrying this error adds (whatever its body's shape)."""
        return {}


class InvalidInput(ServiceError):
    """A request field is out of range or malformed. The message names the field and the limit."""

    status = 422
    code = "invalid_input"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", field=field)


class NotFound(ServiceError):
    status = 404
    code = "not_found"


class Conflict(ServiceError):
    """The request contradicts current state (job already finished, adapter for another base, ...)."""

    status = 409
    code = "conflict"


class LimitExceeded(ServiceError):
    """A size limit (upload bytes, rows, prompt tokens) was passed."""

    status = 413
    code = "limit_exceeded"


class Busy(ServiceError):
    """Too much work in flight; the client should retry after `retry_after` seconds."""

    status = 503
    code = "busy"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class RateLimited(Busy):
    status = 429
    code = "rate_limited"


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"


class Forbidden(ServiceError):
    status = 403
    code = "forbidden"


class TransitionError(ServiceError):
    """A guarded job state change updated zero rows: the job was not in a state that allows it."""

    status = 409
    code = "invalid_transition"


class DatasetInvalid(InvalidInput):
    """A dataset row failed validation; `row` is 1-based so the user can find it in their file."""

    code = "invalid_dataset"

    def __init__(self, field: str, message: str, *, row: int | None = None) -> None:
        super().__init__(field, message)
        self.row = row

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "row": self.row}
