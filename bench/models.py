"""Random-weight GPT-OSS models for the GPU runs: a small one for tests, the full 20B for benchmarks.

No weights can be downloaded on the GPU machine; a randomly initialised model with the real
architecture costs exactly what the real one costs, so speed and memory measured on it are real.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from app.ml.tiny_model import full_config, save_random_model
from app.ml.tokenizer import VOCAB_SIZE, atomic_build, ensure_harmony_assets

MINI_NAME = "gpt-oss-mini-random"
FULL_NAME = "gpt-oss-20b-random"


def mini_config() -> Any:
    """4 layers (sliding, full, ...), sinks, 8 experts top-4, hidden 1024, the real vocabulary.

    Big enough that the 4-bit and Unsloth kernels take their real code paths (dimensions are
    multiples of the 64-wide quantisation blocks), small enough to build and load in seconds.
    """
    from transformers import GptOssConfig

    return GptOssConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=1024,
        intermediate_size=1024,
        head_dim=64,
        num_attention_heads=16,
        num_key_value_heads=4,
        num_hidden_layers=4,
        layer_types=["sliding_attention", "full_attention"] * 2,
        sliding_window=128,
        num_local_experts=8,
        num_experts_per_tok=4,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        bos_token_id=199998,
        eos_token_id=200002,
        pad_token_id=199999,
    )


def ensure_random_model(models_dir: Path, *, full: bool, seed: int = 0) -> Path:
    """`<models_dir>/<name>` built once (atomically) on the GPU in bf16; returns the folder."""
    import torch

    folder = Path(models_dir) / (FULL_NAME if full else MINI_NAME)
    if (folder / "config.json").is_file():
        return folder
    ensure_harmony_assets(models_dir)
    config = full_config() if full else mini_config()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    atomic_build(
        folder,
        lambda tmp: save_random_model(
            config, tmp, models_dir, seed=seed, dtype=torch.bfloat16, device=device
        ),
    )
    print(f"built {folder} in {time.perf_counter() - started:.1f} s", flush=True)
    return folder


def parameter_count(config: Any) -> int:
    """Parameters of a GPT-OSS config, counted on the meta device (no memory)."""
    import torch
    from transformers import GptOssForCausalLM

    with torch.device("meta"):
        model = GptOssForCausalLM(config)
    return sum(p.numel() for p in model.parameters())
