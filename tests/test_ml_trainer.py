"""End-to-end LoRA SFT on the tiny GPT-OSS model (real TRL SFTTrainer, real PEFT, CPU)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from pydantic import ValidationError
from safetensors.torch import load_file

from app.ml.data import DatasetError, load_rows, validate_rows
from app.ml.generation import generate_ids
from app.ml.harmony import render_prompt, render_training
from app.ml.modeling import config_fingerprint, load_base
from app.ml.tiny_model import ensure_tiny_model, tiny_config
from app.ml.trainer import TrainConfig, TrainResult, latest_checkpoint, train
from tests.fixtures_ml import RecordingHooks, train_recorded

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
    # the targets PEFT applied (read back from the model), as saved in adapter_config.json
    assert manifest["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert manifest["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    adapter_config = json.loads((trained_adapter / "adapter_config.json").read_text())
    assert sorted(adapter_config["target_modules"]) == manifest["target_modules"]
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
    checkpoint = tmp_path / "w/checkpoints/checkpoint-3"
    assert first.checkpoints[-1][0] == 3 and checkpoint.is_dir()
    assert not (checkpoint / "tokenizer.json").exists()  # only the final adapter carries the tokenizer
    # A crash mid-save leaves a newer folder without trainer_state.json: resume must skip it.
    half = tmp_path / "w/checkpoints/checkpoint-5"
    shutil.copytree(checkpoint, half, ignore=shutil.ignore_patterns("trainer_state.json"))

    second = RecordingHooks()
    done = train(cfg, work_dir=tmp_path / "w", output_dir=tmp_path / "a", hooks=second, models_dir=models_dir)
    assert [s for s, _ in second.losses] == [4, 5, 6] and done.global_step == 6
    assert any("resuming from checkpoint-3" in line for line in second.lines)
    assert any("removing incomplete checkpoint-5" in line for line in second.lines)
    # The loss carries on from where it stopped instead of restarting near ln(vocab).
    assert second.losses[0][1] < first.losses[0][1] - 0.5
    assert done.adapter_dir == tmp_path / "a" and (tmp_path / "a/manifest.json").is_file()
    # eval_steps defaults to save_steps (100 here), so the held-out 5% is evaluated once, at the end
    evals = [m for m in second.steps if m["eval_loss"] is not None]
    assert [m["step"] for m in evals] == [6] and done.metrics["eval_loss"] == evals[0]["eval_loss"]


class FencedHooks(RecordingHooks):
    """A worker's child whose attempt is taken over: from the start (None), or right after its
    checkpoint of step `lost_after` was written."""

    def __init__(self, lost_after: int | None) -> None:
        super().__init__()
        self.lost_after = lost_after

    def may_save(self) -> bool:
        if self.lost_after is None:
            return False
        return not any(step >= self.lost_after for step, _ in self.checkpoints)


@pytest.mark.parametrize(("lost_after", "kept"), [(None, []), (3, ["checkpoint-2", "checkpoint-3"])])
def test_a_fenced_attempt_writes_no_checkpoint_and_no_adapter(
    models_dir: Path, tmp_path: Path, lost_after: int | None, kept: list[str]
) -> None:
    """Taken over before its first save (step 2): it stops there without saving. Taken over after its
    last checkpoint (step 3), before the adapter is written: the checkpoints stay, the adapter is not
    written (the new owner writes it)."""
    cfg = TrainConfig(**{**_fixture_cfg(), "max_steps": 3, "save_steps": 2, "per_device_train_batch_size": 2})
    hooks = FencedHooks(lost_after)
    work, out = tmp_path / "w", tmp_path / "a"
    result = train(cfg, work_dir=work, output_dir=out, hooks=hooks, models_dir=models_dir)
    assert result.stopped and result.adapter_dir is None and not out.exists()
    assert sorted(p.name for p in (work / "checkpoints").glob("checkpoint-*")) == kept


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


@pytest.mark.parametrize(
    ("field", "value", "limit"),
    [
        ("max_steps", 100_001, "100000"),
        ("per_device_train_batch_size", 257, "256"),
        ("gradient_accumulation_steps", 1025, "1024"),
        ("lora_r", 257, "256"),
        ("lora_alpha", 1025, "1024"),
        ("learning_rate", 0.5, "0.01"),
        ("num_train_epochs", 101, "100"),
        ("max_seq_length", 131073, "131072"),
        ("save_total_limit", 101, "100"),
    ],
)
def test_train_config_limits_name_the_field_and_the_limit(field: str, value: float, limit: str) -> None:
    with pytest.raises(ValidationError) as err:
        TrainConfig(**{field: value})
    (error,) = err.value.errors()
    assert error["loc"] == (field,) and limit in error["msg"]


def test_train_config_choices_are_the_supported_ones() -> None:
    assert TrainConfig(lr_scheduler_type="cosine", optim="adamw_torch").optim == "adamw_torch"
    for field, value in [("lr_scheduler_type", "reduce_lr_on_plateau"), ("optim", "adamw_apex_fused")]:
        with pytest.raises(ValidationError, match=field):
            TrainConfig(**{field: value})
    with pytest.raises(ValidationError, match="lora_dropout must be 0 when target_parameters is set"):
        TrainConfig(lora_dropout=0.1)
    assert TrainConfig(lora_dropout=0.1, target_parameters=[]).lora_dropout == 0.1


def test_latest_checkpoint_skips_half_written_folders(tmp_path: Path) -> None:
    # The file layout the HF Trainer writes; trainer_state.json comes last in a save.
    for step, files in [
        (2, ["adapter_model.safetensors", "trainer_state.json"]),
        (4, ["adapter_config.json"]),
    ]:
        folder = tmp_path / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        for name in files:
            (folder / name).write_text("{}")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints/checkpoint-2"
    (tmp_path / "checkpoints/checkpoint-4/trainer_state.json").write_text("{}")  # no weights yet
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints/checkpoint-2"
    assert latest_checkpoint(tmp_path / "nothing-here") is None


def test_epochs_and_packing(models_dir: Path, tmp_path: Path) -> None:
    """max_steps=0 trains by epochs, a relative dataset path is found in data_dir, and a packed run
    computes the same first-step loss and gradient as the same rows unpacked: packed rows do not
    attend to each other (one batch of all 16 rows in both runs; with B = 0 at step 1 the loss is
    the base model's, so any cross-row attention would change it)."""
    rows = load_rows("sample:capitals", data_dir=None, max_rows=1000, max_bytes=10**7)[:16]
    (tmp_path / "data").mkdir()
    (tmp_path / "data/slice.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = {**_fixture_cfg(), "dataset": "slice.jsonl", "per_device_train_batch_size": 16}
    runs = {}
    for name, extra in [
        ("epochs", {"max_steps": 0, "num_train_epochs": 2}),
        ("packed", {"packing": True, "max_steps": 1}),
    ]:
        result, hooks = train_recorded(
            TrainConfig(**{**common, **extra}), tmp_path / name, models_dir, data_dir=tmp_path / "data"
        )
        assert result.adapter_dir is not None
        runs[name] = hooks
    by_epoch = runs["epochs"].steps
    assert [(m["step"], m["epoch"]) for m in by_epoch] == [(1, 1.0), (2, 2.0)]  # one step per epoch
    assert by_epoch[0]["total_steps"] == 2
    packed = runs["packed"].steps[0]
    assert packed["loss"] == pytest.approx(by_epoch[0]["loss"], rel=1e-5)
    assert packed["grad_norm"] == pytest.approx(by_epoch[0]["grad_norm"], rel=1e-3)


def test_model_loss_path_matches_the_masked_path(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the Unsloth backend a step's loss is the model's own forward with labels (Unsloth's
    chunked cross-entropy on GPU), not TRL's fused head. Here both run through ``train()`` on the
    tiny model: the model's own loss (full-vocabulary logits) must give the same per-step losses
    and token counts as the CPU path, gradient accumulation included."""
    import app.ml.trainer as trainer_module

    overrides = {"max_steps": 3, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}
    cfg = TrainConfig(**{**_fixture_cfg(), "dataset": "sample:continents", "eval_fraction": 0, **overrides})
    runs = {}
    for path in ("masked", "model"):
        monkeypatch.setattr(trainer_module, "loss_path", lambda backend, on_cuda, path=path: path)
        done, hooks = train_recorded(cfg, tmp_path / path, models_dir)
        assert any(f"loss computed on the {path!r} path" in line for line in hooks.lines)
        runs[path] = (hooks.losses, done.metrics["tokens"])
    (masked, masked_tokens), (model, model_tokens) = runs["masked"], runs["model"]
    assert [s for s, _ in masked] == [s for s, _ in model] == [1, 2, 3]
    assert masked_tokens == model_tokens > 0
    for (_, a), (_, b) in zip(masked, model, strict=True):
        assert abs(a - b) < 1e-3 * abs(a), (masked, model)


def test_shuffle_false_trains_the_rows_in_file_order(models_dir: Path, tmp_path: Path) -> None:
    """The batches the trainer feeds: in file order with shuffle=false (the training benchmark relies
    on it to give the service and a bare loop the same batches), in a seeded other order by default."""
    from app.ml.trainer import build_trainer, lora_model, prepare_data

    loaded = load_base("tiny-gpt-oss", backend="hf", models_dir=models_dir, for_training=True)
    seen = {}
    for shuffle in (False, True):
        cfg = TrainConfig(**{**_fixture_cfg(), "per_device_train_batch_size": 4, "shuffle": shuffle})
        data = prepare_data(cfg, None)
        model = lora_model(cfg, loaded)
        trainer = build_trainer(cfg, model, loaded, data, tmp_path / str(shuffle))
        batches = list(trainer.get_train_dataloader())
        seen[shuffle] = [row for b in batches for row in _unpadded(b["input_ids"], b["attention_mask"])]
        model.unload()  # the next round wraps the same base again
    in_file_order = [row["input_ids"] for row in data.train]
    assert seen[False] == in_file_order
    assert seen[True] != in_file_order and sorted(seen[True]) == sorted(in_file_order)


def _unpadded(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]


def test_moe_aux_loss_is_off_by_default_and_the_same_on_both_loss_paths(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TRL 1.15 turns gpt-oss's load-balancing loss on from the config (router_aux_loss_coef): on the
    H200 that was a GPU sync per layer in the service's step, which a bare Unsloth loop does not pay.
    The service leaves it off unless moe_aux_loss is set; then the CPU path adds it as the model's
    own forward does. A copy of the tiny model with coefficient 0.5 makes the term visible."""
    import app.ml.trainer as trainer_module

    base = tmp_path / "tiny-aux"
    shutil.copytree(models_dir / "tiny-gpt-oss", base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "router_aux_loss_coef": 0.5}))
    overrides = {"base_model": str(base), "max_steps": 2, "per_device_train_batch_size": 4, "shuffle": False}
    first_loss = {}
    for path, aux in [("masked", False), ("masked", True), ("model", True)]:
        monkeypatch.setattr(trainer_module, "loss_path", lambda backend, on_cuda, path=path: path)
        cfg = TrainConfig(**{**_fixture_cfg(), **overrides, "moe_aux_loss": aux})
        _, hooks = train_recorded(cfg, tmp_path / f"{path}-{aux}", models_dir)
        first_loss[path, aux] = hooks.losses[0][1]
    assert first_loss["masked", True] == pytest.approx(first_loss["model", True], rel=1e-4)
    # the same weights at step 1: the difference is 0.5 x the load-balancing loss (>= 1 by its definition)
    assert first_loss["masked", True] - first_loss["masked", False] > 0.4, first_loss


def test_the_default_job_trains_without_router_logits(models_dir: Path, tmp_path: Path) -> None:
    from app.ml.trainer import build_trainer, lora_model, prepare_data

    loaded = load_base("tiny-gpt-oss", backend="hf", models_dir=models_dir, for_training=True)
    loaded.model.config.output_router_logits = True  # as a config asking for it would load
    cfg = TrainConfig(**_fixture_cfg())
    model = lora_model(cfg, loaded)
    trainer = build_trainer(cfg, model, loaded, prepare_data(cfg, None), tmp_path)
    assert trainer.aux_loss_enabled is False
    assert model.config.get_text_config().output_router_logits is False


def test_loss_path_per_backend() -> None:
    from app.ml.trainer import loss_path

    assert loss_path("unsloth", on_cuda=True) == "model"
    assert loss_path("hf", on_cuda=True) == "trl"
    assert loss_path("hf", on_cuda=False) == loss_path("unsloth", on_cuda=False) == "masked"


def test_a_batch_without_padding_loses_its_attention_mask() -> None:
    from app.ml.trainer import drop_full_attention_mask

    def collate(rows: list[list[int]]) -> dict:
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    wrapped = drop_full_attention_mask(collate)
    full = wrapped([[1, 2, 3], [4, 5, 6]])
    assert set(full) == {"input_ids", "labels"} and full["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]]
    padded = wrapped([[1, 2, 3], [4]])
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_a_job_on_the_unsloth_backend_imports_unsloth_before_transformers(
    models_dir: Path, tmp_path: Path
) -> None:
    """Unsloth patches transformers and TRL only when imported first ("Unsloth should be imported
    before [transformers]" was logged by the service's job on the H200). In a fresh interpreter, as in
    the worker's job process, ``train()`` must import it before its tokenizer pulls in transformers."""
    from tests.fixtures_ml import probe_unsloth_import_order

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    seen = probe_unsloth_import_order(
        f"""
from app.ml.data import DatasetError
from app.ml.trainer import TrainConfig, train
cfg = TrainConfig(base_model="tiny-gpt-oss", backend="unsloth", dataset={str(bad)!r})
try:
    train(cfg, work_dir=Path({str(tmp_path / "w")!r}), output_dir=Path({str(tmp_path / "a")!r}),
          models_dir=Path({str(models_dir)!r}))
except DatasetError as exc:
    seen["error"] = str(exc)
"""
    )
    assert seen["transformers_already_imported"] is False
    assert "needs at least one assistant" in seen["error"]  # it got as far as the data, after the import
