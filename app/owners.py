"""Tenants: every file, job and adapter belongs to the API key that made it (`api_key_id`).

A route passes the `owner` its key may see: the key's id, or None for "everything" (an admin key,
or auth=none, where there are no keys). Another key's object is reported as not existing (404, with
the same text as a missing one), never as forbidden, so ids cannot be probed. Job events and
checkpoints belong to their job; Idempotency-Keys are already scoped per key (app.queue).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, true


def may_see(row_owner: str | None, owner: str | None) -> bool:
    return owner is None or row_owner == owner


def where_owned(column: Any, owner: str | None) -> ColumnElement[bool]:
    """The filter for a list or look-up: no restriction for None."""
    return true() if owner is None else column == owner
