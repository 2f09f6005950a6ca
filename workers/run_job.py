"""The child process that trains one job: `python -m workers.run_job <job id>`.

Started by workers/worker.py in a clean interpreter. It writes the job's events and progress through
its own database session (SQLite WAL + busy timeout let it write beside the worker's heartbeats) and
ends by writing data_dir/jobs/<id>/result.json, which the worker reads to finalise the job:
    {"status": "succeeded", "adapter_id", "adapter_name", "adapter_path", "backend"}
    {"status": "stopped"}                        SIGTERM (cancel or worker shutdown), checkpoint saved
    {"status": "failed", "code", "message"}      a clean failure (bad dataset, bad config, ...)
A crash leaves no result; the worker reports the exit status and the end of the output instead.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from app import adapter_folder, datasets, queue
from app.config import Settings, get_settings
from app.db import make_engine
from app.exceptions import ServiceError
from app.ml.data import DatasetError
from app.models import Job, JobStatus

log = logging.getLogger("workers.run_job")

CANCEL_POLL_S = 1.0  # how often should_stop() asks the database whether the job was cancelled


class JobHooks:
    """app.ml.trainer.TrainHooks for one job: events to the database, stop on SIGTERM or a lost lease."""

    def __init__(self, engine: Engine, job: Job, worker_id: str) -> None:
        self.engine, self.job_id, self.attempt, self.worker_id = engine, job.id, job.attempts, worker_id
        self.stop = threading.Event()
        # Set once the job is found not ours (requeued after a lost lease, maybe run by another worker
        # now): from then on nothing of this attempt is written, no checkpoint above all.
        self.fenced = threading.Event()
        # Set at the first step end of this attempt. Before it nothing this attempt did needs saving,
        # so a stop request ends the process at once (see _stop_on_sigterm) instead of at a step end.
        self.stepped = False
        self.lock = threading.Lock()
        self._next_cancel_poll = 0.0
        self._clock: tuple[float, int] | None = None  # (time, step) of this attempt's first report

    def on_start(self, total_steps: int) -> None:
        with Session(self.engine) as session:
            if not queue.record_total_steps(session, self.job_id, self.worker_id, total_steps):
                self._lost()

    def on_backend(self, backend: str) -> None:
        with Session(self.engine) as session:
            if not queue.record_backend(session, self.job_id, self.worker_id, backend):
                self._lost()

    def _lost(self) -> None:
        log.error("job %s is no longer ours; stopping without a checkpoint", self.job_id)
        self.fenced.set()
        self.stop.set()

    def may_save(self) -> bool:
        """Asked by the trainer right before each checkpoint: two attempts must never write one job's
        checkpoints, and after a lease takeover the other attempt owns the folder."""
        if not self.fenced.is_set():
            with Session(self.engine) as session:
                if not queue.owns(session, self.job_id, self.worker_id, self.attempt):
                    self._lost()
        return not self.fenced.is_set()

    def on_step(self, metrics: dict[str, Any]) -> None:
        metrics = {k: v for k, v in _plain(metrics).items() if v is not None}
        if "loss" in metrics:  # training records only: an eval record repeats its step
            metrics["eta_s"] = self._eta(int(metrics["step"]), metrics.get("total_steps"))
        with Session(self.engine) as session:
            if not queue.record_step(session, self.job_id, self.worker_id, self.attempt, metrics):
                self._lost()

    def _eta(self, step: int, total: int | None) -> float | None:
        """Seconds left at this attempt's average step time so far (model loading excluded)."""
        now = time.monotonic()
        if self._clock is None or step <= self._clock[1]:
            self._clock = (now, step)
            return None
        per_step = (now - self._clock[0]) / (step - self._clock[1])
        return round(per_step * max((total or step) - step, 0), 1)

    def on_log(self, line: str) -> None:
        self._event("log", message=line)

    def on_checkpoint(self, step: int, path: Path | str) -> None:
        if self.fenced.is_set():
            return
        self._event("checkpoint", message=f"checkpoint at step {step}", step=step, data={"path": str(path)})

    def should_stop(self) -> bool:
        """Asked by the trainer after every optimizer step; True saves a checkpoint, then returns."""
        with self.lock:
            self.stepped = True
        if not self.stop.is_set() and time.monotonic() >= self._next_cancel_poll:
            self._next_cancel_poll = time.monotonic() + CANCEL_POLL_S
            with Session(self.engine) as session:
                if queue.cancel_requested(session, self.job_id):
                    self.stop.set()
        return self.stop.is_set()

    def _event(self, kind: str, **fields: Any) -> None:
        with Session(self.engine) as session:
            queue.add_event(session, self.job_id, kind, attempt=self.attempt, **fields)
            session.commit()


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe copy (tensors and numpy scalars become floats)."""
    return {
        k: (v if isinstance(v, str | int | float | bool | None) else float(v)) for k, v in metrics.items()
    }


def adapter_identity(job: Job) -> tuple[str, str]:
    """A deterministic id and name, so a resumed attempt writes (and finds) the same adapter."""
    tail = job.id.split("_", 1)[-1]
    base = job.base_model.rstrip("/").rsplit("/", 1)[-1]
    return f"adp_{tail}", f"ft:{base}:{job.name or 'adapter'}:{tail[-8:]}"


def train_job(settings: Settings, engine: Engine, job: Job, hooks: JobHooks) -> dict[str, Any]:
    from app.ml.modeling import pick_backend
    from app.ml.trainer import TrainConfig, train

    adapter_id, adapter_name = adapter_identity(job)
    output_dir = settings.adapters_dir / adapter_id
    done = {
        "status": JobStatus.SUCCEEDED,
        "adapter_id": adapter_id,
        "adapter_name": adapter_name,
        "adapter_path": str(output_dir.resolve()),
    }
    if adapter_folder.is_complete(output_dir):  # an earlier attempt finished the files, then died
        return {**done, "backend": adapter_folder.read_manifest(output_dir).get("backend")}
    with Session(engine) as session:  # the job stores references; the data is read from these sources
        sources = datasets.resolve_sources(session, job.config)
    config = TrainConfig(**{**job.config, **sources})
    # load_base picks the backend with this same function; recording it before the (long) load
    # means running, failed and cancelled jobs show it too, not only succeeded ones.
    hooks.on_backend(pick_backend(config.backend))
    settings.adapters_dir.mkdir(parents=True, exist_ok=True)
    result = train(
        config,
        work_dir=settings.jobs_dir / job.id,
        output_dir=output_dir,
        hooks=hooks,
        models_dir=settings.models_path,
    )
    if result.stopped or result.adapter_dir is None:
        return {"status": "stopped", "step": result.global_step}
    return {**done, "backend": result.backend}


def run(job_id: str) -> dict[str, Any]:
    settings = get_settings()
    engine = make_engine(settings)
    worker_id = os.environ.get("GPTOSS_WORKER_ID", "")
    with Session(engine, expire_on_commit=False) as session:
        job = queue.get_job(session, job_id)
    hooks = JobHooks(engine, job, worker_id)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the worker, which decides
    _stop_on_sigterm(settings, hooks)
    _watch_parent(hooks)
    try:
        return train_job(settings, engine, job, hooks)
    except ServiceError as err:
        return {"status": JobStatus.FAILED, "code": err.code, "message": err.message}
    except DatasetError as err:  # e.g. the uploaded file was changed or removed after it was checked
        return {"status": JobStatus.FAILED, "code": "invalid_dataset", "message": str(err)}
    except (ValueError, FileNotFoundError) as err:  # config and data problems: the user's to fix
        log.error("job %s failed: %s", job_id, traceback.format_exc())
        return {"status": JobStatus.FAILED, "code": "invalid_job", "message": f"{type(err).__name__}: {err}"}
    except Exception as err:  # anything else the training raised; a hard crash never gets here
        log.error("job %s failed: %s", job_id, traceback.format_exc())
        code = "out_of_memory" if "out of memory" in str(err).lower() else "training_error"
        return {"status": JobStatus.FAILED, "code": code, "message": f"{type(err).__name__}: {err}"[:2000]}


def _stop_on_sigterm(settings: Settings, hooks: JobHooks) -> None:
    """SIGTERM (cancel, worker shutdown, lost lease) is taken by a thread, not a Python signal handler:
    a handler runs only when the main thread gets back to bytecode, which can be minutes into loading
    a 20B model. Before this attempt's first step end there is nothing to save, so the process ends
    at once; after it, the trainer stops at the next step end, after a checkpoint."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit this

    def wait() -> None:
        signal.sigwait({signal.SIGTERM})
        hooks.stop.set()
        with hooks.lock:  # held to the exit: should_stop cannot mark a step in between
            if hooks.stepped:
                return
            log.info("job %s: stop requested before the first step; exiting now", hooks.job_id)
            write_result(settings, hooks.job_id, {"status": "stopped", "step": None})
            logging.shutdown()
            os._exit(0)

    threading.Thread(target=wait, daemon=True, name="sigterm").start()


def _watch_parent(hooks: JobHooks) -> None:
    """Belt and braces for PR_SET_PDEATHSIG: exit if the worker that started us is gone."""
    parent = int(os.environ.get("GPTOSS_PARENT_PID", "0") or 0)
    if not parent:
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(70)  # the worker died: its job is requeued by lease expiry; nothing to save here

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def write_result(settings: Settings, job_id: str, result: dict[str, Any]) -> None:
    """Atomically: the worker must never read half a result."""
    path = settings.jobs_dir / job_id / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job_id = sys.argv[1]
    result = run(job_id)
    log.info("job %s: %s", job_id, result)
    write_result(get_settings(), job_id, result)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown (seconds of torch/thread clean-up): everything that matters is written.
    os._exit(0)


if __name__ == "__main__":
    main()
