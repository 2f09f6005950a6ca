"""The plain-`generate` baseline for the generation benchmark: the same base (Unsloth, 4-bit), the same
adapter, the same prompts and token counts as `bench.gpu_e2e`'s batch-1 scenario, but no service:
`PeftModel.from_pretrained` + `model.generate`, greedy, one request at a time.

    python -m bench.gen_baseline --model /path/to/gpt-oss-20b-random --models-dir data/models \
        --adapter <adapter folder> --out bench/results/run1 [--new-tokens 64 --rounds 4]

Run it after the API has stopped (one process on the GPU at a time), in the same device call as the
service's benchmark, so the ratio compares runs side by side. Writes `<out>/gen_baseline.json`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bench.common import cuda_sync, run_header, summarize, write_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--models-dir", type=Path, required=True)
    p.add_argument("--adapter", type=Path, help="adapter folder; without it, the plain base")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--backend", default="auto")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=240, help="as gpu_e2e: about this many tokens")
    p.add_argument("--rounds", type=int, default=4)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from app.ml.harmony import render_prompt
    from app.ml.modeling import load_base, resolve_model_path
    from bench.gpu_e2e import prompt_text

    t0 = time.perf_counter()
    loaded = load_base(
        str(resolve_model_path(args.model, args.models_dir)),
        backend=args.backend,
        load_in_4bit=True,
        max_seq_length=2048,
        models_dir=args.models_dir,
        for_training=False,
    )
    model = loaded.model
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(args.adapter))
    model.eval()
    load_s = time.perf_counter() - t0
    device = next(model.parameters()).device
    runs: list[dict[str, Any]] = []
    for r in range(args.rounds + 1):  # round 0 warms up
        turns = [{"role": "user", "content": prompt_text(args.prompt_words, 1000 * r)}]
        ids = torch.tensor([render_prompt(turns, reasoning_effort="low")], device=device)
        cuda_sync()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,  # every request runs to the limit, as in gpu_e2e
                do_sample=False,
            )
        cuda_sync()
        wall = time.perf_counter() - start
        new = int(out.shape[1] - ids.shape[1])
        if r:
            runs.append({"prompt_tokens": int(ids.shape[1]), "new_tokens": new, "wall_s": wall})
    rates = [x["new_tokens"] / x["wall_s"] for x in runs]
    result = {
        **run_header(),
        "config": {k: str(v) for k, v in vars(args).items()},
        "backend": loaded.backend,
        "load_s": round(load_s, 1),
        "runs": runs,
        "tokens_per_s": summarize(rates),
        # the service's batch-1 figure is all completion tokens / wall time of 4 requests in sequence
        "aggregate_tokens_per_s": sum(x["new_tokens"] for x in runs) / sum(x["wall_s"] for x in runs),
    }
    write_json(args.out / "gen_baseline.json", result)
    print({k: result[k] for k in ("backend", "load_s", "tokens_per_s", "aggregate_tokens_per_s")})


if __name__ == "__main__":
    main()
