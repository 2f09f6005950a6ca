"""Generate the full gpt-oss-20b architecture (20.9 B parameters) with random weights, for GPU
benchmarks where no real weights can be downloaded. Speed and memory on it equal the real model's.

    python scripts/make_full_model.py --out /data/gpt-oss-20b-random [--device cuda]

Built on the device in bf16 (about 39 GB on disk), saved with the offline tokenizer.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.config import Settings  # noqa: E402
from app.ml.modeling import config_fingerprint  # noqa: E402
from app.ml.tiny_model import full_config, save_random_model  # noqa: E402
from app.ml.tokenizer import atomic_build  # noqa: E402


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to create")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=24, help="fewer layers for a quick smoke build")
    parser.add_argument("--models_dir", type=Path, default=None, help="where the offline tokenizer lives")
    args = parser.parse_args()
    config = full_config()
    if args.layers != 24:
        config.num_hidden_layers = args.layers
        config.layer_types = config.layer_types[: args.layers]
    models_dir = args.models_dir or Settings().models_path
    start = time.monotonic()
    atomic_build(
        args.out,
        lambda tmp: save_random_model(
            config, tmp, models_dir, seed=args.seed, dtype=torch.bfloat16, device=args.device
        ),
    )
    print(f"{args.out}: fingerprint {config_fingerprint(config)[:12]}, {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
