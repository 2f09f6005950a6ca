"""LoRA SFT on gpt-oss with TRL's SFTTrainer, on either backend (Unsloth or transformers+PEFT).

Data is rendered with harmony before it reaches TRL (``input_ids`` + ``completion_mask`` columns,
``completion_only_loss=True``), so the formatting is exactly gpt-oss's and the loss falls on the
assistant's tokens only. Whether the reasoning (analysis channel) is trained is
``train_on_reasoning`` (default on: the Multilingual-Thinking recipe teaches the reasoning too).

Checkpoints go to ``work_dir/checkpoints`` every ``save_steps``; ``train`` resumes from the newest
one. The adapter folder is written by ``app.adapter_folder.write_adapter`` (temp folder beside
``output_dir``, renamed into place).
"""

from __future__ import annotations

import functools
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from app import adapter_folder
from app.ml.data import DatasetError, Example, dataset_fingerprint, encode_examples, load_rows, validate_rows
from app.ml.modeling import (
    UNSLOTH_EXPERT_MODULES,
    apply_lora,
    cuda_available,
    import_unsloth_first,
    keep_packed_samples_apart,
    load_base,
    pick_backend,
    unsloth_checkpointing,
)
from app.ml.tokenizer import ensure_harmony_assets
from app.ml.train_config import TrainConfig


class TrainHooks(Protocol):
    """What the worker (or the CLI) sees of a run. ``on_start`` is optional."""

    def on_step(self, metrics: dict[str, Any]) -> None: ...
    def on_log(self, line: str) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    def should_stop(self) -> bool: ...


class NullHooks:
    def on_start(self, total_steps: int) -> None:
        pass

    def on_step(self, metrics: dict[str, Any]) -> None:
        pass

    def on_log(self, line: str) -> None:
        pass

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass

    def should_stop(self) -> bool:
        return False


@dataclass
class TrainResult:
    adapter_dir: Path | None  # None when stopped early (cancel / shutdown): resume later from the checkpoint
    stopped: bool
    global_step: int
    total_steps: int
    backend: str
    metrics: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)


# --- data ------------------------------------------------------------------------------------------


@dataclass
class PreparedData:
    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]] | None
    fingerprint: str
    n_train_rows: int


def _split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    import random

    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(examples) * fraction)) if fraction > 0 else 0
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [
        e for i, e in enumerate(examples) if i in held
    ]


def prepare_data(cfg: TrainConfig, data_dir: Path | None) -> PreparedData:
    """Load, validate and tokenise the data before any model is loaded, so bad data fails fast."""
    examples = validate_rows(
        load_rows(cfg.dataset, data_dir=data_dir, max_rows=cfg.max_rows, max_bytes=cfg.max_bytes),
        max_rows=cfg.max_rows,
    )
    fingerprint = dataset_fingerprint(examples)
    if cfg.eval_dataset:
        rows = load_rows(cfg.eval_dataset, data_dir=data_dir, max_rows=cfg.max_rows, max_bytes=cfg.max_bytes)
        train_ex, eval_ex = examples, validate_rows(rows, max_rows=cfg.max_rows)
    else:
        train_ex, eval_ex = _split(examples, cfg.eval_fraction, cfg.seed)
        if not train_ex:
            raise DatasetError(
                0, "eval_fraction", f"{cfg.eval_fraction} leaves no rows of {len(examples)} to train on"
            )
    encode = functools.partial(
        encode_examples,
        max_seq_length=cfg.max_seq_length,
        default_effort=cfg.reasoning_effort,
        train_on_reasoning=cfg.train_on_reasoning,
    )
    train = encode(train_ex)
    evaluation = encode(eval_ex) if eval_ex else None
    return PreparedData(train, evaluation, fingerprint, len(train_ex))


# --- trainer ---------------------------------------------------------------------------------------


def _masked_lm_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any) -> Any:
    """Next-token loss computed only where labels are kept: the LM head (201,088 columns) runs on
    the completion positions instead of every position, which is most of a CPU step's cost."""
    import torch
    import torch.nn.functional as F

    labels = inputs["labels"][:, 1:]
    keep = (labels != -100).any(dim=0).nonzero().squeeze(-1)
    forward = {k: v for k, v in inputs.items() if k != "labels"}
    outputs = model(**forward, logits_to_keep=keep, use_cache=False)
    logits = outputs.logits
    targets = labels[:, keep]
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    count = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
    loss = loss / torch.as_tensor(count).clamp(min=1)  # a batch without labels gives 0, not 0/0
    aux = getattr(outputs, "aux_loss", None)
    if aux is not None:  # moe_aux_loss: as the model's own forward adds it when given labels
        loss = loss + model.config.get_text_config().router_aux_loss_coef * aux.to(loss.device)
    return loss


LossPath = Literal["model", "trl", "masked"]


def loss_path(backend: str, on_cuda: bool) -> LossPath:
    """Which loss a training step computes.

    - ``model``: the model's own forward with labels. On the Unsloth backend that is Unsloth's
      chunked cross-entropy, exactly what a bare Unsloth loop runs. TRL's fused LM head would replace
      it with TRL's Triton kernel plus entropy and accuracy metrics that sync the GPU three times a
      step, which costs a large share of the throughput (BENCHMARKS.md).
    - ``trl``: TRL's fused LM-head loss (transformers + PEFT on CUDA: no full-vocabulary logits).
    - ``masked``: off CUDA, where TRL's kernel (Triton) cannot run: ``_masked_lm_loss``.
    """
    if not on_cuda:
        return "masked"
    return "model" if backend == "unsloth" else "trl"


def drop_full_attention_mask(collate: Callable[[Any], dict]) -> Callable[[Any], dict]:
    """Wrap a collator so that a batch without padding carries no attention mask. The check runs on
    the CPU tensors before they reach the GPU; without a mask the model builds its causal and
    sliding-window masks itself instead of inspecting an all-ones tensor on the GPU every step."""

    def wrapped(features: Any) -> dict:
        batch = collate(features)
        mask = batch.get("attention_mask")
        if mask is not None and not mask.is_cuda and bool(mask.all()):
            batch = {k: v for k, v in batch.items() if k != "attention_mask"}
        return batch

    return wrapped


def _trainer_class() -> type:
    import transformers
    from trl import SFTTrainer

    class ProjectSFTTrainer(SFTTrainer):
        """SFTTrainer with the loss picked by ``loss_path`` and a count of the tokens trained on
        (for tokens/s) that is kept on the device, so counting never waits for the GPU."""

        loss_path: LossPath = "trl"
        _tokens: Any = 0

        @property
        def tokens_seen(self) -> int:
            return int(self._tokens)  # one sync, when the callback logs

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
            if model.training:  # packed (padding-free) batches have no attention_mask and no padding
                mask = inputs.get("attention_mask")
                self._tokens = self._tokens + (
                    mask.sum() if mask is not None else inputs["input_ids"].numel()
                )
            if self.loss_path == "trl":
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.loss_path == "model":
                # Trainer's own compute_loss: model(**inputs, num_items_in_batch=...) -> outputs.loss
                inputs = {**inputs, "use_cache": False}
                return transformers.Trainer.compute_loss(
                    self, model, inputs, return_outputs, num_items_in_batch
                )
            loss = _masked_lm_loss(model, inputs, num_items_in_batch)
            return (loss, {"loss": loss}) if return_outputs else loss

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            # A checkpoint only needs the adapter and optimizer state to resume; the tokenizer
            # (28 MB of tokenizer.json) goes into the final adapter folder once, via write_adapter.
            tokenizer, self.processing_class = self.processing_class, None
            try:
                super()._save(output_dir, state_dict)
            finally:
                self.processing_class = tokenizer

    return ProjectSFTTrainer


def _callback(hooks: Any, get_tokens: Callable[[], int]) -> Any:
    from transformers import TrainerCallback

    class HooksCallback(TrainerCallback):
        """Forwards metrics, checkpoints and cancellation between the HF loop and ``hooks``."""

        def __init__(self) -> None:
            self.last_time = time.monotonic()
            self.last_tokens = 0
            self.stopped = False

        def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.last_time, self.last_tokens = time.monotonic(), get_tokens()
            if hasattr(hooks, "on_start"):
                hooks.on_start(state.max_steps)
            hooks.on_log(f"training for {state.max_steps} steps (starting at step {state.global_step})")

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if hooks.should_stop():
                # Save before stopping so a cancelled / interrupted job resumes from here.
                self.stopped = True
                control.should_save = True
                control.should_training_stop = True
            self._fence(control)

        def _fence(self, control):  # type: ignore[no-untyped-def]
            """Hooks with `may_save` (the worker's child) are asked before every checkpoint; False
            (the job was taken over by another attempt) stops the run without one."""
            may_save = getattr(hooks, "may_save", None)
            if control.should_save and may_save is not None and not may_save():
                self.stopped = True
                control.should_save = False
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
            logs = logs or {}
            if not any(k in logs for k in ("loss", "eval_loss")):
                return
            now, tokens = time.monotonic(), get_tokens()
            metrics = _metrics(state, logs, (tokens - self.last_tokens) / max(now - self.last_time, 1e-9))
            if "loss" in logs:
                self.last_time, self.last_tokens = now, tokens
            hooks.on_step(metrics)
            self._fence(control)  # on_step may just have found the job not ours; the save comes next

        def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            hooks.on_checkpoint(state.global_step, path)
            hooks.on_log(f"checkpoint saved at step {state.global_step}")

    return HooksCallback()


def _metrics(state: Any, logs: dict[str, Any], tokens_per_s: float) -> dict[str, Any]:
    is_train = "loss" in logs
    return {
        "step": int(state.global_step),
        "total_steps": int(state.max_steps),
        "epoch": float(logs.get("epoch", state.epoch or 0.0)),
        "loss": float(logs["loss"]) if is_train else None,
        "learning_rate": float(logs["learning_rate"]) if "learning_rate" in logs else None,
        "grad_norm": float(logs["grad_norm"]) if logs.get("grad_norm") is not None else None,
        "tokens_per_s": round(tokens_per_s, 2) if is_train else None,
        "eval_loss": float(logs["eval_loss"]) if "eval_loss" in logs else None,
    }


def _optim(cfg: TrainConfig) -> str:
    import importlib.util

    has_8bit = cuda_available() and importlib.util.find_spec("bitsandbytes") is not None
    if cfg.optim == "auto":
        return "adamw_8bit" if has_8bit else "adamw_torch"
    if "8bit" in cfg.optim and not has_8bit:
        raise ValueError(
            f"optim {cfg.optim!r} needs a CUDA GPU with bitsandbytes; use 'auto' or 'adamw_torch'"
        )
    return cfg.optim


def _sft_config(cfg: TrainConfig, checkpoints: Path, has_eval: bool) -> Any:
    from trl import SFTConfig

    eval_steps = cfg.eval_steps or cfg.save_steps
    return SFTConfig(
        output_dir=str(checkpoints),
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        num_train_epochs=cfg.num_train_epochs,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=_optim(cfg),
        seed=cfg.seed,
        data_seed=cfg.seed,
        train_sampling_strategy="random" if cfg.shuffle else "sequential",
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None,
        logging_steps=cfg.logging_steps,
        max_length=cfg.max_seq_length,
        packing=cfg.packing,
        completion_only_loss=True,
        # None = the base config's coefficient; TRL sets config.output_router_logits to match (0 -> off)
        router_aux_loss_coef=None if cfg.moe_aux_loss else 0.0,
        bf16=cuda_available(),
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=not cuda_available(),
        gradient_checkpointing=False,  # applied by apply_lora per backend
    )


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def _is_complete_checkpoint(folder: Path) -> bool:
    """The HF Trainer writes trainer_state.json after the weights and optimizer state, so a folder
    without it (or without adapter weights) was cut off mid-save and cannot be resumed from."""
    has_weights = any((folder / name).is_file() for name in ADAPTER_WEIGHTS)
    return has_weights and (folder / "trainer_state.json").is_file()


def latest_checkpoint(work_dir: Path) -> Path | None:
    """The newest complete ``checkpoint-N`` folder in ``work_dir/checkpoints``; half-written ones
    (a crash during a save) are skipped."""
    folder = Path(work_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    steps = {
        int(p.name.removeprefix("checkpoint-")): p
        for p in folder.iterdir()
        if p.is_dir() and p.name.removeprefix("checkpoint-").isdigit() and p.name.startswith("checkpoint-")
    }
    complete = [step for step in steps if _is_complete_checkpoint(steps[step])]
    return steps[max(complete)] if complete else None


def _drop_incomplete_checkpoints(work_dir: Path, hooks: Any) -> None:
    """Remove half-written checkpoint folders, so the Trainer never saves into or rotates onto one."""
    folder = Path(work_dir) / "checkpoints"
    for path in sorted(folder.glob("checkpoint-*")) if folder.is_dir() else []:
        if path.is_dir() and not _is_complete_checkpoint(path):
            hooks.on_log(f"removing incomplete {path.name} (cut off mid-save)")
            shutil.rmtree(path, ignore_errors=True)


def applied_targets(model: Any) -> tuple[list[str], list[str]]:
    """The LoRA targets PEFT actually applied (its saved adapter config), which on the unsloth backend
    differ from the requested ones: Unsloth maps gate/up/down_proj onto the fused expert parameters."""
    config = model.peft_config["default"]
    modules = config.target_modules or []
    modules = [modules] if isinstance(modules, str) else sorted(modules)
    return modules, list(config.target_parameters or [])


# --- output ----------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers
    import trl

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
    }


def _manifest(
    cfg: TrainConfig, loaded: Any, model: Any, data: PreparedData, result_metrics: dict[str, Any]
) -> dict:
    target_modules, target_parameters = applied_targets(model)
    return {
        "format": "gptoss-tuner-adapter/1",
        "base_model": loaded.model_id,
        "base_fingerprint": loaded.fingerprint,
        "backend": loaded.backend,
        "target_modules": target_modules,
        "target_parameters": target_parameters,
        "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout},
        "hyperparameters": cfg.model_dump(),
        "dataset": {"source": cfg.dataset, "fingerprint": data.fingerprint, "rows": data.n_train_rows},
        "metrics": result_metrics,
        "versions": _versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_adapter(model: Any, tokenizer: Any, manifest: dict, output_dir: Path) -> Path:
    """The PEFT weights, the tokenizer and the manifest, as one folder renamed into place at
    ``output_dir`` (an existing one, from re-running the CLI, is replaced)."""

    def save(folder: Path) -> None:
        model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))

    return adapter_folder.write_adapter(Path(output_dir), save, manifest)


def _final_metrics(trainer: Any) -> dict[str, Any]:
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    return {
        "global_step": trainer.state.global_step,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "eval_loss": evals[-1] if evals else None,
        "tokens": getattr(trainer, "tokens_seen", 0),
    }


def check_packing(cfg: TrainConfig, backend: str) -> None:
    """Packing is only allowed where samples packed into one sequence cannot attend to each other:
    on the hf backend ``keep_packed_samples_apart`` builds block-diagonal masks for GPT-OSS's eager
    attention. Unsloth swaps in its own GPT-OSS attention, whose handling of packed batches this
    project has not verified, so it is refused there rather than silently cross-contaminating."""
    if cfg.packing and backend != "hf":
        raise ValueError(
            f"packing=true is not supported on the {backend} backend (its attention cannot be shown to keep "
            "packed samples apart); set packing to false or backend to 'hf'"
        )


def check_targets(cfg: TrainConfig, model: Any, backend: str) -> None:
    """Each of target_modules must name a module of the base: PEFT only refuses a list that matches
    nothing at all, so a misspelt name beside good ones (or beside target_parameters) would train
    without it and the job would succeed with less LoRA than asked."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if backend == "unsloth":  # Unsloth maps these onto the fused expert parameters itself
        names |= set(UNSLOTH_EXPERT_MODULES)
    missing = [target for target in cfg.target_modules if target not in names]
    if missing:
        linear = sorted(n for n in names if n.endswith("_proj"))
        raise ValueError(
            f"target_modules: {', '.join(repr(m) for m in missing)} matches no module of "
            f"{cfg.resolved_base_model()}; its projection modules are {', '.join(linear) or 'none'}"
        )


def lora_model(cfg: TrainConfig, loaded: Any) -> Any:
    """The loaded base wrapped in the job's trainable LoRA (``apply_lora`` with the config's fields)."""
    return apply_lora(
        loaded,
        r=cfg.lora_r,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        target_parameters=cfg.target_parameters,
        seed=cfg.seed,
        gradient_checkpointing=cfg.gradient_checkpointing,
        offload_checkpoints=cfg.offload_checkpoints,
    )


def build_trainer(cfg: TrainConfig, model: Any, loaded: Any, data: PreparedData, work_dir: Path) -> Any:
    """The project's SFTTrainer for a LoRA model, with its loss path (and, on the ``model`` path,
    the collator that drops all-ones attention masks)."""
    from datasets import Dataset

    trainer = _trainer_class()(
        model=model,
        args=_sft_config(cfg, Path(work_dir) / "checkpoints", data.eval is not None),
        train_dataset=Dataset.from_list(data.train),
        eval_dataset=Dataset.from_list(data.eval) if data.eval else None,
        processing_class=loaded.tokenizer,
    )
    trainer.loss_path = loss_path(loaded.backend, cuda_available())
    if trainer.loss_path == "model":
        trainer.data_collator = drop_full_attention_mask(trainer.data_collator)
    return trainer


def train(
    cfg: TrainConfig,
    *,
    work_dir: Path,
    output_dir: Path,
    hooks: Any = None,
    models_dir: Path,
    data_dir: Path | None = None,
) -> TrainResult:
    """Run one training job; resumes from the newest complete checkpoint in ``work_dir/checkpoints``.
    A relative dataset path is looked up in ``data_dir`` first, then the current directory."""
    backend = pick_backend(cfg.backend)
    if backend == "unsloth":
        # Before the tokenizer (prepare_data) imports transformers: Unsloth patches it, and TRL, only
        # when imported first; imported later, it warns and trains slower.
        import_unsloth_first()
    hooks = hooks or NullHooks()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    check_packing(cfg, backend)
    ensure_harmony_assets(models_dir)
    data = prepare_data(cfg, data_dir)
    hooks.on_log(f"dataset {cfg.dataset}: {len(data.train)} train rows, {len(data.eval or [])} eval rows")
    loaded = load_base(
        cfg.resolved_base_model(),
        backend=cfg.backend,
        load_in_4bit=cfg.load_in_4bit,
        max_seq_length=cfg.max_seq_length,
        models_dir=models_dir,
        for_training=True,
        checkpointing=unsloth_checkpointing(cfg.gradient_checkpointing, cfg.offload_checkpoints),
    )
    hooks.on_log(f"base {loaded.model_id} loaded with backend {loaded.backend}")
    check_targets(cfg, loaded.model, loaded.backend)
    model = lora_model(cfg, loaded)
    if cfg.packing:
        keep_packed_samples_apart(model)
    trainer = build_trainer(cfg, model, loaded, data, work_dir)
    hooks.on_log(f"loss computed on the {trainer.loss_path!r} path")
    callback = _callback(hooks, lambda: trainer.tokens_seen)
    trainer.add_callback(callback)
    _drop_incomplete_checkpoints(work_dir, hooks)
    resume = latest_checkpoint(work_dir)
    if resume:
        hooks.on_log(f"resuming from {resume.name}")
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    metrics = _final_metrics(trainer)
    result = TrainResult(
        None, callback.stopped, trainer.state.global_step, trainer.state.max_steps, loaded.backend
    )
    result.metrics = metrics
    if callback.stopped:
        hooks.on_log(f"stopped at step {result.global_step}; checkpoint kept for resume")
        return result
    may_save = getattr(hooks, "may_save", None)
    if may_save is not None and not may_save():  # taken over after the last step: the adapter is theirs
        hooks.on_log(
            f"not writing the adapter: this attempt no longer owns the job (step {result.global_step})"
        )
        result.stopped = True
        return result
    result.manifest = _manifest(cfg, loaded, model, data, metrics)
    result.adapter_dir = write_adapter(model, loaded.tokenizer, result.manifest, output_dir)
    hooks.on_log(f"adapter written to {result.adapter_dir}")
    return result
