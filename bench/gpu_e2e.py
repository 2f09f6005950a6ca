"""The service end to end, as separate processes over real HTTP, then the generation benchmark on it.

    python -m bench.gpu_e2e --model /path/to/gpt-oss-20b-random --out bench/results/e2e [--steps 20]

1. migrate a fresh data dir, start `python -m workers.worker` and
   `uvicorn app.main:app_from_env --factory` (the API loads the shared base: Unsloth, 4-bit on CUDA);
2. upload a generated JSONL dataset (`POST /files`), `POST /jobs` (LoRA on attention and experts),
   poll until the worker's child has trained and registered the adapter;
3. `POST /generate` with the adapter at reasoning_effort low and high, and on the plain base;
4. (`--gen-bench`) three more adapters (the trained one with its LoRA B matrices rescaled, registered
   through app.registry), then tokens/s at batch 1 and 8 / 32 concurrent requests over 4 adapters,
   time to first token, and cold-load / switch costs, all through `POST /generate`.

Results go to `<out>/e2e.json` (and `gen_bench.json`) after every stage, so a run cut short still
leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from bench.common import copy_bandwidth_gbs, run_header, summarize, wait_http, write_json
from bench.common import service_env as common_service_env
from bench.data import WORDS, uneven_rows, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = {"succeeded", "failed", "cancelled"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="base model folder or 'tiny-gpt-oss'")
    p.add_argument("--models-dir", type=Path, required=True, help="offline tokenizer (+ tiny model)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, help="service data dir (default <out>/data)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--steps", type=int, default=20, help="training steps of the job")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512, help="longest row, tokens")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--job-timeout", type=float, default=600)
    p.add_argument("--gen-bench", action="store_true")
    p.add_argument("--keep-api", action="store_true", help="leave the API running (own session)")
    p.add_argument("--state", type=Path, default=Path("/tmp/gptoss-e2e-state.json"))
    p.add_argument("--attach", action="store_true", help="gen bench on the API that --state names")
    p.add_argument("--stop-api", action="store_true", help="with --attach: stop that API afterwards")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-words", type=int, default=240, help="about this many prompt tokens")
    p.add_argument("--concurrency", default="8,32", help="concurrent requests over 4 adapters")
    p.add_argument("--one-adapter-concurrency", default="8,32", help="concurrent requests, one adapter")
    p.add_argument("--batch1-rounds", type=int, default=4, help="batch-1 requests in sequence")
    p.add_argument("--max-batch-size", type=int, default=32)
    return p.parse_args(argv)


# --- the service's processes -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_env(args: argparse.Namespace, data_dir: Path, port: int) -> dict[str, str]:
    return common_service_env(
        data_dir,
        args.models_dir,
        args.model,
        port,
        GPTOSS_BACKEND=args.backend,
        GPTOSS_LOAD_IN_4BIT="true",
        GPTOSS_WORKER_POLL_S="0.5",
        GPTOSS_MAX_BATCH_SIZE=str(args.max_batch_size),
        GPTOSS_MAX_CONCURRENT_GENERATIONS="256",
    )


class Service:
    """The worker and the API as child processes, logs under `out`; stopped with SIGTERM."""

    def __init__(self, args: argparse.Namespace, data_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = service_env(args, data_dir, self.port)
        self.out = args.out
        self.keep_api = bool(args.keep_api)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        self._migrate()
        self._spawn("worker", [sys.executable, "-m", "workers.worker"])
        self._spawn(
            "api",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app.main:app_from_env",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
        )

    def _migrate(self) -> None:
        code = "from app.config import get_settings as g; from app.db import upgrade_to_head as u; u(g())"
        subprocess.run([sys.executable, "-c", code], env=self.env, cwd=ROOT, check=True)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.out / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        # With --keep-api the API gets its own session, so it outlives this command on the GPU machine
        # and the next command can benchmark it without loading the 20B base again.
        self.procs[name] = subprocess.Popen(
            cmd,
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=self.keep_api and name == "api",
        )

    def wait_for(self, path: str, timeout: float) -> float:
        """Seconds until GET `path` answers 200 (/healthz: HTTP is up; /readyz: the base is loaded)."""
        return wait_http(f"{self.url}{path}", timeout, alive=self.check_alive, every_s=1)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {name}.log")

    def stop(self) -> None:
        procs = [p for n, p in self.procs.items() if not (self.keep_api and n == "api")]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


# --- the e2e stages --------------------------------------------------------------------------------


def upload(client: httpx.Client, rows_path: Path) -> dict[str, Any]:
    with rows_path.open("rb") as fh:
        resp = client.post("/files", files={"file": (rows_path.name, fh, "application/jsonl")})
    resp.raise_for_status()
    return dict(resp.json())


def job_hyperparameters(args: argparse.Namespace, save_steps: int) -> dict[str, Any]:
    """The benchmark jobs' training options, from the command line's steps, batch, length and rank."""
    return {
        "max_steps": args.steps,
        "per_device_train_batch_size": args.batch,
        "gradient_accumulation_steps": 1,
        "max_seq_length": args.seq,
        "lora_r": args.rank,
        "lora_alpha": 2 * args.rank,
        "warmup_steps": 2,
        "save_steps": save_steps,
    }


def submit_job(client: httpx.Client, args: argparse.Namespace, file_id: str) -> dict[str, Any]:
    hyper = job_hyperparameters(args, save_steps=max(args.steps // 2, 1))
    body = {"dataset": file_id, "suffix": "e2e", "hyperparameters": hyper}
    resp = client.post("/jobs", json=body)
    resp.raise_for_status()
    return dict(resp.json())


def wait_job(client: httpx.Client, args: argparse.Namespace, job: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    while job["status"] not in TERMINAL:
        if time.monotonic() - started > args.job_timeout:
            raise TimeoutError(f"job {job['id']} still {job['status']} after {args.job_timeout:.0f} s")
        time.sleep(2)
        job = client.get(f"/jobs/{job['id']}").raise_for_status().json()
    job["wall_s"] = round(time.monotonic() - started, 1)
    events = client.get(f"/jobs/{job['id']}/events")
    job["events"] = events.json().get("data", [])[-40:] if events.status_code == 200 else events.text
    return dict(job)


def generate(client: httpx.Client, **body: Any) -> dict[str, Any]:
    started = time.perf_counter()
    resp = client.post("/generate", json=body)
    out: dict[str, Any] = {"status": resp.status_code, "client_s": round(time.perf_counter() - started, 3)}
    out.update(resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {})
    return out


def prompt_text(words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def e2e(args: argparse.Namespace, client: httpx.Client, service: Service, result: dict[str, Any]) -> str:
    """Job first (the worker loads its own copy of the base while the API loads the shared one)."""
    rows = write_jsonl(uneven_rows(args.rows, 64, args.seq, seed=1), args.out / "dataset.jsonl")
    result["file"] = upload(client, rows)
    job = submit_job(client, args, result["file"]["id"])
    result["api_ready_s"] = round(service.wait_for("/readyz", 900), 1)
    write_json(args.out / "e2e.json", result)
    job = wait_job(client, args, job)
    result["job"] = job
    if job["status"] != "succeeded":
        raise RuntimeError(f"job ended {job['status']}: {job.get('error')}")
    adapter = job["adapter_id"]
    question = "What is the capital of France? Answer in one word."
    result["generate"] = {
        effort: generate(
            client,
            adapter=adapter,
            prompt=question,
            reasoning_effort=effort,
            temperature=0,
            max_new_tokens=48,
        )
        for effort in ("low", "high")
    }
    result["generate"]["base"] = generate(
        client, prompt=question, reasoning_effort="low", temperature=0, max_new_tokens=48
    )
    return str(adapter)


# --- the generation benchmark ------------------------------------------------------------------------


def clone_adapters(args: argparse.Namespace, data_dir: Path, adapter_id: str, count: int) -> list[str]:
    """`count` more adapters: the trained one with each LoRA B matrix scaled by its own random factor,
    so every adapter gives its own answers at exactly the trained adapter's cost; registered through
    the service's own registry."""
    import torch
    from safetensors.torch import load_file, save_file

    from app.config import Settings
    from app.db import make_engine, make_sessionmaker
    from app.registry import register_adapter

    settings = Settings.model_validate(
        {"data_dir": data_dir, "models_dir": args.models_dir, "base_model": args.model}
    )
    source = settings.adapters_dir / adapter_id
    sessions = make_sessionmaker(make_engine(settings))
    ids = []
    for i in range(count):
        new_id = f"adp_bench{i}"
        target = settings.adapters_dir / new_id
        shutil.copytree(source, target, dirs_exist_ok=True)
        weights = load_file(str(source / "adapter_model.safetensors"))
        gen = torch.Generator().manual_seed(i)
        for name, tensor in weights.items():
            if "lora_B" in name:
                weights[name] = tensor * (0.5 + torch.rand((), generator=gen)).to(tensor.dtype)
        save_file(weights, str(target / "adapter_model.safetensors"))
        with sessions() as session:
            register_adapter(session, adapter_id=new_id, name=f"bench-{i}", folder=target, job_id=None)
        ids.append(new_id)
    return ids


def _one(client: httpx.Client, args: argparse.Namespace, adapter: str | None, seed: int, new: int) -> dict:
    return generate(
        client,
        adapter=adapter,
        prompt=prompt_text(args.prompt_words, seed),
        temperature=0,
        max_new_tokens=new,
        reasoning_effort="low",
    )


def scenario(
    client: httpx.Client,
    args: argparse.Namespace,
    adapters: list[str | None],
    concurrency: int,
    rounds: int = 1,
    new: int | None = None,
) -> dict[str, Any]:
    """`concurrency` requests at once (round-robin over `adapters`), `rounds` times; aggregate rates."""
    new = new or args.new_tokens
    jobs = [adapters[i % len(adapters)] for i in range(concurrency)]
    replies: list[dict[str, Any]] = []
    started = time.perf_counter()
    for r in range(rounds):
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            futures = [pool.submit(_one, client, args, a, 1000 * r + i, new) for i, a in enumerate(jobs)]
            replies += [f.result() for f in futures]
    wall = time.perf_counter() - started
    ok = [x for x in replies if x["status"] == 200]
    tokens = sum(x["usage"]["completion_tokens"] for x in ok)
    return {
        "concurrency": concurrency,
        "adapters": len(set(adapters)),
        "requests": len(replies),
        "failed": len(replies) - len(ok),
        "completion_tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2) if wall else None,
        "per_request_tokens_per_s": summarize([x["timings"]["tokens_per_s"] for x in ok]),
        "ttft_ms": summarize([x["timings"]["first_token_ms"] for x in ok]),
        "finish": sorted({x.get("finish_reason", "?") for x in ok}),
    }


def adapter_costs(client: httpx.Client, args: argparse.Namespace, a: str, b: str) -> dict[str, Any]:
    """First-token latency for one-token requests: same adapter again (warm), alternating adapters
    (a switch each time), so switch cost = alternating - same."""

    def ttft(adapter: str, seed: int) -> float:
        reply = _one(client, args, adapter, seed, 1)
        return float(reply["timings"]["first_token_ms"])

    same = [ttft(a, i) for i in range(6)]
    alternating = [ttft(a if i % 2 else b, i) for i in range(6)]
    return {
        "same_adapter_ttft_ms": summarize(same),
        "alternating_ttft_ms": summarize(alternating),
        "switch_ms_estimate": round(statistics.median(alternating) - statistics.median(same), 2),
    }


def gen_bench(
    args: argparse.Namespace,
    client: httpx.Client,
    data_dir: Path,
    adapter: str,
    save: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """The scenarios in order; ``save(out)`` after each, so a run cut short keeps what it measured."""
    out: dict[str, Any] = {**run_header(), "config": {k: str(v) for k, v in vars(args).items()}}
    out["copy_gbs"] = copy_bandwidth_gbs()  # the memory-bandwidth ceiling, measured in this run
    extra = clone_adapters(args, data_dir, adapter, 3)
    pool: list[str | None] = [adapter, *extra]
    # Cold load: the first request to each new adapter pays its load; a second one does not.
    cold = [_one(client, args, a, 7, 1)["timings"]["first_token_ms"] for a in extra]
    warm = [_one(client, args, a, 7, 1)["timings"]["first_token_ms"] for a in extra]
    out["cold_vs_warm_ttft_ms"] = {
        "cold": cold,
        "warm": warm,
        "load_ms_estimate": round(statistics.median(cold) - statistics.median(warm), 2),
    }
    out["adapter_switch"] = adapter_costs(client, args, adapter, extra[0])
    save(out)
    _one(client, args, adapter, 0, 8)  # warm-up
    out["scenarios"] = {"batch1_adapter": scenario(client, args, [adapter], 1, rounds=args.batch1_rounds)}
    save(out)
    out["scenarios"]["batch1_base"] = scenario(client, args, [None], 1, rounds=2)
    save(out)
    for c in [int(x) for x in args.concurrency.split(",") if x]:
        out["scenarios"][f"c{c}_4adapters"] = scenario(client, args, pool, c)
        save(out)
    for c in [int(x) for x in args.one_adapter_concurrency.split(",") if x]:
        out["scenarios"][f"c{c}_1adapter"] = scenario(client, args, [adapter], c)
        save(out)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.attach:
        attach(args)
        return
    data_dir = (args.data_dir or args.out / "data").resolve()
    result: dict[str, Any] = {**run_header(), "model": args.model}
    service = Service(args, data_dir)
    try:
        service.start()
        result["api_http_s"] = round(service.wait_for("/healthz", 300), 1)
        with httpx.Client(base_url=service.url, timeout=httpx.Timeout(900)) as client:
            adapter = e2e(args, client, service, result)
            write_json(args.out / "e2e.json", result)
            if args.keep_api:
                state = {
                    "url": service.url,
                    "pid": service.procs["api"].pid,
                    "data_dir": str(data_dir),
                    "adapter": adapter,
                }
                write_json(args.state, state)
            if args.gen_bench:
                run_gen_bench(args, client, data_dir, adapter)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        write_json(args.out / "e2e.json", result)
        service.stop()
        brief = {k: v for k, v in result.items() if k not in ("machine", "versions")}
        print(json.dumps(brief, indent=1, default=str)[:6000])


def run_gen_bench(args: argparse.Namespace, client: httpx.Client, data_dir: Path, adapter: str) -> None:
    bench = gen_bench(
        args, client, data_dir, adapter, save=lambda out: write_json(args.out / "gen_bench.json", out)
    )  # written after every scenario, the last one included
    print(json.dumps(bench["scenarios"], indent=1))


def attach(args: argparse.Namespace) -> None:
    """The generation benchmark on an API left running by an earlier `--keep-api` run; stops it after."""
    state = json.loads(args.state.read_text())
    try:
        with httpx.Client(base_url=state["url"], timeout=httpx.Timeout(900)) as client:
            client.get("/readyz").raise_for_status()
            run_gen_bench(args, client, Path(state["data_dir"]), state["adapter"])
    finally:
        if args.stop_api:
            os.killpg(state["pid"], signal.SIGTERM)  # its own session: the API and nothing else
            time.sleep(10)


if __name__ == "__main__":
    main()
