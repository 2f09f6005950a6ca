"""Base models: path resolution, backend choice, loading (model and tokenizer) and LoRA application.
The tiny default model is built by app.ml.tiny_model.

Two backends behind ``load_base`` / ``apply_lora``:

- ``unsloth``: Unsloth's FastLanguageModel (4-bit, ``use_gradient_checkpointing="unsloth"``), used
  where CUDA and the ``unsloth`` package are present. Unsloth must be imported before transformers
  to patch it; ``import_unsloth_first()`` is called by the entry points that may use it.
- ``hf``: transformers + PEFT; bitsandbytes 4-bit on CUDA when asked and installed, fp32 on CPU.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from app.config import TINY_MODEL_ID
from app.ml.tiny_model import ensure_tiny_model
from app.ml.tokenizer import HARMONY_DIRNAME, ensure_harmony_assets, has_tokenizer, load_fast

Backend = Literal["unsloth", "hf"]
# Attention projections are nn.Linear; the MoE experts are 3-D parameters PEFT reaches through
# `target_parameters` (naming them in target_modules fails).
ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# Unsloth turns these MoE projection names into LoRA on the fused expert parameters itself
# ("Enabling LoRA on MoE parameters: ['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']").
UNSLOTH_EXPERT_MODULES = ["gate_proj", "up_proj", "down_proj"]
_FINGERPRINT_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_local_experts",
    "num_experts_per_tok",
    "sliding_window",
    "layer_types",
    "tiny_version",
)


@dataclass
class LoadedBase:
    model: Any
    tokenizer: Any
    backend: Backend
    model_id: str
    fingerprint: str


def resolve_model_path(model_id: str, models_dir: Path) -> str:
    """``tiny-gpt-oss`` -> its generated folder (built on first use); anything else unchanged."""
    if model_id == TINY_MODEL_ID:
        return str(ensure_tiny_model(models_dir))
    return model_id


def config_fingerprint(config: Any) -> str:
    """sha256 over the architecture fields; an adapter only fits a base with the same fingerprint."""
    data = config if isinstance(config, dict) else config.to_dict()
    picked = {k: data.get(k) for k in _FINGERPRINT_FIELDS}
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()


def base_fingerprint(model_id: str, models_dir: Path) -> str:
    """The fingerprint of a base model from its config alone (for an engine that loads no weights
    here); the same as `config_fingerprint(model.config)` of the loaded model."""
    from transformers import AutoConfig

    return config_fingerprint(AutoConfig.from_pretrained(resolve_model_path(model_id, models_dir)))


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def unsloth_installed() -> bool:
    return importlib.util.find_spec("unsloth") is not None


def pick_backend(requested: str) -> Backend:
    """'auto' -> unsloth where CUDA and Unsloth are present, else hf. Asking for unsloth where it
    cannot run is an error, not a silent fallback."""
    if requested == "hf":
        return "hf"
    usable = cuda_available() and unsloth_installed()
    if requested == "unsloth":
        if not usable:
            raise RuntimeError("backend 'unsloth' needs a CUDA GPU and the unsloth package; use backend 'hf'")
        return "unsloth"
    if requested != "auto":
        raise ValueError(f"backend must be one of auto, unsloth, hf; got {requested!r}")
    return "unsloth" if usable else "hf"


def import_unsloth_first() -> None:
    """Import unsloth before transformers where it will be used, so its patches apply."""
    if cuda_available() and unsloth_installed():
        import unsloth  # noqa: F401


def unsloth_checkpointing(enabled: bool, offload: bool) -> bool | str:
    """Unsloth's ``use_gradient_checkpointing``: "unsloth" keeps the checkpointed activations in CPU
    RAM between forward and backward (least GPU memory, more host work per layer), True keeps them
    on the GPU (standard checkpointing), False checkpoints nothing."""
    if not enabled:
        return False
    return "unsloth" if offload else True


def _load_unsloth(
    path: str, *, load_in_4bit: bool, max_seq_length: int, checkpointing: bool | str = "unsloth"
) -> tuple[Any, Any]:
    from unsloth import FastLanguageModel

    # dtype=None lets Unsloth pick bf16/fp16 for the GPU. The checkpointing mode is set at load too:
    # from_pretrained installs (or removes) Unsloth's offloading checkpoint function.
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=path,
        max_seq_length=max_seq_length,
        load_in_4bit=load_in_4bit,
        dtype=None,
        use_gradient_checkpointing=checkpointing,
    )
    return model, tokenizer


def hf_load_kwargs(path: str, *, load_in_4bit: bool, dtype: Any = None) -> dict[str, Any]:
    """from_pretrained arguments: eager attention (sinks), fp32 on CPU / bf16 on CUDA unless ``dtype``
    is given, nf4 on CUDA when asked, and MXFP4 checkpoints (openai/gpt-oss-*) dequantized."""
    import torch

    if not cuda_available():
        kwargs: dict[str, Any] = {"dtype": dtype or torch.float32, "attn_implementation": "eager"}
    else:
        kwargs = {"dtype": dtype or torch.bfloat16, "device_map": "auto", "attn_implementation": "eager"}
    if cuda_available() and load_in_4bit and importlib.util.find_spec("bitsandbytes") is not None:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    if _is_mxfp4(path):
        from transformers.utils.quantization_config import Mxfp4Config

        # openai/gpt-oss-* ship MXFP4 experts; LoRA (training or merging) needs them as plain
        # 16-bit tensors, so they are dequantized into kwargs["dtype"] on load.
        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    return kwargs


def _is_mxfp4(path: str) -> bool:
    from transformers import AutoConfig

    quant = getattr(AutoConfig.from_pretrained(path), "quantization_config", None)
    return isinstance(quant, dict) and quant.get("quant_method") == "mxfp4"


def load_hf_model(path: str, *, load_in_4bit: bool, dtype: Any = None) -> Any:
    """A transformers GptOssForCausalLM, loaded as ``hf_load_kwargs`` says (used by training and export)."""
    from transformers import AutoModelForCausalLM

    kwargs = hf_load_kwargs(path, load_in_4bit=load_in_4bit, dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if "quantization_config" in kwargs and getattr(kwargs["quantization_config"], "dequantize", False):
        _forget_mxfp4_conversions(model)
        # Dequantized experts come out in bf16 whatever dtype was asked for; match the rest.
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != kwargs["dtype"]:
                param.data = param.data.to(kwargs["dtype"])
    return model


def _forget_mxfp4_conversions(model: Any) -> None:
    """transformers 5.17 remembers the load-time blocks+scales -> weight conversion and reverses it
    on save_pretrained; there is no reverse for a dequantized weight, so the experts were silently
    left out of a saved (exported) model. The experts are plain tensors now: save them as such."""
    conversions = getattr(model, "_weight_conversions", None) or []
    model._weight_conversions = [
        c
        for c in conversions
        if not any(str(p).endswith(("_blocks", "_scales")) for p in getattr(c, "source_patterns", []))
    ]


def load_base(
    model_id: str,
    *,
    backend: str = "auto",
    load_in_4bit: bool = True,
    max_seq_length: int = 2048,
    models_dir: Path,
    for_training: bool,
    checkpointing: bool | str = "unsloth",
) -> LoadedBase:
    """Load a base model and its tokenizer on the chosen backend (``checkpointing``: Unsloth's
    gradient-checkpointing mode, see ``unsloth_checkpointing``; the unsloth backend only)."""
    chosen = pick_backend(backend)
    path = resolve_model_path(model_id, models_dir)
    if chosen == "unsloth":
        model, _ = _load_unsloth(
            path, load_in_4bit=load_in_4bit, max_seq_length=max_seq_length, checkpointing=checkpointing
        )
    else:
        model = load_hf_model(path, load_in_4bit=load_in_4bit)
    if not for_training:
        model.eval()
    tokenizer = load_tokenizer(model_id, models_dir)
    return LoadedBase(model, tokenizer, chosen, model_id, config_fingerprint(model.config))


def apply_lora(
    loaded: LoadedBase,
    *,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: list[str],
    target_parameters: list[str],
    seed: int,
    gradient_checkpointing: bool,
    offload_checkpoints: bool = True,
) -> Any:
    """Wrap the base in a trainable LoRA PeftModel on its backend (``offload_checkpoints``: the
    unsloth backend's checkpointing mode, see ``unsloth_checkpointing``)."""
    if loaded.backend == "unsloth":
        from unsloth import FastLanguageModel

        modules = list(target_modules) + (UNSLOTH_EXPERT_MODULES if target_parameters else [])
        return FastLanguageModel.get_peft_model(
            loaded.model,
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=modules,
            bias="none",
            use_gradient_checkpointing=unsloth_checkpointing(gradient_checkpointing, offload_checkpoints),
            random_state=seed,
        )
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules) or None,
        target_parameters=list(target_parameters) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    if gradient_checkpointing and cuda_available():
        loaded.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loaded.model.enable_input_require_grads()
    import torch

    # LoRA A matrices are drawn from the global RNG: seed it so a seed gives the same adapter init
    # whatever ran before in this process (Unsloth's random_state does the same on its backend).
    torch.manual_seed(seed)
    return get_peft_model(loaded.model, config)


def tokenizer_folder(models_dir: Path) -> Path:
    return Path(models_dir) / HARMONY_DIRNAME


def _packed_masks_hook(
    module: Any, args: tuple, kwargs: dict[str, Any]
) -> tuple[tuple, dict[str, Any]] | None:
    """Forward pre-hook on GptOssModel: a padding-free (packed) batch arrives with position_ids that
    restart at 0 for every sample and no attention_mask. GptOssModel does not pass position_ids to
    its mask builders, so eager attention would let each sample see the ones packed before it; here
    the masks are built from position_ids (block-diagonal causal, and sliding-window for the
    sliding layers) and handed in precomputed, which GptOssModel accepts as a dict."""
    import torch
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    position_ids = kwargs.get("position_ids")
    if position_ids is None or kwargs.get("attention_mask") is not None:
        return None
    if kwargs.get("past_key_values") is not None:  # decoding with a cache is never packed
        return None
    ids = kwargs.get("input_ids")
    batch = ids.shape[0] if ids is not None else kwargs["inputs_embeds"].shape[0]
    # The mask builders read only the shape, dtype and device of inputs_embeds.
    weight = module.embed_tokens.weight
    shape_only = torch.empty(
        (batch, position_ids.shape[-1], 0), dtype=weight.dtype, device=position_ids.device
    )
    mask_kwargs = {
        "config": module.config,
        "inputs_embeds": shape_only,
        "attention_mask": None,
        "past_key_values": None,
        "position_ids": position_ids,
    }
    kwargs["attention_mask"] = {
        "full_attention": create_causal_mask(**mask_kwargs),
        "sliding_attention": create_sliding_window_causal_mask(**mask_kwargs),
    }
    return args, kwargs


def keep_packed_samples_apart(model: Any) -> Any:
    """Make a transformers GPT-OSS model honour packed batches (see ``_packed_masks_hook``); returns
    the hook handle. Unpacked batches are untouched: the masks built then are the usual causal ones."""
    inner = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    return inner.register_forward_pre_hook(_packed_masks_hook, with_kwargs=True)


def load_tokenizer(model_path_or_id: str, models_dir: Path) -> Any:
    """The model's own tokenizer when the folder (or reachable hub id) has one, else the offline one
    (app.ml.tokenizer). Here rather than there because "tiny-gpt-oss" resolves to a model folder.

    Returned objects are cached per folder and shared: treat them as read-only.
    """
    path = Path(resolve_model_path(model_path_or_id, models_dir))
    if path.is_dir():
        if has_tokenizer(path):
            return load_fast(str(path.resolve()))
        return load_fast(str(ensure_harmony_assets(models_dir).resolve()))
    try:  # a hub id: only a connected host (or a warm HF cache) has its tokenizer
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_path_or_id)
    except Exception:
        return load_fast(str(ensure_harmony_assets(models_dir).resolve()))
