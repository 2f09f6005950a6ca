"""Write the bundled sample datasets (capitals, continents; train + held-out) to app/ml/samples/."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.ml.data import SAMPLES_DIR  # noqa: E402
from app.ml.sample_data import write_samples  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=SAMPLES_DIR, help="folder for the JSONL files")
    args = parser.parse_args()
    for path in write_samples(args.out):
        rows = sum(1 for _ in path.open(encoding="utf-8"))
        print(f"{path}: {rows} rows")


if __name__ == "__main__":
    main()
