"""The web console: its page and static files at /, and the server-sent event streams it follows.

The page is one hand-written bundle (app/console/static: HTML, JS, CSS; no build step, no CDN). It
calls the same routes any client calls, with the API key from the browser's sessionStorage. Live
data comes from two streams here, both read with fetch() (EventSource cannot send the
Authorization header, and a key in a query string would land in access logs):

- GET /console/events: the newest jobs, read from the database once per interval for every open
  console together (JobsFeed), sent whenever something in them changed.
- GET /console/jobs/{job_id}/events: one job, then its events (metrics, eval, log, checkpoint,
  status) as they are written, until the job has finished.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app import queue
from app.api.deps import ReadKey, SessionDep, SettingsDep, owner_of
from app.api.routes.jobs import job_public
from app.exceptions import NotFound
from app.ml.data import sample_names
from app.models import Job
from app.pagination import MAX_EVENT_ID
from app.schemas import UtcDateTime, as_utc

log = logging.getLogger("app.console")
router = APIRouter(include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parents[2] / "console" / "static"
# The bundle's files by name: a fixed list, so no request path ever reaches the filesystem.
STATIC_FILES = {"console.js": "text/javascript", "console.css": "text/css", "favicon.svg": "image/svg+xml"}
FEED_JOBS = 50  # the list shows the newest jobs live; older ones are pages of GET /jobs ("Show older")
POLL_S = 1.0  # one database read per interval, whoever is listening
KEEPALIVE_S = 15.0  # an SSE comment this often keeps proxies from closing an idle stream
EVENTS_PER_READ = 500
FINAL = frozenset({"succeeded", "failed", "cancelled"})
# The page runs no inline script or style and loads nothing from elsewhere.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@router.get("/", response_class=HTMLResponse)
def console_page() -> FileResponse:
    """The console. Public like /docs: it holds no data; every call it makes needs a key."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)


@router.get("/console/static/{name}")
def console_static(name: str) -> FileResponse:
    if name not in STATIC_FILES:
        raise NotFound(f"no console file {name!r}", field="name")
    return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name], headers=PAGE_HEADERS)


@router.get("/console/config")
def console_config(request: Request, settings: SettingsDep) -> JSONResponse:
    """What the page needs before it has a key: whether to ask for one, the base model, the samples."""
    return JSONResponse(
        {
            "auth": settings.auth,
            "base_model": settings.resolved_base_model(),
            "samples": [f"sample:{name}" for name in sample_names()],
            "title": request.app.title,
            "version": request.app.version,
        }
    )


# --- the job list -------------------------------------------------------------------------------------


class JobSummary(BaseModel):
    """One row of the console's job list: what changes while a job runs, from the job row alone."""

    id: str
    name: str | None
    status: str
    dataset: str
    step: int
    total_steps: int | None
    train_loss: float | None
    eval_loss: float | None
    tokens_per_s: float | None
    eta_s: float | None
    queue_position: int | None
    cancel_requested: bool
    error: str | None
    adapter_id: str | None
    created_at: UtcDateTime
    finished_at: UtcDateTime | None


def _summary(session: Session, job: Job) -> JobSummary:
    return JobSummary(
        id=job.id,
        name=job.name,
        status=job.status,
        dataset=job.dataset,
        step=job.step,
        total_steps=job.total_steps,
        train_loss=job.train_loss,
        eval_loss=job.eval_loss,
        tokens_per_s=job.tokens_per_s,
        eta_s=job.eta_s,
        queue_position=queue.queue_position(session, job),  # a query only for queued jobs
        cancel_requested=job.cancel_requested,
        error=f"{job.error_code}: {job.error_message}" if job.error_code else None,
        adapter_id=job.adapter_id,
        created_at=job.created_at,
        finished_at=job.finished_at,
    )


class JobsFeed:
    """The newest jobs as one JSON text, read once per interval however many consoles follow it.

    The reading task runs only while someone listens. Each listener gets the text now and then at
    every change, or None after KEEPALIVE_S without one (the stream sends a comment then).
    """

    def __init__(self, read: Callable[[], str], interval_s: float = POLL_S) -> None:
        self._read = read
        self.interval_s = interval_s
        self.text = ""
        self.version = 0
        self._changed = asyncio.Condition()
        self._listeners = 0
        self._task: asyncio.Task[None] | None = None

    async def follow(self) -> AsyncIterator[str | None]:
        self._listeners += 1
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._poll())
        seen = 0
        try:
            while True:
                text = await self._next(seen)
                if text is not None:
                    seen = self.version
                yield text
        finally:
            self._listeners -= 1

    async def _next(self, seen: int) -> str | None:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.version != seen), KEEPALIVE_S)
            except TimeoutError:
                return None
            return self.text

    async def _poll(self) -> None:
        while self._listeners > 0:
            try:
                text = await run_in_threadpool(self._read)
            except Exception:  # a locked or unreachable database: keep the streams, try again
                log.warning("console feed: could not read the jobs", exc_info=True)
            else:
                if text != self.text:
                    async with self._changed:
                        self.text, self.version = text, self.version + 1
                        self._changed.notify_all()
            await asyncio.sleep(self.interval_s)


def _feed(request: Request, owner: str | None) -> JobsFeed:
    """One shared poller per owner (app.owners): a key's console lists only its own jobs."""
    state = request.app.state
    if getattr(state, "console_feeds", None) is None:
        state.console_feeds = {}
    feeds: dict[str | None, JobsFeed] = state.console_feeds
    if owner not in feeds:
        sessionmaker = state.sessionmaker

        def read() -> str:
            with sessionmaker() as session:
                page = queue.list_jobs(session, status=None, after=None, limit=FEED_JOBS, owner=owner)
                jobs = [_summary(session, job).model_dump(mode="json") for job in page.rows]
            return json.dumps({"jobs": jobs, "has_more": page.has_more})

        feeds[owner] = JobsFeed(read)
    return feeds[owner]


def _sse(event: str, data: str) -> str:
    return f"event: {event}\ndata: {data}\n\n"


SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}  # no proxy buffering


@router.get("/console/events")
async def jobs_stream(request: Request, session: SessionDep, _key: ReadKey) -> StreamingResponse:
    """Server-sent events: `jobs` with the newest jobs' status and progress, at every change."""
    session.close()  # the key is checked; the stream holds no connection while it waits
    feed = _feed(request, owner_of(_key))

    async def events() -> AsyncIterator[str]:
        async for text in feed.follow():
            yield ": keepalive\n\n" if text is None else _sse("jobs", text)

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


# --- one job ------------------------------------------------------------------------------------------


@router.get("/console/jobs/{job_id}/events")
async def job_stream(
    job_id: str,
    request: Request,
    session: SessionDep,
    _key: ReadKey,
    after: Annotated[int, Query(ge=0, le=MAX_EVENT_ID, description="Last event id already seen.")] = 0,
) -> StreamingResponse:
    """Server-sent events for one job: `job` (JobPublic) when it changes, `events` (new JobEvents, oldest
    first), and `end` once the job has finished and every event was sent."""
    queue.get_job(session, job_id, owner=owner_of(_key))  # 404 now, not inside the stream
    session.close()
    follower = _JobFollower(request.app.state.sessionmaker, job_id, after)

    async def events() -> AsyncIterator[str]:
        quiet = 0.0
        while not await request.is_disconnected():
            sent = False
            for chunk in await run_in_threadpool(follower.read):
                sent = True
                yield chunk
            if follower.finished:
                yield _sse("end", "{}")
                return
            quiet = 0.0 if sent else quiet + POLL_S
            if quiet >= KEEPALIVE_S:
                quiet = 0.0
                yield ": keepalive\n\n"
            await asyncio.sleep(POLL_S)

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


class _JobFollower:
    """One client's cursor on one job: the job when it changed, and the events after `after`."""

    def __init__(self, sessionmaker: Any, job_id: str, after: int) -> None:
        self._sessionmaker = sessionmaker
        self.job_id = job_id
        self.after = after
        self.last_job = ""
        self.finished = False

    def read(self) -> list[str]:
        chunks = []
        with self._sessionmaker() as session:
            job = queue.get_job(session, self.job_id)
            final = job.status in FINAL  # read before the events, so none written after it is missed
            text = job_public(session, job).model_dump_json()
            if text != self.last_job:
                self.last_job = text
                chunks.append(_sse("job", text))
            while True:
                rows, has_more, _ = queue.list_events(
                    session, self.job_id, after=self.after, limit=EVENTS_PER_READ, kind=None
                )
                if rows:
                    self.after = rows[-1].id
                    data = [_event_json(row) for row in rows]
                    chunks.append(_sse("events", json.dumps(data)))
                if not has_more:
                    break
        self.finished = final
        return chunks


def _event_json(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "kind": row.kind,
        "attempt": row.attempt,
        "step": row.step,
        "message": row.message,
        "data": row.data,
        "created_at": as_utc(row.created_at).isoformat(),
    }
