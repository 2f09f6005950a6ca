"""End-to-end LoRA SFT on the tiny GPT-OSS model (real TRL SFTTrainer, real PEFT, CPU)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from app.ml.data import DatasetError, load_rows, validate_rows
from app.ml.generation import generate_ids
from app.ml.harmony import render_prompt, render_training
from app.ml.modeling import config_fingerprint, ensure_tiny_model, load_base, tiny_config
from app.ml.trainer import TrainConfig, TrainResult, train
from tests.fixtures_ml import RecordingHooks

pytestmark = pytest.mark.slow


def test_loss_falls_and_hooks_see_every_step(trained_run: tuple[TrainResult, RecordingHooks]) -> None:
    result, hooks = trained_run
    losses = [loss for _, loss in hooks.losses]
    assert hooks.total_steps == result.total_steps == 20 and result.global_step == 20
    assert [step for step, _ in hooks.losses] == list(range(1, 21))
    # mean of the last 5 steps well below the first 5 (start is ~ln(201088) = 12.2)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 3.0
    last = hooks.steps[-1]
    assert last["learning_rate"] is not None and last["grad_norm"] is not None and last["tokens_per_s"] > 0
    assert hooks.checkpoints and hooks.checkpoints[-1][0] == 20


def test_adapter_folder_and_manifest(trained_adapter: Path, models_dir: Path) -> None:
    names = {p.name for p in trained_adapter.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "manifest.json"} <= names
    manifest = json.loads((trained_adapter / "manifest.json").read_text())
    assert manifest["base_model"] == "tiny-gpt-oss" and manifest["backend"] == "hf"
    assert manifest["base_fingerprint"] == config_fingerprint(tiny_config())
    assert manifest["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert len(manifest["dataset"]["fingerprint"]) == 64 and manifest["metrics"]["final_loss"] > 0
    assert not [p for p in trained_adapter.parent.iterdir() if ".tmp-" in p.name]


def test_lora_weights_change_and_base_weights_do_not(trained_adapter: Path, models_dir: Path) -> None:
    base_file = ensure_tiny_model(models_dir) / "model.safetensors"
    digest = hashlib.sha256(base_file.read_bytes()).hexdigest()
    lora = load_file(str(trained_adapter / "adapter_model.safetensors"))
    assert lora and all("lora_" in name for name in lora)  # only LoRA tensors are saved
    b_mats = [t for name, t in lora.items() if "lora_B" in name]
    assert all(t.abs().sum() > 0 for t in b_mats)  # B starts at zero; every one moved
    assert any("experts" in name for name in lora) and any("q_proj" in name for name in lora)
    # The frozen base in memory after attaching the adapter equals the file, and the file is untouched.
    loaded = load_base("tiny-gpt-oss", backend="hf", models_dir=models_dir, for_training=False)
    model = PeftModel.from_pretrained(loaded.model, str(trained_adapter))
    saved = load_file(str(base_file))
    base_params = dict(model.get_base_model().named_parameters())
    for name, tensor in saved.items():
        key = name.replace("mlp.experts.gate_up_proj", "mlp.experts.base_layer.gate_up_proj")
        param = base_params.get(name, base_params.get(key))
        if param is not None:
            assert torch.equal(param.detach(), tensor), name
    assert hashlib.sha256(base_file.read_bytes()).hexdigest() == digest


def _match_rate(model: torch.nn.Module, examples: list) -> float:
    """Share of target completion tokens the greedy generation reproduces, position by position."""
    hits = total = 0
    for ex in examples:
        prompt = render_prompt(ex.messages[:-1], developer=ex.developer)
        target = render_training(ex.messages, developer=ex.developer)[0][len(prompt) :]
        generated = generate_ids(model, None, prompt, max_new_tokens=len(target))
        hits += sum(a == b for a, b in zip(generated, target, strict=False))
        total += len(target)
    return hits / total


def test_trained_adapter_is_closer_to_held_out_targets(trained_adapter: Path, models_dir: Path) -> None:
    rows = load_rows("sample:capitals.heldout", data_dir=models_dir, max_rows=100, max_bytes=10**6)
    examples = validate_rows(rows, max_rows=100)[::15]  # 4 unseen prompts, several languages
    loaded = load_base("tiny-gpt-oss", backend="hf", models_dir=models_dir, for_training=False)
    base_rate = _match_rate(loaded.model, examples)
    tuned = PeftModel.from_pretrained(loaded.model, str(trained_adapter)).eval()
    tuned_rate = _match_rate(tuned, examples)
    assert tuned_rate > base_rate + 0.1, (base_rate, tuned_rate)


def test_stop_saves_a_checkpoint_and_resume_continues(models_dir: Path, tmp_path: Path) -> None:
    overrides = {"max_steps": 6, "per_device_train_batch_size": 4, "save_steps": 100, "eval_fraction": 0.05}
    cfg = TrainConfig(**{**_fixture_cfg(), "dataset": "sample:continents", **overrides})
    first = RecordingHooks(stop_after=3)
    stopped = train(
        cfg, work_dir=tmp_path / "w", output_dir=tmp_path / "a", hooks=first, models_dir=models_dir
    )
    assert stopped.stopped and stopped.adapter_dir is None and not (tmp_path / "a").exists()
    assert first.checkpoints[-1][0] == 3 and (tmp_path / "w/checkpoints/checkpoint-3").is_dir()

    second = RecordingHooks()
    done = train(cfg, work_dir=tmp_path / "w", output_dir=tmp_path / "a", hooks=second, models_dir=models_dir)
    assert [s for s, _ in second.losses] == [4, 5, 6] and done.global_step == 6
    assert any("resuming from checkpoint-3" in line for line in second.lines)
    # The loss carries on from where it stopped instead of restarting near ln(vocab).
    assert second.losses[0][1] < first.losses[0][1] - 0.5
    assert done.adapter_dir == tmp_path / "a" and (tmp_path / "a/manifest.json").is_file()
    # eval_steps defaults to save_steps (100 here), so the held-out 5% is evaluated once, at the end
    evals = [m for m in second.steps if m["eval_loss"] is not None]
    assert [m["step"] for m in evals] == [6] and done.metrics["eval_loss"] == evals[0]["eval_loss"]


def _fixture_cfg() -> dict:
    from tests.fixtures_ml import FIXTURE_TRAIN

    return dict(FIXTURE_TRAIN)


def test_bad_dataset_fails_before_loading_a_model(models_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    cfg = TrainConfig(base_model="no/such-model", dataset=str(bad))
    with pytest.raises(DatasetError, match="row 1, field 'messages': needs at least one assistant"):
        train(cfg, work_dir=tmp_path / "w", output_dir=tmp_path / "a", models_dir=models_dir)


def test_train_config_rejects_unknown_and_bad_fields() -> None:
    with pytest.raises(ValueError, match="lora_rank"):
        TrainConfig(lora_rank=8)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="lora_r"):
        TrainConfig(lora_r=0)
