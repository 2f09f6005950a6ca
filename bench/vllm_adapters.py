"""Random rank-r LoRA adapters for a gpt-oss model folder, written in PEFT's layout (what vLLM reads):
attention q/k/v/o and both expert projections (``target_parameters``), with a manifest.json naming the
base, so the service's registry accepts them. No model is loaded: shapes come from config.json, so it
takes seconds even for the 20B.

    python bench/vllm_adapters.py --model /tmp/m --out /tmp/adapters --count 4 [--rank 16] [--std 0.05]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.ml.modeling import config_fingerprint  # noqa: E402


def make_adapter(model: Path, out: Path, *, rank: int, std: float, seed: int) -> Path:
    config = json.loads((model / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    experts, head_dim = config["num_local_experts"], config["head_dim"]
    q_out, kv_out = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        p = f"base_model.model.model.layers.{layer}."
        for name, (fan_in, fan_out) in {
            "q_proj": (hidden, q_out),
            "k_proj": (hidden, kv_out),
            "v_proj": (hidden, kv_out),
            "o_proj": (q_out, hidden),
        }.items():
            tensors[f"{p}self_attn.{name}.lora_A.weight"] = normal(rank, fan_in)
            tensors[f"{p}self_attn.{name}.lora_B.weight"] = normal(fan_out, rank)
        # gate_up nested as experts.base_layer, down as experts (PEFT's nesting); A (E*r, in), B (out, E*r).
        tensors[f"{p}mlp.experts.base_layer.lora_A.weight"] = normal(experts * rank, hidden)
        tensors[f"{p}mlp.experts.base_layer.lora_B.weight"] = normal(2 * inter, experts * rank)
        tensors[f"{p}mlp.experts.lora_A.weight"] = normal(experts * rank, inter)
        tensors[f"{p}mlp.experts.lora_B.weight"] = normal(hidden, experts * rank)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model),
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        "inference_mode": True,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
        "use_rslora": False,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    # As the trainer records it (the loaded config's fields, defaults included) and the engines check it.
    from transformers import AutoConfig

    fingerprint = config_fingerprint(AutoConfig.from_pretrained(str(model)))
    manifest = {"base_model": str(model), "base_fingerprint": fingerprint, "backend": "hf"}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder; adapters go to <out>/a0 ... a<n-1>")
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--std", type=float, default=0.05, help="A and B entries; 0.05 changes answers clearly"
    )
    args = parser.parse_args()
    for i in range(args.count):
        print(make_adapter(args.model, args.out / f"a{i}", rank=args.rank, std=args.std, seed=100 + i))


if __name__ == "__main__":
    main()
