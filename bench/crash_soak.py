"""One job through many crashes: worker and training-child SIGKILLs at random moments, restarted each time.

    python -m bench.crash_soak --out bench/results/crash-soak.json [--worker-kills 20 --child-kills 5]

A real API process and real worker processes on the tiny model (SQLite in a temp data dir). The job
trains `--steps` steps with a checkpoint every `--save-steps`. Then, `--worker-kills` times the worker
and `--child-kills` times the training child alone (what the out-of-memory killer does) get SIGKILL,
in a shuffled order, each at a random moment of an attempt (`--min-delay` to `--max-delay` seconds
after the job was claimed, model loading included); after each kill a new worker is started (the old
one's lease runs out after `--lease-s`). After the last kill the worker runs the job to its end.

Checked, as the issue's target (issue 16) asks:
- the job succeeds, and its adapter is the only one (one row, one folder, no temp folders);
- no step is lost: the metrics events hold every step 1..steps exactly once;
- per crash, the steps repeated (last step the killed attempt reported, minus the step the next
  attempt resumed from) are at most save_steps;
- no two attempts ever ran at once (an attempt's steps never interleave with the next one's).

The result JSON (date, machine, command) lists every crash with its kind, moment, the step reached,
the step resumed from, and the pass/fail of each check. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import run_header, wait_http, write_json
from bench.common import service_env as common_service_env
from bench.gpu_e2e import free_port

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "app" / "ml" / "samples" / "capitals.jsonl"
TERMINAL = {"succeeded", "failed", "cancelled"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", type=Path, default=Path("/tmp/gptoss-test-cache/models"))
    p.add_argument("--model", default="tiny-gpt-oss")
    p.add_argument("--out", type=Path, required=True, help="the result JSON file")
    p.add_argument("--worker-kills", type=int, default=20)
    p.add_argument("--child-kills", type=int, default=5)
    # Long enough that every kill lands while the job trains (about 6 steps/s on the 2-core machine).
    p.add_argument("--steps", type=int, default=1000, help="training steps of the job")
    p.add_argument("--save-steps", type=int, default=10)
    p.add_argument("--min-delay", type=float, default=1.0, help="seconds after a claim, earliest kill")
    p.add_argument("--max-delay", type=float, default=12.0, help="seconds after a claim, latest kill")
    p.add_argument("--lease-s", type=float, default=3.0, help="GPTOSS_LEASE_S of the workers")
    p.add_argument("--seed", type=int, default=0, help="the kills' order and moments")
    p.add_argument("--timeout", type=float, default=1800, help="seconds for the whole soak")
    p.add_argument("--keep", action="store_true", help="keep the data dir and logs (printed)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra setting")
    return p.parse_args(argv)


def service_env(args: argparse.Namespace, data_dir: Path, port: int) -> dict[str, str]:
    return common_service_env(
        data_dir,
        args.models_dir,
        args.model,
        port,
        extra=args.env,
        GPTOSS_BACKEND="hf",
        GPTOSS_WORKER_POLL_S="0.2",
        GPTOSS_HEARTBEAT_S="0.5",
        GPTOSS_LEASE_S=str(args.lease_s),
        GPTOSS_LOAD_MODEL_ON_START="false",
    )


class Processes:
    """The API and the current worker, children of this process; logs in the work folder."""

    def __init__(self, env: dict[str, str], port: int, logs: Path) -> None:
        self.env, self.logs = env, logs
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.api: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.workers_started = 0

    def start_api(self) -> None:
        code = "from app.config import get_settings as g; from app.db import upgrade_to_head as u; u(g())"
        subprocess.run([sys.executable, "-c", code], env=self.env, cwd=ROOT, check=True)
        cmd = ["uvicorn", "app.main:app_from_env", "--factory", "--host", "127.0.0.1", "--port"]
        self.api = self._spawn("api", [sys.executable, "-m", *cmd, str(self.port), "--log-level", "warning"])
        wait_http(f"{self.url}/healthz", 120, every_s=0.3)

    def start_worker(self) -> subprocess.Popen[bytes]:
        self.workers_started += 1
        name = f"worker-{self.workers_started}"
        self.worker = self._spawn(name, [sys.executable, "-m", "workers.worker", "--worker-id", name])
        return self.worker

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        return subprocess.Popen(cmd, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def child_pid(self) -> int | None:
        """The worker's training child (python -m workers.run_job), if it has one now."""
        if self.worker is None:
            return None
        try:
            pids = Path(f"/proc/{self.worker.pid}/task/{self.worker.pid}/children").read_text().split()
        except FileNotFoundError:
            return None
        return int(pids[0]) if pids else None

    def stop(self) -> None:
        for proc in (self.worker, self.api):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (self.worker, self.api):
            if proc is None:
                continue
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def submit(client: httpx.Client, args: argparse.Namespace) -> str:
    with SAMPLE.open("rb") as fh:
        file_id = client.post("/files", files={"file": (SAMPLE.name, fh)}).raise_for_status().json()["id"]
    hyper = {
        "max_steps": args.steps,
        "save_steps": args.save_steps,
        "save_total_limit": 2,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "max_seq_length": 256,
        "target_parameters": [],
        "logging_steps": 1,
        "warmup_steps": 0,
    }
    body = {"dataset": file_id, "suffix": "soak", "hyperparameters": hyper}
    return str(client.post("/jobs", json=body).raise_for_status().json()["id"])


def events(client: httpx.Client, job_id: str, kind: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    after = 0
    while True:
        page = client.get(f"/jobs/{job_id}/events", params={"after": after, "limit": 1000, "kind": kind})
        body = page.raise_for_status().json()
        found += body["data"]
        if not body["has_more"]:
            return found
        after = int(body["next_cursor"])


class StepLog:
    """Every metrics event seen, per attempt, read as the run goes (a later attempt replaces the
    events of the steps it repeats, so the history has to be collected while it exists)."""

    def __init__(self) -> None:
        self.by_attempt: dict[int, set[int]] = {}
        self.after = 0
        # (attempt, step) in the order the events were written: attempts must never interleave.
        self.order: list[tuple[int, int]] = []

    def poll(self, client: httpx.Client, job_id: str) -> None:
        while True:
            params: dict[str, Any] = {"after": self.after, "limit": 1000, "kind": "metrics"}
            body = client.get(f"/jobs/{job_id}/events", params=params).raise_for_status().json()
            for event in body["data"]:
                self.by_attempt.setdefault(event["attempt"], set()).add(event["step"])
                self.order.append((event["attempt"], event["step"]))
            if body["data"]:
                self.after = int(body["next_cursor"])
            if not body["has_more"]:
                return


def job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    return dict(client.get(f"/jobs/{job_id}").raise_for_status().json())


def wait_claimed(client: httpx.Client, job_id: str, attempts_before: int, log: StepLog, until: float) -> dict:
    """Until a new attempt runs (or the job ended)."""
    while time.monotonic() < until:
        current = job(client, job_id)
        log.poll(client, job_id)
        if current["status"] in TERMINAL:
            return current
        if current["status"] == "running" and current["attempts"] > attempts_before:
            return current
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} was not claimed again")


def crash_once(
    procs: Processes, client: httpx.Client, job_id: str, kind: str, delay: float, log: StepLog, until: float
) -> dict[str, Any]:
    """Let the current attempt run `delay` s, then SIGKILL the worker or its child."""
    started = time.monotonic()
    while time.monotonic() - started < delay:
        log.poll(client, job_id)
        time.sleep(0.1)
    before = job(client, job_id)
    record: dict[str, Any] = {
        "kind": kind,
        "delay_s": round(delay, 2),
        "attempt": before["attempts"],
        "status_before": before["status"],
        "step_reported": before["progress"]["step"],
    }
    if before["status"] in TERMINAL:
        record["skipped"] = "the job had ended"
        return record
    if kind == "child":
        pid = procs.child_pid()
        if pid is None:
            record["skipped"] = "no training child at that moment"
            return record
        os.kill(pid, signal.SIGKILL)
        record["killed_pid"] = pid
    else:
        assert procs.worker is not None
        procs.worker.send_signal(signal.SIGKILL)
        procs.worker.wait()
        record["killed_pid"] = procs.worker.pid
        procs.start_worker()
    after = wait_claimed(client, job_id, before["attempts"], log, until)
    record["status_after"] = after["status"]
    if after["status"] in TERMINAL:
        record["error_after"] = after.get("error")
    return record


def resumed_steps(log: StepLog, crashes: list[dict[str, Any]]) -> None:
    """For each crash: the last step its attempt reported and the first step the next one reported."""
    for crash in crashes:
        attempt = crash.get("attempt")
        if attempt is None or "skipped" in crash:
            continue
        done = log.by_attempt.get(attempt, set())
        later = [a for a in log.by_attempt if a > attempt and log.by_attempt[a]]
        crash["last_step"] = max(done) if done else None
        if later:
            first = min(log.by_attempt[min(later)])
            crash["resumed_from"] = first - 1
            crash["repeated"] = max(0, (crash["last_step"] or 0) - (first - 1))


def checks(
    args: argparse.Namespace, client: httpx.Client, final: dict, log: StepLog, crashes: list, data_dir: Path
) -> dict[str, Any]:
    metric_steps = [e["step"] for e in events(client, final["id"], "metrics")]
    adapters = client.get("/adapters").raise_for_status().json()["data"]
    adapters_dir = data_dir / "adapters"
    folders = sorted(p.name for p in adapters_dir.iterdir()) if adapters_dir.is_dir() else []
    repeated = [c["repeated"] for c in crashes if "repeated" in c]
    interleaved = any(a2 < a1 for (a1, _), (a2, _) in zip(log.order, log.order[1:], strict=False))
    return {
        "succeeded": final["status"] == "succeeded",
        "every_step_once": sorted(metric_steps) == list(range(1, args.steps + 1)),
        "missing_steps": sorted(set(range(1, args.steps + 1)) - set(metric_steps))[:20],
        "duplicate_steps": len(metric_steps) - len(set(metric_steps)),
        "max_repeated_per_crash": max(repeated, default=0),
        "repeated_within_save_steps": all(r <= args.save_steps for r in repeated),
        "one_adapter": len(adapters) == 1 and folders == [a["id"] for a in adapters],
        "adapter_folders": folders,
        "attempts_never_interleaved": not interleaved,
    }


def soak(args: argparse.Namespace, procs: Processes, client: httpx.Client, result: dict[str, Any]) -> bool:
    rng = random.Random(args.seed)
    plan = ["worker"] * args.worker_kills + ["child"] * args.child_kills
    rng.shuffle(plan)
    until = time.monotonic() + args.timeout
    log = StepLog()
    job_id = submit(client, args)
    result["job_id"] = job_id
    procs.start_worker()
    wait_claimed(client, job_id, 0, log, until)
    crashes: list[dict[str, Any]] = []
    result["crashes"] = crashes
    for kind in plan:
        delay = rng.uniform(args.min_delay, args.max_delay)
        crashes.append(crash_once(procs, client, job_id, kind, delay, log, until))
        print(crashes[-1], flush=True)
        if crashes[-1].get("status_after") in TERMINAL:
            break
    final = job(client, job_id)
    while final["status"] not in TERMINAL and time.monotonic() < until:
        log.poll(client, job_id)
        time.sleep(0.5)
        final = job(client, job_id)
    log.poll(client, job_id)
    resumed_steps(log, crashes)
    result["final"] = {k: final.get(k) for k in ("status", "attempts", "max_attempts", "error", "adapter_id")}
    result["final"]["lost_attempts"] = final.get("lost_attempts")
    result["checks"] = checks(args, client, final, log, crashes, procs.logs / "data")
    result["kills_done"] = sum(1 for c in crashes if "skipped" not in c)
    result["checks"]["all_kills_done"] = result["kills_done"] == len(plan)
    flags = ("succeeded", "every_step_once", "repeated_within_save_steps", "one_adapter", "all_kills_done")
    return all(result["checks"][flag] for flag in flags) and result["checks"]["attempts_never_interleaved"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result: dict[str, Any] = {"benchmark": "crash_soak", **run_header()}
    result["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    work = Path(tempfile.mkdtemp(prefix="gptoss-soak-"))
    port = free_port()
    procs = Processes(service_env(args, work / "data", port), port, work)
    ok = False
    try:
        procs.start_api()
        with httpx.Client(base_url=procs.url, timeout=60) as client:
            ok = soak(args, procs, client, result)
    finally:
        procs.stop()
        result["passed"] = ok
        write_json(args.out, result)
        if args.keep:
            print(f"data dir and logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"passed={ok} final={result.get('final')} checks={result.get('checks')}; wrote {args.out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
