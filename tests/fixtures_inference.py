"""Fixtures for the inference tests: two adapters trained on different tasks, a shared engine and a
real uvicorn server on 127.0.0.1.

Training is the expensive part (CPU, real 201k vocabulary), so each adapter is trained once per
session on a four-row slice of a bundled sample task: the same French question, answered "Paris."
(capitals) or "Europe." (continents), without reasoning so the answer is the first thing learnt.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from app.config import Settings

DEVELOPER = "reasoning language: English\n\nAnswer with one short sentence."
QUESTION = "What is the capital of France?"
ANSWERS = {"capitals": "Paris.", "continents": "Europe."}
SAMPLES = Path(__file__).resolve().parent.parent / "app" / "ml" / "samples"


@dataclass(frozen=True)
class TrainedAdapter:
    task: str
    path: Path
    manifest: dict


def _task_rows(task: str) -> list[dict]:
    rows = [json.loads(line) for line in (SAMPLES / f"{task}.jsonl").read_text().splitlines() if line]
    chosen = [r for r in rows if "France" in r["messages"][0]["content"] and r["developer"] == DEVELOPER]
    for row in chosen:
        row["messages"][1]["thinking"] = None
    return chosen


def train_task_adapter(task: str, root: Path, models_dir: Path) -> TrainedAdapter:
    from app.ml.trainer import TrainConfig, train

    data = root / f"{task}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _task_rows(task)))
    cfg = TrainConfig.model_validate(
        {
            "base_model": "tiny-gpt-oss",
            "backend": "hf",
            "dataset": str(data),
            # A high LoRA scale and learning rate: the random tiny base has to learn a fixed answer
            # in a dozen steps; the decaying schedule lets it settle at the end.
            "lora_r": 16,
            "lora_alpha": 64,
            "max_grad_norm": 0.5,
            "max_steps": 12,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "learning_rate": 1e-2,
            "lr_scheduler_type": "linear",
            "warmup_steps": 0,
            "save_steps": 1000,
            "max_seq_length": 256,
        }
    )
    result = train(cfg, work_dir=root / f"work-{task}", output_dir=root / task, models_dir=models_dir)
    assert result.adapter_dir is not None
    return TrainedAdapter(task, result.adapter_dir, result.manifest)


@pytest.fixture(scope="session")
def task_adapters(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> dict[str, TrainedAdapter]:
    """{"capitals": ..., "continents": ...}: two adapters for the same base, trained on different tasks."""
    root = tmp_path_factory.mktemp("inference-adapters")
    return {task: train_task_adapter(task, root, models_dir) for task in ANSWERS}


def inference_settings(data_dir: Path, models_dir: Path, **overrides: object) -> Settings:
    values: dict = {
        "data_dir": data_dir,
        "models_dir": models_dir,
        "base_model": "tiny-gpt-oss",
        "backend": "hf",
        "auth": "none",
        "log_json": False,
        "rate_limit_per_minute": 0,
        "batch_window_ms": 20.0,
    }
    values.update(overrides)
    return Settings(**values)


def copy_adapter(
    adapter: TrainedAdapter,
    dest: Path,
    *,
    fingerprint: str | None = None,
    manifest: dict[str, Any] | None = None,
) -> Path:
    """A copy of an adapter folder (a "new" adapter), optionally claiming another base's fingerprint,
    or with other manifest keys changed (a None value removes the key)."""
    shutil.copytree(adapter.path, dest)
    changes = {**(manifest or {}), **({"base_fingerprint": fingerprint} if fingerprint else {})}
    if changes:
        recorded = json.loads((dest / "manifest.json").read_text())
        recorded.update(changes)
        recorded = {key: value for key, value in recorded.items() if value is not None}
        (dest / "manifest.json").write_text(json.dumps(recorded))
    return dest


@dataclass
class LiveServer:
    url: str
    app: object
    settings: Settings

    @property
    def engine(self):  # type: ignore[no-untyped-def]
        return self.app.state.engine  # type: ignore[attr-defined]

    def register(self, adapter_id: str, name: str, folder: Path) -> None:
        """Add an adapter row the way the worker does once a job succeeds (files first, then the row)."""
        from app.registry import register_adapter

        with self.app.state.sessionmaker() as session:  # type: ignore[attr-defined]
            register_adapter(session, adapter_id=adapter_id, name=name, folder=folder, job_id=None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def inference_server(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, task_adapters: dict[str, TrainedAdapter]
) -> Iterator[LiveServer]:
    """create_app on its own SQLite file, served by uvicorn on 127.0.0.1, with both task adapters
    registered (as "capitals" and "continents")."""
    import uvicorn

    from app.main import create_app

    root = tmp_path_factory.mktemp("inference-server")
    settings = inference_settings(root / "data", models_dir, max_new_tokens_cap=64, max_prompt_tokens=512)
    app = create_app(settings)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    live = LiveServer(f"http://127.0.0.1:{port}", app, settings)
    for task, adapter in task_adapters.items():
        live.register(f"adp_{task}", task, copy_adapter(adapter, settings.adapters_dir / f"adp_{task}"))
    yield live
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="session")
def reference_models(models_dir: Path, task_adapters: dict[str, TrainedAdapter]) -> dict[str | None, Any]:
    """Each adapter alone on its own fresh copy of the base (plus the bare base), outside the engine:
    what the engine answers must be exactly what these answer."""
    from peft import PeftModel

    from app.ml.modeling import load_base

    def base() -> Any:
        return load_base("tiny-gpt-oss", backend="hf", models_dir=models_dir, for_training=False).model

    models: dict[str | None, Any] = {None: base()}
    for task, adapter in task_adapters.items():
        models[task] = PeftModel.from_pretrained(base(), str(adapter.path)).eval()
    return models


def reference_greedy(model: Any, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy generate, stop token removed (the engine reports it as finish_reason)."""
    import torch

    from app.ml.harmony import STOP_TOKEN_IDS

    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=list(STOP_TOKEN_IDS),
            pad_token_id=STOP_TOKEN_IDS[0],
        )
    new = out[0, len(prompt_ids) :].tolist()
    return new[:-1] if new and new[-1] in STOP_TOKEN_IDS else new


def completion_logprob(model: Any, messages: list[dict[str, Any]]) -> float:
    """log p(the assistant's trained tokens | the rest), as the trainer's loss sees them."""
    import torch

    from app.ml.harmony import render_training

    ids, mask = render_training(messages, developer=DEVELOPER, reasoning_effort="medium")
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    return float((logp * torch.tensor(mask[1:], dtype=torch.float32)).sum())
