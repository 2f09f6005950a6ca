"""Fixtures for the ml tests, reusable by the service and inference tests.

``trained_adapter`` / ``trained_adapter_continents``: one real LoRA adapter each, trained once per
session on the tiny model with the bundled sample tasks (capitals: "What is the capital of France?"
-> "Paris."; continents: same questions -> "Europe."), so two adapters answer the same prompt
differently. Each is an adapter folder (PEFT weights + config, tokenizer, manifest.json).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from app.ml.trainer import TrainConfig, TrainResult, train

# One intra-op thread: the tiny model's matrices are too small to gain from two threads, and when
# several processes share the 2 cores (API + worker + test), OpenMP's spinning threads make every
# op 5-10x slower. Subprocesses (workers) inherit the env variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Small enough for 2 CPU cores, large enough that the tiny model learns the harmony structure.
FIXTURE_TRAIN = {
    "base_model": "tiny-gpt-oss",
    "backend": "hf",
    "max_steps": 20,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "learning_rate": 5e-3,
    "warmup_steps": 0,
    "save_steps": 20,
    "logging_steps": 1,
    "seed": 7,
}


class RecordingHooks:
    """TrainHooks that remember everything; ``stop_after`` makes should_stop() true from that step."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.stop_after = stop_after
        self.total_steps: int | None = None
        self.steps: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self.checkpoints: list[tuple[int, Path]] = []
        self.stop_checks = 0

    def on_start(self, total_steps: int) -> None:
        self.total_steps = total_steps

    def on_step(self, metrics: dict[str, Any]) -> None:
        self.steps.append(metrics)

    def on_log(self, line: str) -> None:
        self.lines.append(line)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.checkpoints.append((step, path))

    def should_stop(self) -> bool:
        self.stop_checks += 1  # asked once per optimizer step, after the step
        return self.stop_after is not None and self.stop_checks >= self.stop_after

    @property
    def losses(self) -> list[tuple[int, float]]:
        return [(m["step"], m["loss"]) for m in self.steps if m.get("loss") is not None]


def train_recorded(
    cfg: TrainConfig, root: Path, models_dir: Path, **kwargs: Any
) -> tuple[TrainResult, RecordingHooks]:
    """``train(cfg)`` with its work in ``root/work``, its adapter in ``root/adapter`` and every hook
    call recorded (``kwargs``: train's other keywords, e.g. data_dir)."""
    hooks = RecordingHooks()
    result = train(
        cfg, work_dir=root / "work", output_dir=root / "adapter", hooks=hooks, models_dir=models_dir, **kwargs
    )
    return result, hooks


def train_sample_adapter(
    models_dir: Path, root: Path, dataset: str, **overrides: Any
) -> tuple[TrainResult, RecordingHooks]:
    return train_recorded(TrainConfig(**{**FIXTURE_TRAIN, "dataset": dataset, **overrides}), root, models_dir)


@pytest.fixture(scope="session")
def trained_run(
    models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainResult, RecordingHooks]:
    """The capitals training run: its TrainResult and the hooks that watched it."""
    return train_sample_adapter(models_dir, tmp_path_factory.mktemp("adapter-capitals"), "sample:capitals")


@pytest.fixture(scope="session")
def trained_adapter(trained_run: tuple[TrainResult, RecordingHooks]) -> Path:
    """Adapter folder trained on sample:capitals."""
    path = trained_run[0].adapter_dir
    assert path is not None
    return path


@pytest.fixture(scope="session")
def trained_adapter_continents(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Adapter folder trained on sample:continents (answers the capitals questions with a continent)."""
    result, _ = train_sample_adapter(
        models_dir, tmp_path_factory.mktemp("adapter-continents"), "sample:continents"
    )
    assert result.adapter_dir is not None
    return result.adapter_dir


_UNSLOTH_PROBE = """
import importlib.abc, importlib.machinery, json, sys
from pathlib import Path

seen = {}


class UnslothProbe(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name != "unsloth":
            return None
        seen["transformers_already_imported"] = "transformers" in sys.modules
        return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, UnslothProbe())
import app.ml.modeling as modeling

modeling.cuda_available = lambda: True
modeling.unsloth_installed = lambda: True
"""


def probe_unsloth_import_order(code: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter that looks like a GPU host with Unsloth installed: the
    ``unsloth`` package (not installable without CUDA) is stood in for by an empty module whose import
    records whether transformers was already imported. Returns what was recorded (``seen``)."""
    import json
    import os
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _UNSLOTH_PROBE + code + "\nprint(json.dumps(seen))\n"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env={**os.environ, **(env or {})},
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))
