"""Real (non-padding) tokens per second on rows of uneven length, packing off vs on, through the
service's own `app.ml.trainer.train` (each setting in its own process, same data, same steps).

    python -m bench.packing_bench --model /path/to/gpt-oss --out bench/results/packing \
        [--rows 256 --min-len 64 --max-len 1024 --batch 4 --steps 12 --warmup 3]

The trainer counts the real tokens it trains on (attention-mask sum; every token when packed, which
is padding-free). Rate = real tokens of the steps after `--warmup` / their wall time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import PrintingHooks, peak_gib, read_json, reset_peak, run_header, write_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--models-dir", type=Path, default=Path("data/models"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--backend", default="auto")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--one", choices=("off", "on"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


class RateHooks(PrintingHooks):
    """TrainHooks that keep (wall time, trainer's tokens/s since the last step) for every step."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.rates: list[float] = []

    def on_start(self, total_steps: int) -> None:
        self.stamps.append(time.perf_counter())
        self.rates.append(0.0)

    def on_step(self, metrics: dict[str, Any]) -> None:
        self.stamps.append(time.perf_counter())
        self.rates.append(float(metrics.get("tokens_per_s") or 0.0))

    def real_rate(self, warmup: int) -> dict[str, float]:
        """Tokens (rate x interval, per step) over time, for the steps after the warm-up."""
        spans = [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)][warmup:]
        tokens = sum(r * s for r, s in zip(self.rates[1 + warmup :], spans, strict=True))
        seconds = sum(spans)
        return {
            "steps": len(spans),
            "real_tokens": round(tokens),
            "seconds": seconds,
            "tokens_per_s": tokens / seconds,
        }


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    from app.ml.trainer import TrainConfig, train
    from bench.data import render_all, uneven_rows, write_jsonl

    rows = uneven_rows(args.rows, args.min_len, args.max_len, seed=5)
    lengths = [len(ids) for ids, _ in render_all(rows)]
    work = args.out / f"packing-{args.one}"
    cfg = TrainConfig.model_validate(
        {
            "base_model": args.model,
            "backend": args.backend,
            "dataset": str(write_jsonl(rows, work / "rows.jsonl")),
            "packing": args.one == "on",
            "max_seq_length": args.max_len,
            "per_device_train_batch_size": args.batch,
            "gradient_accumulation_steps": 1,
            "max_steps": args.warmup + args.steps,
            "lora_r": args.rank,
            "lora_alpha": 2 * args.rank,
            "save_steps": 100_000,
            "logging_steps": 1,
        }
    )
    hooks = RateHooks()
    reset_peak()
    train(cfg, work_dir=work / "job", output_dir=work / "adapter", hooks=hooks, models_dir=args.models_dir)
    return {
        "packing": args.one,
        "dataset": {"rows": len(lengths), "mean_len": sum(lengths) / len(lengths), "max_len": max(lengths)},
        **hooks.real_rate(args.warmup),
        "peak_gib": peak_gib(),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one:
        write_json(args.out / f"packing_{args.one}.json", {**run_header(), **run_one(args)})
        return
    results = {}
    for setting in ("off", "on"):
        cmd = [sys.executable, "-m", "bench.packing_bench", *sys.argv[1:], "--one", setting]
        rc = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False).returncode
        path = args.out / f"packing_{setting}.json"
        results[setting] = read_json(path) if rc == 0 and path.exists() else {"error": f"exit {rc}"}
    on, off = (float(results[k].get("tokens_per_s") or 0) for k in ("on", "off"))
    summary = {**run_header(), "runs": results, "packing_speedup": round(on / off, 3) if on and off else None}
    write_json(args.out / "packing_bench.json", summary)
    for setting, r in results.items():
        print(
            f"packing {setting}: {r.get('tokens_per_s', 0):.1f} real tokens/s  peak {r.get('peak_gib')} GiB"
        )
    print("speedup:", summary["packing_speedup"])


if __name__ == "__main__":
    main()
