"""Generation speed through our HTTP API (vLLM engine) beside vLLM's own OpenAI server, same run.

Scenarios (greedy, a ~256-token harmony prompt, 128 new tokens each): one request with an adapter;
32 and 64 concurrent requests spread over 4 adapters (one mixed batch in vLLM), also with 512 new
tokens each; time to first token;
and the time from a job's success (its adapter registered) to the adapter's first answer, loaded on
first use as the API does (and, for comparison, loaded beforehand). Every shape is run once before it is
measured: vLLM compiles a Triton kernel for a new batch shape on first sight. Then every scenario runs
`--repeats` times, vLLM direct and our API back to back each time; the median run of each is kept.

    python bench/vllm_bench.py --vllm-url http://127.0.0.1:8001 --api-url http://127.0.0.1:8000 \
        --adapters ad_a0,ad_a1,ad_a2,ad_a3 --fresh ad_a4=/tmp/ad/a4,ad_a5=/tmp/ad/a5 --out r.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import run_header  # noqa: E402

PROMPT = (
    "Summarise the following notes about the harbour town in three sentences, then list the ships. "
    + " ".join(f"Ship {i} arrived at dawn with salt, wool and letters for the mayor." for i in range(18))
)
NEW_TOKENS = 128


def prompt_ids() -> list[int]:
    from app.ml.harmony import render_prompt

    return render_prompt([{"role": "user", "content": PROMPT}], developer=None, reasoning_effort="medium")


async def _sse(response: httpx.Response) -> Any:
    """The stream's events, parsed on the bytes as the vLLM engine parses vLLM's (httpx's line
    iterator also splits at U+2028, U+0085 and lone CRs, which a random model's text contains)."""
    from app.inference.vllm_engine import sse_events

    async for batch in sse_events(response.aiter_bytes()):
        for event in batch:
            yield event


async def vllm_request(
    client: httpx.AsyncClient, model: str, ids: list[int], new_tokens: int = NEW_TOKENS
) -> dict[str, float]:
    body = {
        "model": model,
        "prompt": ids,
        "max_tokens": new_tokens,
        "temperature": 0.0,
        "stop_token_ids": [200002, 200012],
        "return_token_ids": True,
        "stream": True,
    }
    start, first, tokens = time.monotonic(), None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"vLLM {response.status_code}: {(await response.aread())[:300]!r}")
        async for event in _sse(response):
            got = sum(len(c.get("token_ids") or []) for c in event.get("choices", []))
            if got and first is None:
                first = time.monotonic()
            tokens += got
    return {"start": start, "first": first or time.monotonic(), "end": time.monotonic(), "tokens": tokens}


async def api_request(
    client: httpx.AsyncClient, adapter: str | None, new_tokens: int = NEW_TOKENS
) -> dict[str, float]:
    body = {"prompt": PROMPT, "max_new_tokens": new_tokens, "temperature": 0.0, "stream": True}
    if adapter:
        body["adapter"] = adapter
    start, first, tokens, timings = time.monotonic(), None, 0, None
    async with client.stream("POST", "/generate", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"API {response.status_code}: {(await response.aread())[:300]!r}")
        async for event in _sse(response):
            if event["type"] == "delta" and first is None:
                first = time.monotonic()
            elif event["type"] == "done":
                tokens = event["usage"]["completion_tokens"]
                timings = event["timings"]
            elif event["type"] == "error":
                raise RuntimeError(f"API error event: {event['error']}")
    end = time.monotonic()
    result = {"start": start, "end": end, "tokens": tokens}
    if first is not None:
        result["first"] = first
    elif timings is not None:
        # A random-weight model's tokens are no harmony message, so the parser has no text to stream
        # before the end. The API's first token is then placed on this clock from its own timings
        # (first_token_ms and total_ms are from the same start): send -> first token in the API.
        result["first"] = end - timings["total_ms"] / 1000 + timings["first_token_ms"] / 1000
        result["first_estimated"] = 1.0
    if timings is not None:
        result["server_first"] = timings["first_token_ms"] / 1000
    return result


def summarise(results: list[dict[str, float]]) -> dict[str, Any]:
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    ttft = [r["first"] - r["start"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    server = [r["server_first"] for r in results if "server_first" in r]
    extra: dict[str, Any] = {"server_ttft_p50_s": round(statistics.median(server), 4)} if server else {}
    if any(r.get("first_estimated") for r in results):
        extra["ttft_from"] = "the API's timings (no text streamed: random weights)"
    return {
        **extra,
        "requests": len(results),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": round(statistics.median(ttft), 4),
        "ttft_max_s": round(max(ttft), 4),
    }


# name: (concurrent requests, new tokens each). The 128-token bursts are the figures compared across
# runs; with 512 tokens (the length of a short reasoning answer) a request's admission in our API, paid
# once, weighs a quarter as much against its generation.
SCENARIOS = {
    "one_request_adapter": (1, NEW_TOKENS),
    "c32_over_4_adapters": (32, NEW_TOKENS),
    "c64_over_4_adapters": (64, NEW_TOKENS),
    "c32_over_4_adapters_512_tokens": (32, 512),
    "c64_over_4_adapters_512_tokens": (64, 512),
}


async def scenario(run: Any, adapters: list[str], n: int, new_tokens: int) -> dict[str, Any]:
    return summarise(await asyncio.gather(*(run(adapters[i % len(adapters)], new_tokens) for i in range(n))))


async def measure(args: argparse.Namespace, ids: list[int]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every scenario `--repeats` times, vLLM direct and our API back to back each time (the same
    minute of the same server for both sides of a ratio)."""
    limits = httpx.Limits(max_connections=256)
    async with (
        httpx.AsyncClient(base_url=args.vllm_url, timeout=600, limits=limits) as vllm,
        httpx.AsyncClient(base_url=args.api_url, timeout=600, limits=limits) as api,
    ):

        def runner(target: str) -> Any:
            async def run(adapter: str, new_tokens: int = NEW_TOKENS) -> dict[str, float]:
                if target == "vllm_direct":
                    return await vllm_request(vllm, adapter, ids, new_tokens)
                return await api_request(api, adapter, new_tokens)

            return run

        runs = {t: runner(t) for t in ("vllm_direct", "our_api") if t in args.targets.split(",")}
        adapters = args.adapters.split(",")
        chosen = {k: v for k, v in SCENARIOS.items() if not args.only or k in args.only.split(",")}
        for run in runs.values():  # warm-up: every shape once, and every adapter loaded
            for n, _ in chosen.values():
                await asyncio.gather(*(run(adapters[i % len(adapters)], 16) for i in range(n)))
        out: dict[str, dict[str, list[dict[str, Any]]]] = {t: {s: [] for s in chosen} for t in runs}
        for _ in range(args.repeats):
            for name, (n, new_tokens) in chosen.items():
                for target, run in runs.items():
                    out[target][name].append(await scenario(run, adapters[: min(n, 4)], n, new_tokens))
        return out


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median tokens/s, and every run's tokens/s beside it."""
    ranked = sorted(runs, key=lambda r: r["tokens_per_s"])
    return {**ranked[len(ranked) // 2], "runs_tokens_per_s": [r["tokens_per_s"] for r in runs]}


async def success_to_answer(args: argparse.Namespace) -> dict[str, Any]:
    """Time from a job's success to its adapter's first answer token through our API. A job succeeds
    when the worker has registered its adapter (registry.register_adapter: the folder checked and
    normalized), so that is timed here the same way, in this process, against the API's database;
    the API then loads the adapter into vLLM on its first request. For comparison, a second adapter
    is also loaded into vLLM before its first request (what loading at success would save)."""
    from bench.vllm_api import register

    fresh = dict(item.split("=", 1) for item in args.fresh.split(","))
    names = list(fresh)
    out: dict[str, Any] = {}
    async with (
        httpx.AsyncClient(base_url=args.vllm_url, timeout=600) as vllm,
        httpx.AsyncClient(base_url=args.api_url, timeout=600) as api,
    ):
        if names:
            t0 = time.monotonic()
            register_s = await asyncio.to_thread(register, names[0], names[0], Path(fresh[names[0]]))
            succeeded = time.monotonic()
            result = await api_request(api, names[0], 8)
            out["loaded_on_first_use"] = {
                "register_s": round(register_s, 3),
                "success_to_first_token_s": round(result["first"] - succeeded, 3),
                "register_to_first_token_s": round(result["first"] - t0, 3),
            }
        if len(names) > 1:
            await asyncio.to_thread(register, names[1], names[1], Path(fresh[names[1]]))
            t0 = time.monotonic()
            response = await vllm.post(
                "/v1/load_lora_adapter", json={"lora_name": names[1], "lora_path": fresh[names[1]]}
            )
            loaded = time.monotonic()
            result = await api_request(api, names[1], 8)
            out["loaded_before_first_use"] = {
                "status": response.status_code,
                "load_s": round(loaded - t0, 3),
                "load_to_first_token_s": round(result["first"] - loaded, 3),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vllm-url", required=True)
    parser.add_argument("--api-url", default="", help="our API (needed unless --targets vllm_direct)")
    parser.add_argument("--adapters", required=True, help="4 adapter ids, registered in both")
    parser.add_argument(
        "--fresh",
        default="",
        help="id=path,... adapters neither registered nor loaded yet (for success-to-answer); "
        "registered here against the API's database (GPTOSS_DATA_DIR / GPTOSS_DATABASE_URL)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of every scenario; the median is kept")
    parser.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    parser.add_argument("--targets", default="vllm_direct,our_api", help="vllm_direct, our_api or both")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    ids = prompt_ids()
    result: dict[str, Any] = {
        **run_header(),
        "label": args.label,
        "prompt_tokens": len(ids),
        "new_tokens": NEW_TOKENS,
        "repeats": args.repeats,
    }
    runs = asyncio.run(measure(args, ids))
    for target, scenarios in runs.items():
        result[target] = {name: median_run(r) for name, r in scenarios.items()}
    if "our_api" in result and "vllm_direct" in result:
        result["api_over_direct"] = {
            k: round(result["our_api"][k]["tokens_per_s"] / result["vllm_direct"][k]["tokens_per_s"], 3)
            for k in result["vllm_direct"]
        }
    if args.fresh:
        result["success_to_answer"] = asyncio.run(success_to_answer(args))
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
