"""The memory-bandwidth ceiling for decoding gpt-oss-20b as the service loads it (Unsloth, 4-bit).

Decoding reads every weight a token touches once per step; at small batch that, not arithmetic,
bounds the speed. Bytes per step for a batch of B rows:
- attention q/k/v/o in NF4 (0.5 byte a weight + one absmax byte per 64-weight block),
- the experts, also NF4 (Unsloth's 4-bit load splits the fused expert tensors into per-expert
  bnb Linear4bit modules: the API process held 15 GB of GPU memory for the 20.9 B model, H200 run),
  each counted once per step. `experts="routed"` counts the ones the batch routes to (uniform
  routing: B rows touch E * (1 - (1 - k/E)^B) of E), the least any decoder must read;
  `experts="all"` counts all E, which is what Unsloth's eval forward reads when
  tokens x experts is small (it runs every expert densely on every token, then weights them),
- router, norms, sinks, LM head (bf16), one embedding row per row,
- the LoRA weights of those modules (bf16), and the KV cache of `context` tokens per row.
Ceiling tokens/s = B x bandwidth / bytes per step. Bandwidth is the device-to-device copy rate
measured in the same run (bench.common.copy_bandwidth_gbs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NF4_BYTES = 0.5 + 1 / 64
BF16 = 2


@dataclass(frozen=True)
class Arch:
    layers: int = 24
    hidden: int = 2880
    intermediate: int = 2880
    heads: int = 64
    kv_heads: int = 8
    head_dim: int = 64
    experts: int = 32
    top_k: int = 4
    vocab: int = 201_088

    @classmethod
    def from_config(cls, config: Any) -> Arch:
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            experts=config.num_local_experts,
            top_k=config.num_experts_per_tok,
            vocab=config.vocab_size,
        )


def distinct_experts(arch: Arch, batch: int) -> float:
    return arch.experts * (1 - (1 - arch.top_k / arch.experts) ** batch)


def step_bytes(
    arch: Arch, batch: int, *, lora_rank: int = 16, context: int = 320, experts: str = "routed"
) -> dict[str, float]:
    h, i, q, kv = arch.hidden, arch.intermediate, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    attn_weights = h * q + 2 * h * kv + q * h
    expert_weights = h * 2 * i + i * h + 2 * i + h  # gate_up, down and their biases
    used = distinct_experts(arch, batch) if experts == "routed" else float(arch.experts)
    per_layer = {
        "attention": attn_weights * NF4_BYTES,
        "experts": used * expert_weights * NF4_BYTES,
        "router_norms": (arch.experts * h + 2 * h) * BF16,
        "lora": lora_rank * ((h + q) * 2 + (h + kv) * 2 + used * (h + 2 * i + i + h)) * BF16,
        "kv_cache": batch * 2 * kv * context * BF16,
    }
    total = {k: v * arch.layers for k, v in per_layer.items()}
    total["lm_head"] = arch.vocab * h * BF16
    total["embedding_rows"] = batch * h * BF16
    return total


def ceiling_tokens_per_s(arch: Arch, batch: int, bandwidth_gbs: float, **kw: Any) -> float:
    return batch * bandwidth_gbs * 1e9 / sum(step_bytes(arch, batch, **kw).values())


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Decode ceilings of gpt-oss-20b at a memory bandwidth.")
    parser.add_argument("--bandwidth-gbs", type=float, default=4219.0, help="measured copy bandwidth")
    bandwidth = parser.parse_args(argv).bandwidth_gbs
    for mode in ("routed", "all"):
        for b in (1, 8, 32):
            gb = sum(step_bytes(Arch(), b, experts=mode).values()) / 1e9
            ceiling = ceiling_tokens_per_s(Arch(), b, bandwidth, experts=mode)
            print(
                f"experts={mode} batch={b}: {gb:.2f} GB/step, "
                f"ceiling {ceiling:.0f} tokens/s at {bandwidth:.0f} GB/s"
            )


if __name__ == "__main__":
    main()
