"""Train a LoRA adapter from a YAML config (every field documented in configs/train.yaml).

    python scripts/train.py --config configs/train.yaml [--output_dir outputs] [--set max_steps=10 ...]

Checkpoints go to --work_dir (default data/train-cli); running the same command again resumes from
the newest checkpoint there. The adapter is written to --output_dir (default outputs/).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.ml.modeling import import_unsloth_first  # noqa: E402

import_unsloth_first()  # Unsloth patches transformers/TRL only when imported before them

from tqdm import tqdm  # noqa: E402

from app.config import Settings  # noqa: E402
from app.ml.data import DatasetError  # noqa: E402
from app.ml.modeling import cuda_available  # noqa: E402
from app.ml.trainer import TrainConfig, train  # noqa: E402


class ProgressHooks:
    """A tqdm bar with the loss; log lines printed above it."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_start(self, total_steps: int) -> None:
        self.bar = tqdm(total=total_steps, desc="train", unit="step")

    def on_step(self, metrics: dict[str, Any]) -> None:
        if self.bar is None:
            return
        if metrics.get("loss") is not None:
            self.bar.n = metrics["step"]
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['learning_rate']:.2e}")
        if metrics.get("eval_loss") is not None:
            self.bar.write(f"step {metrics['step']}: eval_loss {metrics['eval_loss']:.4f}")

    def on_log(self, line: str) -> None:
        (self.bar.write if self.bar is not None else print)(line)

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass

    def should_stop(self) -> bool:
        return False


def load_config(path: Path, overrides: list[str]) -> TrainConfig:
    """YAML fields, then `cpu_overrides` when there is no CUDA GPU, then --set key=value pairs."""
    raw = yaml.safe_load(path.read_text()) or {}
    cpu = raw.pop("cpu_overrides", None) or {}
    if not cuda_available():
        raw.update(cpu)
    for item in overrides:
        key, _, value = item.partition("=")
        raw[key.strip()] = yaml.safe_load(value)
    return TrainConfig(**raw)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=Path("configs/train.yaml"))
    parser.add_argument("--output_dir", type=Path, default=Path("outputs"))
    parser.add_argument(
        "--work_dir", type=Path, default=None, help="checkpoints; default <data_dir>/train-cli"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    settings = Settings()
    cfg = load_config(args.config, args.overrides)
    hooks = ProgressHooks()
    work_dir = args.work_dir or settings.data_dir / "train-cli"
    try:
        result = train(
            cfg, work_dir=work_dir, output_dir=args.output_dir, hooks=hooks, models_dir=settings.models_path
        )
    except DatasetError as exc:
        print(f"dataset error: {exc}", file=sys.stderr)
        return 2
    finally:
        if hooks.bar is not None:
            hooks.bar.close()
    print(
        f"backend {result.backend}; steps {result.global_step}/{result.total_steps}; metrics {result.metrics}"
    )
    print(f"adapter: {result.adapter_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
