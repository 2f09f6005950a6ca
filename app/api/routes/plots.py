"""GET /jobs/<id>/loss.png: a job's loss curve, for people who would rather look than read.

Drawn from the job's per-step metrics events, so it works for running jobs (a browser tab that is
reloaded shows progress) and for finished ones alike.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from sqlalchemy.orm import Session

from app import queue
from app.api.deps import ReadKey, SessionDep, owner_of
from app.models import Job

router = APIRouter(tags=["jobs"])

# Keys a metrics event may carry its losses under (TRL's names and the job row's names).
TRAIN_LOSS_KEYS = ("loss", "train_loss")
EVAL_LOSS_KEYS = ("eval_loss",)


@dataclass
class LossCurve:
    """Loss by step; a step logged twice (a resumed attempt) keeps its latest value."""

    train: dict[int, float] = field(default_factory=dict)
    eval: dict[int, float] = field(default_factory=dict)

    def add(self, step: int, data: dict[str, Any]) -> None:
        for keys, series in ((TRAIN_LOSS_KEYS, self.train), (EVAL_LOSS_KEYS, self.eval)):
            value = _first_number(data, keys)
            if value is not None:
                series[step] = value


def _first_number(data: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    for key in keys:
        value = data.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def load_curve(session: Session, job_id: str) -> LossCurve:
    curve = LossCurve()
    for step, data in queue.metrics_series(session, job_id):
        curve.add(step, data)
    return curve


def render_png(job: Job, curve: LossCurve) -> bytes:
    # Imported here so that starting the API does not pay for matplotlib; Figure (not pyplot) keeps
    # no global state, so concurrent requests in the thread pool cannot draw on each other's plots.
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.subplots()
    _draw(ax, curve)
    if job.total_steps and (curve.train or curve.eval):
        # The full planned run on the x axis: a running job's curve shows how far along it is.
        ax.set_xlim(0, max(job.total_steps, *curve.train, *curve.eval))
    ax.set_title(_title(job), fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _draw(ax: Any, curve: LossCurve) -> None:
    if not curve.train and not curve.eval:
        ax.text(0.5, 0.5, "no training steps logged yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    if curve.train:
        steps = sorted(curve.train)
        ax.plot(steps, [curve.train[s] for s in steps], label="train loss", linewidth=1.5)
    if curve.eval:
        steps = sorted(curve.eval)
        ax.plot(steps, [curve.eval[s] for s in steps], "o--", label="eval loss")
    ax.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()


def _title(job: Job) -> str:
    progress = f"step {job.step}" + (f"/{job.total_steps}" if job.total_steps else "")
    name = f" ({job.name})" if job.name else ""
    return f"{job.id}{name}: {job.status}, {progress}"


@router.get(
    "/jobs/{job_id}/loss.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def job_loss_png(job_id: str, session: SessionDep, _key: ReadKey) -> Response:
    """The job's training (and eval) loss by step, as a PNG image."""
    job = queue.get_job(session, job_id, owner=owner_of(_key))
    png = render_png(job, load_curve(session, job_id))
    # A running job's curve changes with every step; never let a browser show a stale one.
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})
