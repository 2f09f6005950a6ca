"""Shared helpers for the benchmarks: the run's environment, timing, peak memory, JSON results.

Every figure in BENCHMARKS.md comes from a JSON file written by these scripts, and each such file
carries the command, the date, the machine and the library versions (`run_header`).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

GIB = 1024**3
LIBRARIES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "datasets",
    "unsloth",
    "unsloth_zoo",
    "bitsandbytes",
    "triton",
    "openai-harmony",
    "fastapi",
)


class PrintingHooks:
    """TrainHooks for benchmarks: print the trainer's log lines, never stop early. Subclass for on_step."""

    def on_step(self, metrics: dict[str, Any]) -> None:
        pass

    def on_log(self, line: str) -> None:
        print(line, flush=True)

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass

    def should_stop(self) -> bool:
        return False


def versions() -> dict[str, str]:
    """Installed versions of the libraries whose code is on the measured path."""
    found: dict[str, str] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def machine() -> dict[str, Any]:
    """CPU and, where present, GPU description; never initialises CUDA in a process that avoids it."""
    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = props.name
            info["gpu_mem_gib"] = round(props.total_memory / GIB, 1)
            info["cuda"] = torch.version.cuda
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    info["driver"] = _nvidia_driver()
    return info


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def run_header() -> dict[str, Any]:
    """Date, command, machine, versions and git revision: what every result file starts with."""
    return {
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git_rev": os.environ.get("GIT_REV") or _git_rev(),
        "machine": machine(),
        "versions": versions(),
    }


def _git_rev() -> str | None:
    # The device machine gets a copy of the tree without .git; the driver passes GIT_REV instead.
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def summarize(values: list[float]) -> dict[str, float]:
    """Mean, median, min and max of timed samples (seconds or rates)."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def cuda_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    """Peak GPU memory allocated by this process since the last reset (None on CPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / GIB, 2)


@contextmanager
def timed() -> Iterator[dict[str, float]]:
    """`with timed() as t: ...` then `t["s"]` holds the wall seconds, device work included."""
    box: dict[str, float] = {}
    cuda_sync()
    start = time.perf_counter()
    try:
        yield box
    finally:
        cuda_sync()
        box["s"] = time.perf_counter() - start


def copy_bandwidth_gbs(gib: float = 4.0, repeats: int = 10) -> float | None:
    """Device-to-device copy rate in GB/s (bytes read + written): the memory-bandwidth ceiling."""
    import torch

    if not torch.cuda.is_available():
        return None
    n = int(gib * GIB)
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / statistics.median(times) / 1e9


def wait_http(
    url: str, timeout_s: float, *, alive: Callable[[], None] | None = None, every_s: float = 0.5
) -> float:
    """Seconds until GET `url` answers 200. `alive` is called before every try and raises when a
    process the wait depends on has exited; TimeoutError after `timeout_s`."""
    import httpx

    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if alive is not None:
            alive()
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(every_s)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f} s")


def service_env(
    data_dir: Path, models_dir: Path, model: str, port: int, *, extra: Iterable[str] = (), **settings: str
) -> dict[str, str]:
    """The environment of a benchmark's own API and worker on 127.0.0.1: this process's environment,
    its data folder and model, keys and the rate limit off, plain log lines; then `settings`
    (GPTOSS_... names) and `extra` ("NAME=VALUE" items from a command line) on top."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env.update(
        GPTOSS_DATA_DIR=str(data_dir),
        GPTOSS_MODELS_DIR=str(models_dir.resolve()),
        GPTOSS_BASE_MODEL=model,
        GPTOSS_AUTH="none",
        GPTOSS_PORT=str(port),
        GPTOSS_LOG_JSON="false",
        GPTOSS_RATE_LIMIT_PER_MINUTE="0",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    )
    env.update(settings)
    for item in extra:
        name, _, value = item.partition("=")
        env[name] = value
    return env
