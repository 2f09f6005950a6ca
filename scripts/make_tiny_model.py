"""Build the offline o200k_harmony tokenizer and the tiny random GPT-OSS model (deterministic).

python scripts/make_tiny_model.py [--models_dir data/models]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.config import Settings  # noqa: E402
from app.ml.modeling import config_fingerprint  # noqa: E402
from app.ml.tiny_model import ensure_tiny_model, tiny_config  # noqa: E402
from app.ml.tokenizer import ensure_harmony_assets  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models_dir", type=Path, default=None, help="default: GPTOSS_MODELS_DIR / data/models"
    )
    args = parser.parse_args()
    models_dir = args.models_dir or Settings().models_path
    print(f"tokenizer: {ensure_harmony_assets(models_dir)}")
    print(
        f"tiny model: {ensure_tiny_model(models_dir)} (fingerprint {config_fingerprint(tiny_config())[:12]})"
    )


if __name__ == "__main__":
    main()
