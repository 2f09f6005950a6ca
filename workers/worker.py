"""The worker loop: requeue expired leases, claim one job, run it in a child process, finalise it.

    python -m workers.worker [--once] [--worker-id ID] [--gpu N]

The training runs in `python -m workers.run_job <job id>`, a clean interpreter, so an out-of-memory kill
or a crash in CUDA code ends that child only: its job fails with a clear error and the loop goes on.
The child dies with the worker (PR_SET_PDEATHSIG), so a SIGKILLed worker leaves no training behind; its
job is requeued when its lease expires and resumes from the last checkpoint.
SIGTERM/SIGINT: the current step finishes, a checkpoint is written, the job goes back to the queue.
A host with several GPUs runs one worker per GPU, each with `--gpu N` (GPTOSS_WORKER_GPU): its
training children see only that device (CUDA_VISIBLE_DEVICES), and each worker claims its own jobs.
This module never imports FastAPI.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app import adapter_folder, identity, queue, registry
from app.config import Settings, get_settings
from app.db import ROOT, make_engine, make_sessionmaker, upgrade_to_head
from app.exceptions import ServiceError, TransitionError
from app.logs import configure_logging, log_context
from app.models import Job, JobStatus

log = logging.getLogger("workers.worker")

PR_SET_PDEATHSIG = 1
# A child asked to stop gets this long to finish its step and checkpoint before it is killed.
STOP_GRACE_S = 300.0
RESULT_FILE = "result.json"


def child_env(settings: Settings, worker_id: str) -> dict[str, str]:
    """The worker's environment plus absolute paths, so the child sees exactly the worker's settings."""
    env = dict(os.environ)
    env.update(
        GPTOSS_DATA_DIR=str(settings.data_dir.resolve()),
        GPTOSS_MODELS_DIR=str(settings.models_path.resolve()),
        GPTOSS_DATABASE_URL=settings.db_url,
        GPTOSS_WORKER_ID=worker_id,
        GPTOSS_PARENT_PID=str(os.getpid()),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    if settings.worker_gpu is not None:
        # The child's only device is then its cuda:0; PCI order so N is nvidia-smi's GPU N.
        env.update(CUDA_DEVICE_ORDER="PCI_BUS_ID", CUDA_VISIBLE_DEVICES=str(settings.worker_gpu))
    return env


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: the kernel SIGKILLs it when the worker dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Supervision:
    """What happened while the child ran, for the finaliser."""

    cancel: bool = False
    lost: bool = False  # the lease was lost: another worker may own the job now
    stop_sent: bool = False


class Worker:
    def __init__(self, settings: Settings, worker_id: str | None = None) -> None:
        self.settings = settings
        gpu = "" if settings.worker_gpu is None else f"-gpu{settings.worker_gpu}"
        self.worker_id = worker_id or f"{socket.gethostname()}{gpu}-{os.getpid()}"
        self.db = make_engine(settings)
        self.sessions = make_sessionmaker(self.db, immediate=True)  # its sessions read, then write
        self.read_sessions = make_sessionmaker(self.db)  # the frequent cancel check takes no write lock
        self.stopping = threading.Event()

    # --- the loop ---------------------------------------------------------------------------------

    def run(self, *, once: bool = False) -> None:
        upgrade_to_head(self.settings)
        identity.check_data_dir(self.settings, self.db)
        gpu = self.settings.worker_gpu
        devices = "every GPU" if gpu is None else f"GPU {gpu}"
        log.info("worker %s (%s) polling every %.1fs", self.worker_id, devices, self.settings.worker_poll_s)
        while not self.stopping.is_set():
            try:
                job = self.poll()
            except OperationalError:  # e.g. the database was locked past busy_timeout: try again later
                log.exception("worker %s: polling failed; retrying", self.worker_id)
                job = None
            if job is not None:
                self._run_guarded(job)
            if once:
                return
            if job is None:
                self.stopping.wait(self.settings.worker_poll_s)
        log.info("worker %s stopped", self.worker_id)

    def _run_guarded(self, job: Job) -> None:
        """One job's trouble (run_job's finally has written its final state) never ends the loop."""
        try:
            with log_context(job_id=job.id):
                self.run_job(job)
        except Exception:
            log.exception("job %s: the worker hit an error; going on with the next job", job.id)

    def poll(self) -> Job | None:
        with self.sessions() as session:
            for job_id, status in queue.requeue_expired(session, self.settings.max_lost_attempts):
                log.warning("job %s had an expired lease: now %s", job_id, status)
        return queue.claim_next(self.db, self.worker_id, self.settings.lease_s)

    def request_stop(self, signum: int, _frame: FrameType | None = None) -> None:
        log.warning("signal %d: finishing the current step, checkpointing, then exiting", signum)
        self.stopping.set()

    # --- one job ------------------------------------------------------------------------------------

    def run_job(self, job: Job) -> None:
        job_dir = self.settings.jobs_dir / job.id
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / RESULT_FILE).unlink(missing_ok=True)
        log_path = job_dir / f"attempt-{job.attempts}.log"
        log.info("job %s: attempt %d, log %s", job.id, job.attempts, log_path)
        seen = Supervision()
        proc: subprocess.Popen[bytes] | None = None
        try:
            with open(log_path, "ab") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "workers.run_job", job.id],
                    env=child_env(self.settings, self.worker_id),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent,
                )
            self._event(job.id, "log", f"child process {proc.pid} started", data={"pid": proc.pid})
            self.supervise(job, proc, seen)
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            self.finalise(job, proc, seen, job_dir, log_path)

    def supervise(self, job: Job, proc: subprocess.Popen[bytes], seen: Supervision) -> None:
        """Heartbeat while the child runs; pass a cancel, a SIGTERM or a lost lease on to it as SIGTERM."""
        tick = min(0.5, self.settings.heartbeat_s / 2)
        last_beat, stop_at = 0.0, 0.0
        while proc.poll() is None:
            if time.monotonic() - last_beat >= self.settings.heartbeat_s:
                beat = self._beat(job, seen)
                if beat is not None:  # None: the database was busy; beat again on the next tick
                    seen.cancel |= beat
                    last_beat = time.monotonic()
            elif not seen.cancel:
                seen.cancel = self._cancel_asked(job)
            if seen.lost:
                # Not ours any more: a SIGTERM would make the child save a checkpoint first, into the
                # folder the attempt that took over reads. Nothing of this attempt may be kept.
                proc.kill()
                break
            if (seen.cancel or self.stopping.is_set()) and not seen.stop_sent:
                proc.send_signal(signal.SIGTERM)
                seen.stop_sent, stop_at = True, time.monotonic()
            if seen.stop_sent and time.monotonic() - stop_at > STOP_GRACE_S:
                log.error("job %s: child did not stop within %.0fs; killing it", job.id, STOP_GRACE_S)
                proc.kill()
            time.sleep(tick)

    def _beat(self, job: Job, seen: Supervision) -> bool | None:
        """Extend the lease; returns whether a cancel was asked, or None when the database was busy.

        A locked database (OperationalError past busy_timeout) must not kill a healthy job: the lease
        is many heartbeats long, so retrying on the next tick keeps it. Only a lease really lost
        (TransitionError: someone requeued the job) stops the child."""
        try:
            with self.sessions() as session:
                return queue.heartbeat(session, job.id, self.worker_id, self.settings.lease_s)
        except TransitionError:
            if not seen.lost:
                log.error("job %s: lease lost (requeued by another worker?); stopping the child", job.id)
            seen.lost = True
            return False
        except OperationalError as err:
            log.warning("job %s: heartbeat failed (%s); retrying", job.id, err)
            return None

    def _cancel_asked(self, job: Job) -> bool:
        try:
            with self.read_sessions() as session:
                return queue.cancel_requested(session, job.id)
        except OperationalError as err:  # busy database: ask again on the next tick
            log.warning("job %s: cancel check failed (%s); retrying", job.id, err)
            return False

    # --- the end of one job ---------------------------------------------------------------------------

    def finalise(
        self, job: Job, proc: subprocess.Popen[bytes] | None, seen: Supervision, job_dir: Path, log_path: Path
    ) -> None:
        """Write the job's final state. Runs in a `finally`: no path leaves a job running with no worker."""
        if seen.lost:
            return  # not ours any more; whoever requeued it owns it
        result = _read_result(job_dir / RESULT_FILE)
        try:
            with self.sessions() as session:
                self._settle(session, job, proc, result, seen, log_path)
        except TransitionError as err:
            log.warning("job %s moved on meanwhile: %s", job.id, err)
        except Exception:
            log.exception("job %s: finalising failed; failing it", job.id)
            with self.sessions() as session:
                queue.finish_failed(
                    session,
                    job.id,
                    self.worker_id,
                    code="internal_error",
                    message="the worker could not record the result; see the worker log",
                )

    def _settle(
        self,
        session: Session,
        job: Job,
        proc: subprocess.Popen[bytes] | None,
        result: dict[str, Any] | None,
        seen: Supervision,
        log_path: Path,
    ) -> None:
        result = result or {}
        status = result.get("status")
        if status == JobStatus.SUCCEEDED:
            self._succeed(session, job, result)
        elif status == JobStatus.FAILED:
            queue.fail_or_retry(
                session, job.id, self.worker_id, code=result["code"], message=result["message"]
            )
        elif seen.cancel or queue.cancel_requested(session, job.id):
            queue.finish_cancelled(session, job.id, self.worker_id)
        elif self.stopping.is_set():  # stopped at a checkpoint, or SIGTERMed before it could listen
            queue.release(
                session, job.id, self.worker_id, f"worker {self.worker_id} shut down; checkpoint kept"
            )
        else:
            code, message = _crash_reason(proc, log_path)
            if proc is not None and proc.returncode is not None and proc.returncode < 0:
                # Killed by a signal nobody here sent (the out-of-memory killer, an operator): not the
                # job's fault; it resumes from its last checkpoint, within max_lost_attempts.
                now = queue.requeue_lost(
                    session, job.id, self.worker_id, self.settings.max_lost_attempts, message
                )
                log.warning("job %s: %s; now %s", job.id, message, now)
                return
            queue.fail_or_retry(session, job.id, self.worker_id, code=code, message=message)

    def _succeed(self, session: Session, job: Job, result: dict[str, Any]) -> None:
        """The adapter folder is in place (the trainer renamed it there): now the row, then the job."""
        try:
            registry.register_adapter(
                session,
                adapter_id=result["adapter_id"],
                name=result["adapter_name"],
                folder=Path(result["adapter_path"]),
                job_id=job.id,
                api_key_id=job.api_key_id,  # the adapter belongs to whoever owns its job
            )
        except (ServiceError, adapter_folder.AdapterFolderError, FileNotFoundError) as err:
            # No row points at the folder, and a retry would only fail the same way: do not leave
            # an unregistered adapter on disk (the folder is this job's own, adp_<job id tail>).
            session.rollback()
            adapter_folder.delete(Path(result["adapter_path"]))
            queue.finish_failed(
                session, job.id, self.worker_id, code="adapter_registration_failed", message=str(err)
            )
            return
        queue.finish_succeeded(
            session,
            job.id,
            self.worker_id,
            adapter_id=result["adapter_id"],
            backend=result.get("backend") or "unknown",
        )

    def _event(self, job_id: str, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        with self.sessions() as session:
            queue.add_event(session, job_id, kind, message=message, data=data)
            session.commit()


def _read_result(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data


def _crash_reason(proc: subprocess.Popen[bytes] | None, log_path: Path) -> tuple[str, str]:
    """Say how the child died, in words, with the end of its output."""
    code = None if proc is None else proc.returncode
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        hint = " (often the out-of-memory killer)" if -code == signal.SIGKILL else ""
        what = f"the training process was killed by {name}{hint}"
    else:
        what = f"the training process exited with status {code} without a result"
    return "child_crashed", f"{what}; last output: {_tail(log_path)}"


def _tail(path: Path, limit: int = 1500) -> str:
    try:
        text = path.read_bytes()[-limit:].decode(errors="replace").strip()
    except FileNotFoundError:
        return "(none)"
    return text or "(none)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run fine-tuning jobs from the queue.")
    parser.add_argument("--once", action="store_true", help="Run at most one job, then exit.")
    parser.add_argument("--worker-id", help="Name in the jobs table; default <host>[-gpuN]-<pid>.")
    parser.add_argument(
        "--gpu", type=int, help="Train on this CUDA device only (overrides GPTOSS_WORKER_GPU)."
    )
    args = parser.parse_args(argv)
    settings = get_settings()
    if args.gpu is not None:
        if args.gpu < 0:
            parser.error("--gpu must be a CUDA device number, 0 or more")
        settings = settings.model_copy(update={"worker_gpu": args.gpu})
    configure_logging(settings)  # JSON lines like the API's (GPTOSS_LOG_JSON), with the job id
    worker = Worker(settings, args.worker_id)
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
    try:
        worker.run(once=args.once)
    except identity.DataDirMismatch as err:
        log.error("worker %s refuses to start: %s", worker.worker_id, err)
        sys.exit(f"worker: {err}")


if __name__ == "__main__":
    main()
