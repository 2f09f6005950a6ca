"""The tiny default model, backend choice and the architecture fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from app.ml.modeling import (
    config_fingerprint,
    cuda_available,
    ensure_tiny_model,
    full_config,
    pick_backend,
    resolve_model_path,
    tiny_config,
)


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
