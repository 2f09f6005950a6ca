"""Generate the full gpt-oss-20b architecture (20.9 B parameters) with random weights, for GPU
benchmarks where no real weights can be downloaded. Speed and memory on it equal the real model's.

    python scripts/make_full_model.py --out /data/gpt-oss-20b-random [--device cuda]
    python scripts/make_full_model.py --out /data/gpt-oss-20b-mxfp4 --mxfp4
    python scripts/make_full_model.py --out /data/peaked --layers 2 --lm-head-std 0.2   # golden tests

bf16: built on the device (about 39 GB on disk, ~75 s on an H200), saved with the offline tokenizer.
--mxfp4: the layout openai/gpt-oss-20b ships (what vLLM serves as its 4-bit MoE): each layer's
experts as ``mlp.experts.{gate_up,down}_proj_blocks`` (uint8 [E, out, in/32, 16], two FP4 e2m1
values a byte) and ``..._scales`` (uint8 [E, out, in/32], E8M0 exponents biased by 127) beside bf16
biases; every other tensor bf16; ``quantization_config`` {quant_method: mxfp4} in config.json. Written
layer by layer, so it needs neither the bf16 model in memory nor its 39 GB on disk (about 13 GB).
--lm-head-std: a wide output head makes the logits peaked (a large gap between the first and second
token), so greedy decoding agrees between implementations whose arithmetic differs slightly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.config import Settings  # noqa: E402
from app.ml.modeling import config_fingerprint  # noqa: E402
from app.ml.tiny_model import _copy_tokenizer, full_config, save_random_model  # noqa: E402
from app.ml.tokenizer import atomic_build  # noqa: E402

# Experts stay 4-bit; what openai/gpt-oss-20b's config.json leaves in bf16.
MXFP4_QUANTIZATION = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}
# E8M0 exponent for the experts' blocks: 2**(120 - 127) times FP4 values of mean magnitude ~2.3
# gives weights of about 0.02, the std transformers initialises gpt-oss with.
EXPERT_SCALE_EXPONENT = 120


def save_mxfp4_model(config: Any, folder: Path, models_dir: Path, *, seed: int, device: str) -> None:
    """Write a random gpt-oss checkpoint in the MXFP4 layout, one safetensors file per layer."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    gen = torch.Generator(device=device).manual_seed(seed)
    hidden, inter, experts = config.hidden_size, config.intermediate_size, config.num_local_experts
    heads, kv, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim

    def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * std).to(torch.bfloat16).cpu()

    def mxfp4(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = torch.randint(0, 256, (experts, rows, cols // 32, 16), generator=gen, device=device)
        scales = torch.full((experts, rows, cols // 32), EXPERT_SCALE_EXPONENT, device=device)
        return blocks.to(torch.uint8).cpu(), scales.to(torch.uint8).cpu()

    index: dict[str, str] = {}

    def write(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        index.update(dict.fromkeys(tensors, name))

    write(
        "embed.safetensors",
        {
            "model.embed_tokens.weight": normal(config.vocab_size, hidden),
            "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            "lm_head.weight": normal(config.vocab_size, hidden),
        },
    )
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        gate_up_blocks, gate_up_scales = mxfp4(2 * inter, hidden)
        down_blocks, down_scales = mxfp4(hidden, inter)
        tensors = {
            p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": normal(heads * head_dim, hidden),
            p + "self_attn.q_proj.bias": torch.zeros(heads * head_dim, dtype=torch.bfloat16),
            p + "self_attn.k_proj.weight": normal(kv * head_dim, hidden),
            p + "self_attn.k_proj.bias": torch.zeros(kv * head_dim, dtype=torch.bfloat16),
            p + "self_attn.v_proj.weight": normal(kv * head_dim, hidden),
            p + "self_attn.v_proj.bias": torch.zeros(kv * head_dim, dtype=torch.bfloat16),
            p + "self_attn.o_proj.weight": normal(hidden, heads * head_dim),
            p + "self_attn.o_proj.bias": torch.zeros(hidden, dtype=torch.bfloat16),
            p + "self_attn.sinks": torch.zeros(heads, dtype=torch.bfloat16),
            p + "mlp.router.weight": normal(experts, hidden),
            p + "mlp.router.bias": torch.zeros(experts, dtype=torch.bfloat16),
            p + "mlp.experts.gate_up_proj_blocks": gate_up_blocks,
            p + "mlp.experts.gate_up_proj_scales": gate_up_scales,
            p + "mlp.experts.gate_up_proj_bias": torch.zeros(experts, 2 * inter, dtype=torch.bfloat16),
            p + "mlp.experts.down_proj_blocks": down_blocks,
            p + "mlp.experts.down_proj_scales": down_scales,
            p + "mlp.experts.down_proj_bias": torch.zeros(experts, hidden, dtype=torch.bfloat16),
        }
        write(f"layer-{layer:02d}.safetensors", tensors)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": index}, indent=1, sort_keys=True)
    )
    # vLLM picks the model class from this; without it (config.save_pretrained of a bare config writes
    # none) vLLM 0.26 served the checkpoint as a pooling model, with no /v1/completions.
    config.architectures = ["GptOssForCausalLM"]
    config.quantization_config = MXFP4_QUANTIZATION
    config.save_pretrained(folder)
    GenerationConfig(eos_token_id=[200002, 200012], pad_token_id=199999, bos_token_id=199998).save_pretrained(
        folder
    )
    _copy_tokenizer(models_dir, folder)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to create")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=24, help="fewer layers for a quick smoke build")
    parser.add_argument("--mxfp4", action="store_true", help="experts in gpt-oss's MXFP4 checkpoint layout")
    parser.add_argument(
        "--lm-head-std", type=float, default=None, help="e.g. 0.2: peaked outputs (bf16 only)"
    )
    parser.add_argument("--models_dir", type=Path, default=None, help="where the offline tokenizer lives")
    args = parser.parse_args()
    config = full_config()
    if args.layers != 24:
        config.num_hidden_layers = args.layers
        config.layer_types = config.layer_types[: args.layers]
    models_dir = args.models_dir or Settings().models_path
    start = time.monotonic()
    if args.mxfp4:
        atomic_build(
            args.out,
            lambda tmp: save_mxfp4_model(config, tmp, models_dir, seed=args.seed, device=args.device),
        )
    else:
        atomic_build(
            args.out,
            lambda tmp: save_random_model(
                config,
                tmp,
                models_dir,
                seed=args.seed,
                dtype=torch.bfloat16,
                device=args.device,
                lm_head_std=args.lm_head_std,
            ),
        )
    print(f"{args.out}: fingerprint {config_fingerprint(config)[:12]}, {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
