"""Cursor pagination, one way for every list (jobs, job events, files, adapters).

The cursor is the value of a unique, ordered column (time-ordered ids, or event ids): a page is the
rows past `after` in that column's order, and the next page starts after the page's last row. One
extra row is fetched to tell whether there is more.
"""

from __future__ import annotations

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


def paginate(
    session: Session,
    query: Select[Any],
    column: InstrumentedAttribute[Any],
    *,
    after: Any,
    limit: int,
    newest_first: bool = True,
) -> PageRows:
    """(rows, has_more, next_cursor) of `query` ordered by `column`, starting after the cursor `after`."""
    if after is not None:
        query = query.where(column < after if newest_first else column > after)
    query = query.order_by(column.desc() if newest_first else column.asc()).limit(limit + 1)
    rows = list(session.scalars(query))
    page = rows[:limit]
    cursor = str(getattr(page[-1], column.key)) if page else None
    return PageRows(page, len(rows) > limit, cursor)
