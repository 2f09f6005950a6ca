"""The tiny default model, backend choice and the architecture fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from app.ml.modeling import (
    config_fingerprint,
    cuda_available,
    hf_load_kwargs,
    keep_packed_samples_apart,
    load_hf_model,
    pick_backend,
    resolve_model_path,
)
from app.ml.tiny_model import ensure_tiny_model, full_config, tiny_config
from app.ml.trainer import TrainConfig, check_packing


def test_tiny_model_has_the_gpt_oss_features(models_dir: Path) -> None:
    folder = Path(resolve_model_path("tiny-gpt-oss", models_dir))
    assert folder == ensure_tiny_model(models_dir)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gpt_oss" and config["vocab_size"] == 201_088
    assert config["layer_types"] == ["sliding_attention", "full_attention"]
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.sinks" in keys  # attention sinks
    assert "model.layers.1.mlp.experts.gate_up_proj" in keys  # 3-D expert parameters
    assert (folder / "tokenizer.json").is_file()  # the model folder brings its own tokenizer


def test_other_ids_pass_through(tmp_path: Path) -> None:
    assert resolve_model_path("unsloth/gpt-oss-20b", tmp_path) == "unsloth/gpt-oss-20b"
    assert resolve_model_path(str(tmp_path), tmp_path) == str(tmp_path)


def test_fingerprint_tracks_architecture_only() -> None:
    tiny, full = tiny_config(), full_config()
    assert config_fingerprint(tiny) == config_fingerprint(tiny_config())
    assert config_fingerprint(tiny) != config_fingerprint(full)
    tiny.rope_theta = 1.0  # not an architecture field: same fingerprint
    assert config_fingerprint(tiny) == config_fingerprint(tiny_config())
    assert config_fingerprint(tiny.to_dict()) == config_fingerprint(tiny)


@pytest.mark.skipif(cuda_available(), reason="checks the CPU-host choice")
def test_backend_choice_without_cuda() -> None:
    assert pick_backend("auto") == "hf" and pick_backend("hf") == "hf"
    with pytest.raises(RuntimeError, match="backend 'unsloth' needs a CUDA GPU and the unsloth package"):
        pick_backend("unsloth")
    with pytest.raises(ValueError, match="backend must be one of auto, unsloth, hf"):
        pick_backend("vllm")


def test_packed_rows_do_not_see_each_other(models_dir: Path) -> None:
    """Two rows packed into one sequence (position_ids restart at 0, no attention mask, as TRL's
    padding-free collator sends them) give each row exactly the logits it gets alone. Without the
    hook GPT-OSS's eager attention lets the second row attend to the first."""
    model = load_hf_model(str(ensure_tiny_model(models_dir)), load_in_4bit=False).eval()
    first, second = torch.arange(100, 140).unsqueeze(0), torch.arange(500, 530).unsqueeze(0)
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(40), torch.arange(30)]).unsqueeze(0)  # > sliding window 32
    with torch.inference_mode():
        alone = torch.cat([model(input_ids=first).logits, model(input_ids=second).logits], dim=1)
        mixed = model(input_ids=packed, position_ids=positions, use_cache=False).logits
        handle = keep_packed_samples_apart(model)
        apart = model(input_ids=packed, position_ids=positions, use_cache=False).logits
        unpacked = model(input_ids=first, position_ids=torch.arange(40).unsqueeze(0), use_cache=False).logits
    handle.remove()
    assert not torch.allclose(mixed[:, 40:], alone[:, 40:], atol=1e-2)  # the contamination the hook stops
    assert torch.allclose(apart, alone, atol=1e-4)
    assert torch.allclose(unpacked, alone[:, :40], atol=1e-4)  # unpacked batches are unchanged


def test_packing_is_refused_where_rows_could_mix() -> None:
    check_packing(TrainConfig(packing=True), "hf")  # the hf backend keeps packed rows apart
    with pytest.raises(ValueError, match="packing=true is not supported on the unsloth backend"):
        check_packing(TrainConfig(packing=True), "unsloth")
    check_packing(TrainConfig(packing=False), "unsloth")


def test_mxfp4_checkpoints_load_dequantized_in_the_asked_dtype(models_dir: Path, tmp_path: Path) -> None:
    """openai/gpt-oss-* declare MXFP4 in config.json; training and export both load them as plain
    16-bit experts (on CUDA transformers would otherwise keep the MXFP4 kernels, which LoRA cannot
    merge into)."""
    config = json.loads((ensure_tiny_model(models_dir) / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    kwargs = hf_load_kwargs(str(tmp_path), load_in_4bit=True, dtype=torch.bfloat16)
    assert kwargs["quantization_config"].dequantize is True and kwargs["dtype"] == torch.bfloat16
    plain = hf_load_kwargs(str(ensure_tiny_model(models_dir)), load_in_4bit=False)
    assert "quantization_config" not in plain and plain["attn_implementation"] == "eager"


def test_unsloth_checkpointing_modes() -> None:
    """TrainConfig's gradient_checkpointing + offload_checkpoints -> Unsloth's use_gradient_checkpointing."""
    from app.ml.modeling import unsloth_checkpointing

    assert unsloth_checkpointing(True, offload=True) == "unsloth"  # activations wait in CPU RAM
    assert unsloth_checkpointing(True, offload=False) is True  # standard checkpointing, on the GPU
    assert unsloth_checkpointing(False, offload=True) is False
