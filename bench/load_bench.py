"""The API under a busy client: many pollers and uploads at once while a job trains.

    python -m bench.load_bench --models-dir /tmp/gptoss-test-cache/models --out bench/results/load.json

1. a fresh data dir (SQLite), migrated; `python -m workers.worker` and `uvicorn app.main:app_from_env
   --factory` as separate processes, the tiny model, API keys off, the per-client rate limit off (every
   request comes from 127.0.0.1, so a per-address limit would turn this into a rate-limit test);
2. upload the bundled `capitals` sample and start a long job on it; wait until it trains;
3. `--pollers` concurrent clients each `GET /jobs/<id>` `--polls` times back to back over one
   keep-alive connection (a few lines of asyncio streams: see RawPoller), and at the same time
   `--uploaders` concurrent clients each `POST /files` `--uploads` times (httpx async, loopback,
   every request with a `--request-timeout`, the whole phase within `--deadline` seconds); a client
   answered 429 or 503 waits Retry-After (at most 5 s; times 1-2 at random, the usual jitter) before its
   next request, as the protocol asks
   (`--no-backoff`: it asks again at once);
4. cancel the job, stop both processes.

The result (JSON: date, machine, command, versions, the host's load average before and after: the
machine may be shared) counts the responses >= 500 and the requests that got no response, a status
histogram per route, and p50/p95/p99/max latency per route, of all answers and of the 2xx ones. The issue's
target (issue 16): 0 responses >= 500 and p99 of `GET /jobs/<id>` under 250 ms on a 2-core machine;
a fast 503/429 with Retry-After is an allowed answer to overload, a 500 or a 30 s wait is not.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
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
    p.add_argument("--pollers", type=int, default=200, help="concurrent GET /jobs/<id> clients")
    p.add_argument("--polls", type=int, default=10, help="requests per poller, back to back")
    p.add_argument("--uploaders", type=int, default=20, help="concurrent POST /files clients")
    p.add_argument("--uploads", type=int, default=3, help="uploads per uploader, back to back")
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--deadline", type=float, default=120.0, help="seconds for the whole load phase")
    p.add_argument(
        "--no-backoff",
        action="store_true",
        help="on 429/503 ask again at once instead of waiting Retry-After (a client that ignores it)",
    )
    p.add_argument("--keep", action="store_true", help="keep the data dir and logs (printed)")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra service setting for both processes, e.g. GPTOSS_RATE_LIMIT_PER_MINUTE=600",
    )
    return p.parse_args(argv)


def service_env(args: argparse.Namespace, data_dir: Path, port: int) -> dict[str, str]:
    return common_service_env(
        data_dir,
        args.models_dir,
        args.model,
        port,
        extra=args.env,
        GPTOSS_BACKEND="hf",
        GPTOSS_LOG_LEVEL="WARNING",
        GPTOSS_WORKER_POLL_S="0.5",
        # The pollers never generate: the API need not hold a model, the job's child holds its own.
        GPTOSS_LOAD_MODEL_ON_START="false",
    )


class Service:
    """Worker and API as child processes of this one, logs in the data dir; stopped with SIGTERM."""

    def __init__(self, env: dict[str, str], port: int, logs: Path) -> None:
        self.env, self.port, self.logs = env, port, logs
        self.url = f"http://127.0.0.1:{port}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        code = "from app.config import get_settings as g; from app.db import upgrade_to_head as u; u(g())"
        subprocess.run([sys.executable, "-c", code], env=self.env, cwd=ROOT, check=True)
        self._spawn("worker", [sys.executable, "-m", "workers.worker"])
        api = ["uvicorn", "app.main:app_from_env", "--factory", "--host", "127.0.0.1"]
        self._spawn("api", [sys.executable, "-m", *api, "--port", str(self.port), "--log-level", "warning"])

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        self.procs[name] = subprocess.Popen(cmd, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float = 120) -> None:
        wait_http(f"{self.url}/healthz", timeout, alive=self.check_alive)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.logs}/{name}.log")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_job(client: httpx.Client) -> str:
    """A job long enough to train through the whole load phase (it is cancelled afterwards)."""
    with SAMPLE.open("rb") as fh:
        file_id = client.post("/files", files={"file": (SAMPLE.name, fh)}).raise_for_status().json()["id"]
    hyper = {
        "max_steps": 100_000,
        "save_steps": 100_000,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "max_seq_length": 256,
        "target_parameters": [],
        "logging_steps": 1,
        "warmup_steps": 0,
    }
    body = {"dataset": file_id, "suffix": "load", "hyperparameters": hyper}
    job_id: str = client.post("/jobs", json=body).raise_for_status().json()["id"]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").raise_for_status().json()
        if job["status"] in TERMINAL:
            raise RuntimeError(f"the load job ended {job['status']} before the load: {job.get('error')}")
        if job["status"] == "running" and job["progress"]["step"] >= 2:
            return job_id
        time.sleep(1)
    raise TimeoutError(f"job {job_id} did not start training within 300 s")


class Recorder:
    """Per-route status counts and latencies of every request of the load phase."""

    def __init__(self) -> None:
        self.status: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.latency: dict[str, list[float]] = collections.defaultdict(list)
        self.latency_ok: dict[str, list[float]] = collections.defaultdict(list)
        self.samples_500: list[str] = []
        self.retry_after: collections.Counter[str] = collections.Counter()

    async def call(self, route: str, send: Any, backoff: bool) -> None:
        started = time.perf_counter()
        try:
            response: httpx.Response = await send()
        except httpx.HTTPError as err:  # no response at all: a timeout, a refused or reset connection
            self.status[route][f"no_response:{type(err).__name__}"] += 1
            self.latency[route].append(time.perf_counter() - started)
            return
        elapsed = time.perf_counter() - started
        self.latency[route].append(elapsed)
        self.status[route][str(response.status_code)] += 1
        if response.status_code < 300:
            self.latency_ok[route].append(elapsed)
        if response.status_code >= 500 and len(self.samples_500) < 5:
            self.samples_500.append(f"{route} {response.status_code}: {response.text[:300]}")
        if response.status_code in (429, 503):
            retry_after = response.headers.get("retry-after", "missing")
            self.retry_after[retry_after] += 1
            if backoff and retry_after.isdigit():
                # A client that follows the protocol waits, with jitter, so that the clients turned
                # away together do not all come back in the same millisecond.
                await asyncio.sleep(min(int(retry_after), 5) * random.uniform(1.0, 2.0))


class RawResponse:
    """The parts of an HTTP answer the recorder reads (httpx.Response has the same names)."""

    def __init__(self, status_code: int, headers: dict[str, str], body: bytes) -> None:
        self.status_code, self.headers, self.text = status_code, headers, body.decode(errors="replace")


class RawPoller:
    """One keep-alive HTTP/1.1 connection doing GETs, on asyncio streams.

    Why not httpx here: at 200 concurrent connections httpx's AsyncClient spent about 3 ms of CPU per
    request in this process (measured against /healthz: 6.6 s of client CPU for 2,000 requests), so on
    a 2-core machine the benchmark mostly measured its own client; these few lines cost about 0.1 ms."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def get(self, path: str) -> RawResponse:
        try:
            return await asyncio.wait_for(self._get(path), self.timeout)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as err:
            self.close()
            raise httpx.TransportError(f"{type(err).__name__}: {err}") from err

    async def connect(self) -> None:
        self.streams = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), self.timeout)

    async def _get(self, path: str) -> RawResponse:
        if self.streams is None:
            await self.connect()
        assert self.streams is not None
        reader, writer = self.streams
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        await writer.drain()
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)
        }
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return RawResponse(int(head[0].split()[1]), headers, body)

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


async def poller(
    url: str, timeout: float, rec: Recorder, job_id: str, polls: int, stop_at: float, backoff: bool
) -> None:
    parsed = httpx.URL(url)
    client = RawPoller(parsed.host, parsed.port or 80, timeout)
    # Connected first and timed apart: 200 connections opened in the same instant wait in the
    # server's accept queue, which is not the latency of a poll.
    started = time.perf_counter()
    try:
        await client.connect()
    except (OSError, TimeoutError) as err:
        rec.status["connect"][f"failed:{type(err).__name__}"] += 1
        return
    rec.latency["connect"].append(time.perf_counter() - started)
    rec.status["connect"]["ok"] += 1
    try:
        for _ in range(polls):
            if time.monotonic() > stop_at:
                return
            await rec.call("GET /jobs/{id}", lambda: client.get(f"/jobs/{job_id}"), backoff)
    finally:
        client.close()


async def uploader(
    client: httpx.AsyncClient, rec: Recorder, body: bytes, uploads: int, stop_at: float, backoff: bool
) -> None:
    for _ in range(uploads):
        if time.monotonic() > stop_at:
            return
        files = {"file": ("capitals.jsonl", body, "application/jsonl")}
        await rec.call("POST /files", lambda f=files: client.post("/files", files=f), backoff)  # type: ignore[misc]


async def load_phase(args: argparse.Namespace, url: str, job_id: str) -> tuple[Recorder, float]:
    rec = Recorder()
    limits = httpx.Limits(max_connections=args.uploaders, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.request_timeout)
    body = SAMPLE.read_bytes()
    started = time.monotonic()
    stop_at = started + args.deadline
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        backoff = not args.no_backoff
        tasks = [
            poller(url, args.request_timeout, rec, job_id, args.polls, stop_at, backoff)
            for _ in range(args.pollers)
        ]
        tasks += [uploader(client, rec, body, args.uploads, stop_at, backoff) for _ in range(args.uploaders)]
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=args.deadline + args.request_timeout + 10)
    return rec, time.monotonic() - started


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def _percentiles(lat: list[float]) -> dict[str, float | None]:
    found: dict[str, float | None] = {
        f"p{q}": round(1000 * (percentile(lat, q) or 0), 1) for q in (50, 95, 99)
    }
    found["max"] = round(1000 * max(lat), 1) if lat else None
    return found


def summary(rec: Recorder, wall_s: float) -> dict[str, Any]:
    routes: dict[str, Any] = {}
    for route, counts in rec.status.items():
        lat = rec.latency[route]
        routes[route] = {
            "requests": sum(counts.values()),
            "status": dict(sorted(counts.items())),
            "latency_ms": _percentiles(lat),
            "latency_ms_2xx": _percentiles(rec.latency_ok[route]),
        }
    errors = sum(n for c in rec.status.values() for s, n in c.items() if s.isdigit() and int(s) >= 500)
    no_response = sum(n for c in rec.status.values() for s, n in c.items() if not s.isdigit() and s != "ok")
    return {
        "wall_s": round(wall_s, 1),
        "responses_5xx": errors,
        "no_response": no_response,
        "routes": routes,
        "retry_after_on_429_503": dict(rec.retry_after),
        "samples_5xx": rec.samples_500,
    }


def after_load(client: httpx.Client, job_id: str) -> dict[str, Any]:
    """The job's state once the load is over, then cancel it; a server still clogged is reported."""
    try:
        after = client.get(f"/jobs/{job_id}").raise_for_status().json()
        client.post(f"/jobs/{job_id}/cancel")
    except httpx.HTTPError as err:
        return {"error": f"{type(err).__name__}: {err}"}
    return {k: after.get(k) for k in ("status", "progress", "error")}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result: dict[str, Any] = {"benchmark": "load", **run_header()}
    result["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    work = Path(tempfile.mkdtemp(prefix="gptoss-load-"))
    port = free_port()
    service = Service(service_env(args, work / "data", port), port, work)
    try:
        service.start()
        service.wait_healthy()
        with httpx.Client(base_url=service.url, timeout=60) as client:
            job_id = start_job(client)
            result["loadavg_before"] = os.getloadavg()
            rec, wall_s = asyncio.run(load_phase(args, service.url, job_id))
            result["loadavg_after"] = os.getloadavg()
            result["load"] = summary(rec, wall_s)
            write_json(args.out, result)
            result["job_after_load"] = after_load(client, job_id)
    finally:
        service.stop()
        if args.keep:
            print(f"data dir and logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    write_json(args.out, result)
    load = result["load"]
    get = load["routes"].get("GET /jobs/{id}", {})
    print(
        f"5xx {load['responses_5xx']}, no response {load['no_response']}, "
        f"GET /jobs/{{id}} {get.get('status')} {get.get('latency_ms')}, "
        f"POST /files {load['routes'].get('POST /files', {}).get('status')}; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
