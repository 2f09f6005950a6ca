"""Cursor pagination, one way for every list (jobs, job events, files, adapters).

The cursor is the value of a unique, ordered column (time-ordered ids, or event ids): a page is the
rows past `after` in that column's order, and the next page starts after the page's last row. One
extra row is fetched to tell whether there is more.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session

# The largest integer cursor (event ids): SQLite's INTEGER and PostgreSQL's bigint hold no more, and a
# larger `after` would fail in the driver instead of answering 422.
MAX_EVENT_ID = 2**63 - 1


class PageRows(NamedTuple):
    rows: list[Any]
    has_more: bool
    next_cursor: str | None

    def as_page(self, data: list[Any] | None = None) -> dict[str, Any]:
        """The fields of schemas.Page; `data` replaces the rows when the route maps them first."""
        rows = self.rows if data is None else data
        return {"data": rows, "has_more": self.has_more, "next_cursor": self.next_cursor}


# With a `keep` test, rows are read this many at a time until a page (and one more) is kept.
SCAN_CHUNK = 500


def paginate(
    session: Session,
    query: Select[Any],
    column: InstrumentedAttribute[Any],
    *,
    after: Any,
    limit: int,
    newest_first: bool = True,
    keep: Callable[[Any], bool] | None = None,
) -> PageRows:
    """(rows, has_more, next_cursor) of `query` ordered by `column`, starting after the cursor `after`;
    `keep`: only rows it accepts (a test SQL cannot spell the same on every database), read in chunks
    so that a page is still `limit` kept rows and its cursor the last of them."""
    order = column.desc() if newest_first else column.asc()

    def past(cursor: Any) -> Select[Any]:
        if cursor is None:
            return query
        return query.where(column < cursor if newest_first else column > cursor)

    if keep is None:
        rows = list(session.scalars(past(after).order_by(order).limit(limit + 1)))
    else:
        rows, cursor = [], after
        while len(rows) <= limit:
            chunk = list(session.scalars(past(cursor).order_by(order).limit(SCAN_CHUNK)))
            rows += [row for row in chunk if keep(row)]
            if len(chunk) < SCAN_CHUNK:
                break
            cursor = getattr(chunk[-1], column.key)
    page = rows[:limit]
    cursor = str(getattr(page[-1], column.key)) if page else None
    return PageRows(page, len(rows) > limit, cursor)
