"""Merge a LoRA adapter into 16-bit base weights and save a standalone model folder.

python scripts/export.py --adapter outputs --out merged [--base unsloth/gpt-oss-20b] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.config import Settings  # noqa: E402
from app.ml.export import DTYPES, merge_adapter  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapter", type=Path, required=True, help="adapter folder, as training wrote it")
    parser.add_argument("--out", type=Path, required=True, help="new folder for the merged model")
    parser.add_argument("--base", default=None, help="base model; default: the one in the adapter's manifest")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument(
        "--models_dir", type=Path, default=None, help="default: GPTOSS_MODELS_DIR / data/models"
    )
    args = parser.parse_args()
    models_dir = args.models_dir or Settings().models_path
    try:
        out = merge_adapter(args.adapter, args.out, models_dir=models_dir, base=args.base, dtype=args.dtype)
    except (FileNotFoundError, FileExistsError, ValueError, OSError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 2
    print(f"merged model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
