"""The tiny default model (``tiny-gpt-oss``) and the random-weight factory it shares with the
full-size benchmark model (scripts/make_tiny_model.py, scripts/make_full_model.py, bench/)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from app.config import TINY_MODEL_ID
from app.ml.tokenizer import VOCAB_SIZE, atomic_build, ensure_harmony_assets

TINY_SEED = 1234
# Bumped whenever the tiny model's weights change; part of its config, hence of its fingerprint, so an
# adapter trained on an older tiny model is refused rather than silently misapplied.
TINY_VERSION = 2
# A random LM head at the usual std (0.02) caps every logit near 1 (the final RMSNorm fixes the hidden
# norm at sqrt(64)), so no LoRA on attention/experts could make any token likely. A wider head lets
# the tiny model learn visibly; std 0.3 allows logit margins of about 20.
TINY_LM_HEAD_STD = 0.3


def tiny_config() -> Any:
    """2 layers (sliding, full), sinks, 4 experts top-2, hidden 64 and the real 201,088 vocabulary."""
    from transformers import GptOssConfig

    config = GptOssConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=64,
        head_dim=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=32,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=199998,
        eos_token_id=200002,
        pad_token_id=199999,
    )
    config.tiny_version = TINY_VERSION  # saved in config.json (extra config fields are kept)
    return config


def full_config() -> Any:
    """The exact gpt-oss-20b architecture (20.9 B parameters), for GPU benchmarks with random weights."""
    from transformers import GptOssConfig

    return GptOssConfig(
        num_hidden_layers=24,
        num_local_experts=32,
        num_experts_per_tok=4,
        vocab_size=VOCAB_SIZE,
        hidden_size=2880,
        intermediate_size=2880,
        head_dim=64,
        num_attention_heads=64,
        num_key_value_heads=8,
        sliding_window=128,
        layer_types=["sliding_attention", "full_attention"] * 12,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        bos_token_id=199998,
        eos_token_id=200002,
        pad_token_id=199999,
    )


def _copy_tokenizer(models_dir: Path, folder: Path) -> None:
    src = ensure_harmony_assets(models_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(src / name, folder / name)


def save_random_model(
    config: Any,
    folder: Path,
    models_dir: Path,
    *,
    seed: int,
    dtype: Any,
    device: str,
    lm_head_std: float | None = None,
) -> None:
    """Build a randomly initialised GptOssForCausalLM (deterministic for a seed) and save it with the
    offline tokenizer and a generation config that stops on harmony's stop tokens."""
    import torch
    from transformers import GenerationConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    # Built directly in the target dtype on the target device: the full 20.9 B model would not fit
    # in fp32 first.
    with torch.device(device):
        model = GptOssForCausalLM._from_config(config, dtype=dtype)
        if lm_head_std is not None:
            model.lm_head.weight.data.normal_(0.0, lm_head_std)
    model.generation_config = GenerationConfig(
        eos_token_id=[200002, 200012], pad_token_id=199999, bos_token_id=199998
    )
    model.save_pretrained(folder)
    _copy_tokenizer(models_dir, folder)


def _tiny_version(folder: Path) -> int | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("tiny_version")
    except (OSError, ValueError):
        return None


def ensure_tiny_model(models_dir: Path) -> Path:
    """The tiny default model in ``<models_dir>/tiny-gpt-oss`` (built once, atomically; rebuilt when
    an older TINY_VERSION is found)."""
    import torch

    folder = Path(models_dir) / TINY_MODEL_ID
    if _tiny_version(folder) == TINY_VERSION:
        return folder
    ensure_harmony_assets(models_dir)
    if folder.exists():  # an older version: move it aside (open files stay valid) and rebuild
        stale = folder.parent / f".{folder.name}.stale-{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(OSError):
            os.rename(folder, stale)
        shutil.rmtree(stale, ignore_errors=True)
    return atomic_build(
        folder,
        lambda tmp: save_random_model(
            tiny_config(),
            tmp,
            models_dir,
            seed=TINY_SEED,
            dtype=torch.float32,
            device="cpu",
            lm_head_std=TINY_LM_HEAD_STD,
        ),
    )
