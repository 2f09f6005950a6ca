"""The training options: `Hyperparameters` (what a client may set when it submits a job) and
`TrainConfig` (those plus what the server or the job owns: the base model, the dataset, the backend,
the data limits, the seed). One place for every option, its type, default, limits and help text;
JobCreate.hyperparameters is `Hyperparameters`, so /openapi.json documents each one, and the job row
stores `TrainConfig.model_dump()`. Imported by the API, so it needs nothing heavy (no torch here).
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.config import GPU_DEFAULT_MODEL_ID, TINY_MODEL_ID
from app.ml.harmony import ReasoningEffort
from app.ml.modeling import ATTENTION_TARGETS, EXPERT_TARGETS, cuda_available

# Schedules that need nothing beyond warmup_steps (reduce_lr_on_plateau, cosine_with_min_lr and
# warmup_stable_decay need extra arguments this config does not carry).
SchedulerName = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
]
# The 8-bit optimizers need bitsandbytes on CUDA; _optim refuses them elsewhere.
OptimName = Literal[
    "auto", "adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adamw_8bit", "paged_adamw_8bit"
]


class Hyperparameters(BaseModel):
    """The training options a client may set (JobCreate.hyperparameters), each with its limits and help."""

    # Strict: JSON `true` is not the step count 1, nor "8" the rank 8 (ints are still taken for floats).
    # No NaN or infinity: a learning rate of NaN is "not a finite number", not "not greater than 0".
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    eval_dataset: str | None = Field(
        None,
        max_length=512,
        description="held-out data, same forms as dataset (the service: an uploaded file id, "
        "sample:<name> or hf:<dataset id>)",
    )
    eval_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="share of dataset held out when no eval_dataset"
    )
    max_seq_length: int = Field(
        1024,
        ge=16,
        le=131072,
        description="longest tokenised row (gpt-oss context: 131072); longer rows are errors",
    )
    train_on_reasoning: bool = Field(True, description="also put loss on the analysis (reasoning) channel")
    reasoning_effort: ReasoningEffort = Field(
        "medium", description="'Reasoning:' level rendered for rows that do not set their own"
    )
    lora_r: int = Field(8, ge=1, le=256, description="LoRA rank")
    lora_alpha: int = Field(16, ge=1, le=1024, description="LoRA alpha (scale = alpha / r)")
    lora_dropout: float = Field(
        0.0, ge=0.0, le=0.5, description="dropout on the LoRA input; PEFT's expert LoRA needs 0"
    )
    target_modules: list[str] = Field(
        list(ATTENTION_TARGETS),  # a plain default (pydantic copies it per instance) shows in the schema
        max_length=16,
        description="nn.Linear modules that get LoRA",
    )
    target_parameters: list[str] = Field(
        list(EXPERT_TARGETS),
        max_length=16,
        description="3-D MoE expert parameters that get LoRA",
    )
    packing: bool = Field(
        False,
        description="pack rows into max_seq_length sequences (TRL bfd); samples are kept apart by "
        "block-diagonal masks on the hf backend, refused on unsloth",
    )
    max_steps: int = Field(30, ge=0, le=100_000, description="optimizer steps; 0 = use num_train_epochs")
    num_train_epochs: float = Field(1.0, gt=0, le=100, description="epochs when max_steps is 0")
    per_device_train_batch_size: int = Field(1, ge=1, le=256, description="rows per micro-batch")
    gradient_accumulation_steps: int = Field(4, ge=1, le=1024, description="micro-batches per optimizer step")
    learning_rate: float = Field(2e-4, gt=0, le=0.01, description="peak learning rate (LoRA: 1e-5 to 1e-3)")
    lr_scheduler_type: SchedulerName = Field("linear", description="transformers learning-rate schedule")
    warmup_steps: int = Field(5, ge=0, le=100_000, description="linear warm-up steps")
    weight_decay: float = Field(0.01, ge=0.0, le=1.0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, le=1000.0, description="gradient clipping")
    optim: OptimName = Field(
        "auto", description="'auto' = adamw_8bit on CUDA with bitsandbytes, else adamw_torch"
    )
    gradient_checkpointing: bool = Field(True, description="trade compute for memory (CUDA only)")
    moe_aux_loss: bool = Field(
        False,
        description="add the MoE load-balancing loss at the base config's router_aux_loss_coef; off: LoRA "
        "leaves the routers frozen, and on gpt-oss the loss costs a GPU sync per layer",
    )
    offload_checkpoints: bool = Field(
        True,
        description="unsloth backend: checkpointed activations wait in CPU RAM (Unsloth's 'unsloth' "
        "mode, least GPU memory); false keeps them on the GPU (less host work per step)",
    )
    shuffle: bool = Field(True, description="shuffle rows every epoch (seeded); false = file order")
    save_steps: int = Field(10, ge=1, le=100_000, description="checkpoint every N steps")
    save_total_limit: int = Field(2, ge=1, le=100, description="checkpoints kept")
    eval_steps: int | None = Field(
        None, ge=1, le=100_000, description="evaluate every N steps (default: save_steps)"
    )
    logging_steps: int = Field(1, ge=1, le=100_000, description="report metrics every N steps")

    @field_validator("target_modules", "target_parameters")
    @classmethod
    def _no_blank_targets(cls, value: list[str]) -> list[str]:
        if any(not t.strip() for t in value):
            raise ValueError("targets must be non-empty names")
        return value

    @model_validator(mode="after")
    def _dropout_fits_expert_lora(self) -> Self:
        # PEFT's LoRA on 3-D parameters (ParamWrapper) cannot apply dropout and raises mid-setup.
        if self.lora_dropout and self.target_parameters:
            raise ValueError(
                "lora_dropout must be 0 when target_parameters is set (PEFT expert LoRA has no dropout)"
            )
        return self


class TrainConfig(Hyperparameters):
    """Every training option: the hyperparameters plus the fields the server or the job request sets."""

    # Lax again: the command line reads YAML, where `learning_rate: 2e-4` arrives as a string.
    model_config = ConfigDict(extra="forbid", strict=False, allow_inf_nan=False)

    base_model: str = Field(
        "auto", description=f"'auto' = {GPU_DEFAULT_MODEL_ID} on CUDA else '{TINY_MODEL_ID}'"
    )
    backend: Literal["auto", "unsloth", "hf"] = Field("auto", description="unsloth on CUDA+Unsloth, else hf")
    load_in_4bit: bool = Field(True, description="4-bit base weights on CUDA (ignored on CPU)")
    dataset: str = Field(
        "sample:capitals",
        description="sample:<name>, a JSONL path, or hf:<dataset id> (a job stores a reference, which "
        "app.datasets resolves to one of these when the data is read)",
    )
    max_rows: int = Field(100_000, ge=1, le=10_000_000, description="most rows a dataset may have")
    max_bytes: int = Field(
        100 * 1024 * 1024, ge=1, le=10 * 1024**3, description="largest dataset file, bytes"
    )
    seed: int = Field(3407, ge=0, le=2**32 - 1, description="seed for LoRA init, data order and dropout")

    def resolved_base_model(self) -> str:
        if self.base_model != "auto":
            return self.base_model
        return GPU_DEFAULT_MODEL_ID if cuda_available() else TINY_MODEL_ID
