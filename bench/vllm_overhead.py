"""Our API's own cost per token in front of vLLM, on CPU: a fake vLLM server that streams token ids
as fast as it can, read by clients directly and through our API, side by side in one run.

A CPU proxy for the H200 gap (API / vLLM direct = 0.83 at 32 streams, 0.75 at 64): the GPU is not
what differs between the two paths, the API process is. The fake answers ``/v1/completions`` as
vLLM 0.26 does with ``return_token_ids`` (one chunk per token, vLLM's chunk fields, the last chunk
carrying the usage), in harmony tokens (an analysis message and a final message), so our parser emits
a delta for nearly every token, as with a real model. The fake, the API (uvicorn, vLLM engine) and the
clients each run in their own process; the API's CPU seconds come from /proc.

    python -m bench.vllm_overhead --models-dir /tmp/gptoss-test-cache/models --out /tmp/ovh.json
    python -m bench.vllm_overhead ... --profile /tmp/api.prof   # yappi over every API thread
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import wait_http  # noqa: E402

BASE = "served-base"
PROMPT = [200006, 17360, 200008, 3086, 200007, 200006, 173781]  # ids only: the fake ignores them


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the fake vLLM server (a bare ASGI app: the fake should cost as little as it can) ---------------


def harmony_answer(n_tokens: int) -> list[int]:
    """`n_tokens` harmony tokens: reasoning, then a final answer, ending with <|return|>."""
    from app.ml.harmony import encoding

    words = " ".join(f"word{i}" for i in range(n_tokens))
    enc = encoding()
    head = enc.encode("<|channel|>analysis<|message|>", allowed_special="all")
    mid = enc.encode("<|end|><|start|>assistant<|channel|>final<|message|>", allowed_special="all")
    tail = enc.encode("<|return|>", allowed_special="all")
    text = enc.encode(words)
    room = n_tokens - len(head) - len(mid) - len(tail)
    half = room // 2
    return [*head, *text[:half], *mid, *text[half:room], *tail]


# vLLM's decode step on the H200 (random MXFP4 gpt-oss-20b, 4 rank-16 adapters, 2026-12-01 call 3):
# the direct figures 176.8 / 2,783 / 4,865 tokens/s at 1 / 32 / 64 streams, as milliseconds per step
# (every running stream gets one token a step); linear in between.
H200_STEP_MS = ((1, 5.66), (32, 11.5), (64, 13.2))
PREFILL_MS = 1.5  # added to a step per request that joins in it (chunked prefill of a short prompt)


def step_ms(batch: int) -> float:
    points = H200_STEP_MS
    if batch <= points[0][0]:
        return points[0][1]
    for (b0, ms0), (b1, ms1) in zip(points, points[1:], strict=False):
        if batch <= b1:
            return ms0 + (ms1 - ms0) * (batch - b0) / (b1 - b0)
    (b0, ms0), (b1, ms1) = points[-2], points[-1]
    return ms1 + (ms1 - ms0) * (batch - b1) / (b1 - b0)


class Stepper:
    """A GPU stand-in: one decode step for every running stream at a time, each step as long as
    vLLM's on the H200 for that batch, so a client that is late to read or to send costs wall time as
    it does there (the unpaced fake streams as fast as the CPU allows, which measures CPU only)."""

    def __init__(self) -> None:
        self.waiting: list[asyncio.Queue[int]] = []
        self.running: list[asyncio.Queue[int]] = []
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def join(self) -> asyncio.Queue[int]:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.run())
        queue: asyncio.Queue[int] = asyncio.Queue()
        self.waiting.append(queue)
        self.wake.set()
        return queue

    def leave(self, queue: asyncio.Queue[int]) -> None:
        for group in (self.waiting, self.running):
            if queue in group:
                group.remove(queue)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_step = loop.time()
        while True:
            if not self.waiting and not self.running:
                self.wake.clear()
                await self.wake.wait()
                next_step = loop.time()
            joined, self.waiting = self.waiting, []
            self.running += joined
            next_step += (step_ms(len(self.running)) + PREFILL_MS * len(joined)) / 1000
            await asyncio.sleep(max(0.0, next_step - loop.time()))
            for queue in self.running:
                queue.put_nowait(1)


def fake_app(tokens: list[int], paced: bool = False) -> Any:
    stops = {200002, 200012}
    stepper = Stepper() if paced else None

    def chunk(token_ids: list[int], finish: str | None, usage: dict[str, int] | None) -> bytes:
        choice = {
            "index": 0,
            "text": "x",
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": None,
            "token_ids": token_ids,
            "prompt_logprobs": None,
            "prompt_token_ids": None,
        }
        body = {
            "id": "cmpl-0123456789abcdef",
            "object": "text_completion",
            "created": 1764550000,
            "model": BASE,
            "choices": [choice],
            "usage": usage,
        }
        return f"data: {json.dumps(body)}\n\n".encode()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        if path == "/v1/completions":
            body = json.loads(raw)
            out = tokens[: body["max_tokens"]]
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            queue = stepper.join() if stepper else None
            for i, token in enumerate(out):
                if queue is not None:
                    await queue.get()
                last = i == len(out) - 1
                finish = ("stop" if token in stops else "length") if last else None
                usage = (
                    {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(out)} if last else None
                )
                await send(
                    {"type": "http.response.body", "body": chunk([token], finish, usage), "more_body": True}
                )
            if stepper is not None and queue is not None:
                stepper.leave(queue)
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
            return
        if path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"Success"})
            return
        if path == "/v1/models":
            payload = {"object": "list", "data": [{"id": BASE, "object": "model", "parent": None}]}
        else:  # /health
            payload = {}
        data = json.dumps(payload).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": data})

    return app


def serve_fake(port: int, n_tokens: int, paced: bool) -> None:
    import uvicorn

    uvicorn.run(fake_app(harmony_answer(n_tokens), paced), host="127.0.0.1", port=port, log_level="warning")


# --- processes ----------------------------------------------------------------------------------


def _cpu_s(pid: int) -> float:
    """utime + stime of the process, all its threads, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_processes(args: argparse.Namespace, data_dir: Path) -> tuple[subprocess.Popen[bytes], ...]:
    fake_port, api_port = args.fake_port, args.api_port
    fake = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.vllm_overhead",
            "--serve-fake",
            str(fake_port),
            "--tokens",
            str(args.tokens),
            *(["--paced"] if args.paced else []),
        ],
        cwd=Path(__file__).resolve().parents[1],
    )
    env = {
        **os.environ,
        "GPTOSS_ENGINE": "vllm",
        "GPTOSS_VLLM_URL": f"http://127.0.0.1:{fake_port}",
        "GPTOSS_VLLM_SERVED_MODEL": BASE,
        "GPTOSS_BASE_MODEL": str(args.models_dir / args.base_model),
        "GPTOSS_MODELS_DIR": str(args.models_dir),
        "GPTOSS_DATA_DIR": str(data_dir),
        "GPTOSS_AUTH": "none",
        "GPTOSS_RATE_LIMIT_PER_MINUTE": "0",
        "GPTOSS_MAX_CONCURRENT_GENERATIONS": "512",
        # one client address sends every request: the per-client and in-flight limits would shed them
        "GPTOSS_MAX_REQUESTS_IN_FLIGHT": "512",
        "GPTOSS_MAX_REQUESTS_IN_FLIGHT_PER_CLIENT": "512",
        "GPTOSS_LOG_JSON": "false",
    }
    make_adapters(args, data_dir, env)
    env.update(kv.split("=", 1) for kv in args.api_env)
    if args.profile:
        env["GPTOSS_BENCH_PROFILE"] = str(args.profile)
        cmd = [sys.executable, "-m", "bench.vllm_overhead", "--serve-api-profiled", str(api_port)]
    else:
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "app.main:app_from_env", "--port", str(api_port)]
        cmd += ["--log-level", "warning"]
    log = open(data_dir / "api.log", "wb")  # noqa: SIM115 (lives as long as the process)
    api = subprocess.Popen(cmd, env=env, cwd=Path(__file__).resolve().parents[1], stdout=log, stderr=log)
    wait_http(f"http://127.0.0.1:{fake_port}/health", 60, every_s=0.1)
    wait_http(f"http://127.0.0.1:{api_port}/healthz", 60, every_s=0.1)
    return fake, api


def make_adapters(args: argparse.Namespace, data_dir: Path, env: dict[str, str]) -> None:
    """Random LoRA adapters for the base, registered in the API's registry as the worker does."""
    from bench.vllm_adapters import make_adapter

    root = Path(__file__).resolve().parents[1]
    for i in range(args.adapters):
        folder = make_adapter(args.models_dir / args.base_model, data_dir / f"a{i}", rank=4, std=0.01, seed=i)
        cmd = [sys.executable, "bench/vllm_api.py", "register", "--id", f"ad_a{i}", "--name", f"a{i}"]
        subprocess.run([*cmd, "--folder", str(folder)], env=env, cwd=root, check=True, capture_output=True)


def serve_api_profiled(port: int) -> None:
    """The API under yappi (every thread: the route loop and the vLLM engine's loop); the stats are
    written when the process gets SIGTERM."""
    import uvicorn
    import yappi

    from app.main import app_from_env

    yappi.set_clock_type("cpu")
    yappi.start()
    server = uvicorn.Server(uvicorn.Config(app_from_env(), host="127.0.0.1", port=port, log_level="warning"))
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]  # no re-raise
    try:
        server.run()
    finally:
        yappi.stop()
        out = os.environ["GPTOSS_BENCH_PROFILE"]
        yappi.get_func_stats().save(out, type="pstat")
        with open(out + ".txt", "w") as f:
            yappi.get_func_stats().sort("tsub").print_all(
                out=f, columns={0: ("name", 110), 1: ("ncall", 10), 2: ("tsub", 8), 3: ("ttot", 8)}
            )


# --- clients ------------------------------------------------------------------------------------


def _request(mode: str, n_tokens: int, model: str, adapter: int | None) -> tuple[str, dict[str, Any]]:
    """Request `adapter` (a{i} in our registry, ad_a{i} in vLLM) or the base (None)."""
    chat = [{"role": "user", "content": "Say something."}]
    if mode.startswith("direct"):
        body: dict[str, Any] = {
            "model": BASE if adapter is None else f"ad_a{adapter}",
            "prompt": PROMPT,
            "max_tokens": n_tokens,
            "stream": True,
            "return_token_ids": True,
        }
        return "/v1/completions", body
    stream = mode.endswith("stream")
    name = None if adapter is None else f"a{adapter}"
    if mode.startswith("generate"):
        return "/generate", {"messages": chat, "max_new_tokens": n_tokens, "stream": stream, "adapter": name}
    body = {"model": name or model, "messages": chat, "max_tokens": n_tokens, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return "/v1/chat/completions", body


def _tokens_of(mode: str, last: dict[str, Any]) -> int:
    usage = last.get("usage") or {}
    return int(usage.get("completion_tokens", 0))


async def one(client: httpx.AsyncClient, mode: str, n_tokens: int, model: str, adapter: int | None) -> int:
    """One request; its completion tokens (read from the last event, so the client parses little)."""
    path, body = _request(mode, n_tokens, model, adapter)
    if not body.get("stream"):
        response = await client.post(path, json=body)
        response.raise_for_status()
        return _tokens_of(mode, response.json())
    last = ""
    async with client.stream("POST", path, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data:") and line != "data: [DONE]":
                last = line
    return _tokens_of(mode, json.loads(last[5:]))


async def scenario(
    url: str,
    mode: str,
    concurrency: int,
    n_tokens: int,
    pid: int | None,
    model: str,
    adapters: int,
    rounds: int,
) -> dict[str, Any]:
    def which(i: int) -> int | None:
        return i % adapters if adapters else None

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        await asyncio.gather(
            *(one(client, mode, n_tokens, model, which(i)) for i in range(concurrency))
        )  # warm-up
        cpu0 = _cpu_s(pid) if pid else 0.0
        started = time.perf_counter()
        counts = []
        for _ in range(rounds):  # back to back, so short scenarios last long enough to time
            counts += await asyncio.gather(
                *(one(client, mode, n_tokens, model, which(i)) for i in range(concurrency))
            )
        wall = time.perf_counter() - started
        cpu = (_cpu_s(pid) - cpu0) if pid else 0.0
    tokens = sum(counts)
    row = {
        "mode": mode,
        "concurrency": concurrency,
        "rounds": rounds,
        "tokens": tokens,
        "wall_s": round(wall, 3),
    }
    row["tokens_per_s"] = round(tokens / wall, 1)
    if pid:
        # the process that served the clients: the fake vLLM for "direct", else our API
        row["server_cpu_s"] = round(cpu, 3)
        row["server_cpu_us_per_token"] = round(cpu / tokens * 1e6, 1)
    return row


def main(args: argparse.Namespace) -> dict[str, Any]:
    from bench.common import run_header

    tmp = Path(tempfile.mkdtemp(prefix="vllm_overhead_"))
    fake, api = start_processes(args, tmp)
    rows = []
    try:
        base = str(args.models_dir / args.base_model)
        fake_url, api_url = f"http://127.0.0.1:{args.fake_port}", f"http://127.0.0.1:{args.api_port}"
        for concurrency in args.concurrency:
            rounds = max(1, args.min_requests // concurrency)
            for mode in args.modes:
                url, pid = (fake_url, fake.pid) if mode == "direct" else (api_url, api.pid)
                row = asyncio.run(
                    scenario(url, mode, concurrency, args.tokens, pid, base, args.adapters, rounds)
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        api.send_signal(signal.SIGTERM)
        fake.send_signal(signal.SIGTERM)
        api.wait(60)
        fake.wait(30)
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**run_header(), "tokens_per_request": args.tokens, "adapters": args.adapters, "rows": rows}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/gptoss-test-cache/models"))
    parser.add_argument("--base-model", default="tiny-gpt-oss", help="whose config gives the fingerprint")
    parser.add_argument("--adapters", type=int, default=4, help="requests go round-robin over them; 0 = base")
    parser.add_argument("--min-requests", type=int, default=256, help="per scenario (rounds of N requests)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 64])
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["direct", "generate-stream", "generate", "chat-stream", "chat"],
        help="direct = the fake vLLM read by the clients; the others go through our API",
    )
    parser.add_argument("--fake-port", type=int, default=_free_port())
    parser.add_argument("--api-port", type=int, default=_free_port())
    parser.add_argument("--profile", type=Path, help="run the API under yappi; pstats written here")
    parser.add_argument(
        "--api-env", nargs="*", default=[], metavar="KEY=VALUE", help="extra environment for the API only"
    )
    parser.add_argument(
        "--paced",
        action="store_true",
        help="the fake steps like vLLM on the H200 (H200_STEP_MS): wall-clock ratios, not CPU only",
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the API's data dir and log")
    parser.add_argument("--serve-fake", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-api-profiled", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fake:
        serve_fake(args.serve_fake, args.tokens, args.paced)
    elif args.serve_api_profiled:
        serve_api_profiled(args.serve_api_profiled)
    else:
        result = main(args)
        if args.out:
            from bench.common import write_json

            write_json(args.out, result)
