"""Two jobs at once, one per GPU, through the real API and two worker processes.

    python -m bench.two_gpus --model /path/to/gpt-oss-20b-random --models-dir M --out OUT [--steps 60]

1. migrate a fresh data dir; start `python -m workers.worker --gpu 0` and `--gpu 1` and the API
   (uvicorn, kept off the GPUs: it loads no model, since this measures training and a copy of the
   base in the API would only share GPU 0 with one of the jobs);
2. baseline: one job alone (whichever worker claims it; its GPU is in its worker id);
3. two identical jobs submitted together: each worker claims one, each trains on its own GPU;
   nvidia-smi is sampled meanwhile, so the result shows which GPU held which training process.

Tokens/s of a job: the median of its per-step `tokens_per_s` (the trainer's metrics events), after
`--skip` warm-up steps; for the pair also over the steps both jobs were training at once.
Results go to `<out>/two_gpus.json` after every stage.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench.common import run_header, wait_http, write_json
from bench.data import uneven_rows, write_jsonl
from bench.gpu_e2e import ROOT, TERMINAL, free_port, job_hyperparameters, service_env, upload


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--models-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, help="default <out>/data")
    p.add_argument("--backend", default="unsloth")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the medians")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--job-timeout", type=float, default=420)
    # gpu_e2e.service_env reads these two
    p.add_argument("--max-batch-size", type=int, default=16, help=argparse.SUPPRESS)
    return p.parse_args(argv)


class Service:
    def __init__(self, args: argparse.Namespace, data_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**service_env(args, data_dir, self.port), "GPTOSS_LOAD_MODEL_ON_START": "false"}
        self.out: Path = args.out
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        code = "from app.config import get_settings as g; from app.db import upgrade_to_head as u; u(g())"
        subprocess.run([sys.executable, "-c", code], env=self.env, cwd=ROOT, check=True)
        for gpu in (0, 1):
            self._spawn(
                f"worker{gpu}", ["-m", "workers.worker", "--gpu", str(gpu), "--worker-id", f"gpu{gpu}"]
            )
        api = ["-m", "uvicorn", "app.main:app_from_env", "--factory", "--port", str(self.port)]
        self._spawn("api", [*api, "--log-level", "warning"], CUDA_VISIBLE_DEVICES="")
        wait_http(f"{self.url}/healthz", 120, alive=self.check_alive)

    def _spawn(self, name: str, args: list[str], **env: str) -> None:
        log = open(self.out / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(
            [sys.executable, *args], env={**self.env, **env}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {name}.log")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def submit(client: httpx.Client, args: argparse.Namespace, file_id: str, name: str) -> str:
    # One checkpoint, at the end: no save inside the timed steps.
    hyper = job_hyperparameters(args, save_steps=args.steps)
    # One seed: the same rows in the same order for every job.
    body = {"dataset": file_id, "suffix": name, "seed": 7, "hyperparameters": hyper}
    return str(client.post("/jobs", json=body).raise_for_status().json()["id"])


def wait_done(client: httpx.Client, service: Service, job_ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        service.check_alive()
        jobs = [client.get(f"/jobs/{j}").raise_for_status().json() for j in job_ids]
        if all(job["status"] in TERMINAL for job in jobs):
            return
        time.sleep(2)
    raise TimeoutError(f"jobs {job_ids} not finished after {timeout:.0f} s")


def steps(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    """(step, tokens_per_s, time) of each training step, from the job's metrics events."""
    out, after = [], 0
    while True:
        page = client.get(f"/jobs/{job_id}/events", params={"kind": "metrics", "after": after, "limit": 200})
        body = page.raise_for_status().json()
        for event in body["data"]:
            data = event.get("data") or {}
            if data.get("tokens_per_s"):
                at = datetime.fromisoformat(event["created_at"]).timestamp()
                out.append({"step": event["step"], "tokens_per_s": float(data["tokens_per_s"]), "at": at})
        if not body["has_more"]:
            return out
        after = int(body["next_cursor"])


def ran_on(client: httpx.Client, job_id: str) -> list[str]:
    """The workers that claimed the job, from its "running on <worker> (attempt n)" status events."""
    page = client.get(f"/jobs/{job_id}/events", params={"kind": "status", "limit": 200}).raise_for_status()
    messages = [e["message"] or "" for e in page.json()["data"]]
    return [m.split()[2] for m in messages if m.startswith("running on ")]


def job_summary(
    client: httpx.Client, job_id: str, skip: int, window: tuple[float, float] | None = None
) -> dict:
    job = client.get(f"/jobs/{job_id}").raise_for_status().json()
    rows = [r for r in steps(client, job_id) if r["step"] > skip]
    inside = [r for r in rows if window is None or window[0] <= r["at"] <= window[1]]
    summary = {
        "id": job_id,
        "status": job["status"],
        "error": job.get("error"),
        "ran_on": ran_on(client, job_id),
        "backend": job.get("backend"),
        "steps_timed": len(rows),
        "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rows), 1) if rows else None,
        "first_step_at": min((r["at"] for r in rows), default=None),
        "last_step_at": max((r["at"] for r in rows), default=None),
    }
    if window is not None:
        summary["steps_while_both_trained"] = len(inside)
        summary["tokens_per_s_while_both_trained"] = (
            round(statistics.median(r["tokens_per_s"] for r in inside), 1) if inside else None
        )
    return summary


def sample_gpus(stop: threading.Event, samples: list[str]) -> None:
    """Which processes hold memory on which GPU, every 5 s while the pair trains."""
    query = ["nvidia-smi", "--query-compute-apps=gpu_bus_id,pid,used_memory", "--format=csv,noheader"]
    while not stop.wait(5):
        try:
            done = subprocess.run(query, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as err:  # no nvidia-smi (a CPU smoke run)
            samples.append(f"nvidia-smi: {err}")
            return
        samples.append(f"{time.strftime('%H:%M:%S')} {done.stdout.strip()}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data_dir = (args.data_dir or args.out / "data").resolve()
    result: dict[str, Any] = {
        **run_header(),
        "model": args.model,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    service = Service(args, data_dir)
    stop, samples = threading.Event(), list[str]()
    try:
        service.start()
        with httpx.Client(base_url=service.url, timeout=120) as client:
            rows = write_jsonl(
                uneven_rows(args.rows, args.seq // 2, args.seq, seed=1), args.out / "rows.jsonl"
            )
            file_id = upload(client, rows)["id"]
            alone = submit(client, args, file_id, "alone")
            wait_done(client, service, [alone], args.job_timeout)
            result["alone"] = job_summary(client, alone, args.skip)
            write_json(args.out / "two_gpus.json", result)

            threading.Thread(target=sample_gpus, args=(stop, samples), daemon=True).start()
            pair = [submit(client, args, file_id, f"pair{n}") for n in (0, 1)]
            wait_done(client, service, pair, args.job_timeout)
            stop.set()
            first = [job_summary(client, j, args.skip) for j in pair]
            window = (max(s["first_step_at"] or 0 for s in first), min(s["last_step_at"] or 0 for s in first))
            result["pair"] = [job_summary(client, j, args.skip, window) for j in pair]
            result["overlap_s"] = round(max(0.0, window[1] - window[0]), 1)
            base = result["alone"]["tokens_per_s"]
            result["ratio_to_alone"] = [
                round(s["tokens_per_s_while_both_trained"] / base, 3)
                if base and s["tokens_per_s_while_both_trained"]
                else None
                for s in result["pair"]
            ]
            claimed = [tuple(s["ran_on"]) for s in result["pair"]]
            result["on_different_gpus"] = sorted(claimed) == [("gpu0",), ("gpu1",)]
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        stop.set()
        result["gpu_samples"] = samples
        write_json(args.out / "two_gpus.json", result)
        service.stop()
        print({k: v for k, v in result.items() if k not in ("machine", "versions", "gpu_samples")})


if __name__ == "__main__":
    main()
