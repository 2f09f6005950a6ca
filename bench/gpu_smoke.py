"""A short first check on the GPU machine, through the project's own code, on the small random model:
Unsloth imports and patches GPT-OSS, the base loads in 4-bit, LoRA goes on attention and experts,
a few optimizer steps run, the adapter saves, and the inference side hot-loads it onto a fresh 4-bit
base and decodes with and without it.

    python -m bench.gpu_smoke --models-dir /tmp/gm --out $OUT/smoke.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from app.ml.modeling import import_unsloth_first

import_unsloth_first()  # before transformers, so Unsloth's patches apply

from bench.common import copy_bandwidth_gbs, peak_gib, run_header, write_json  # noqa: E402


def _timed(facts: dict[str, Any], key: str, fn: Any) -> Any:
    started = time.perf_counter()
    value = fn()
    facts[key] = round(time.perf_counter() - started, 3)
    return value


def _module_kinds(model: Any) -> dict[str, str]:
    kinds: dict[str, str] = {}
    for name, module in model.named_modules():
        for key in ("q_proj", "experts", "lm_head"):
            if name.endswith(key) and key not in kinds:
                kinds[key] = type(module).__name__
                weight = getattr(module, "weight", None)
                if weight is not None:
                    kinds[key + ".weight"] = type(weight).__name__ + ":" + str(weight.dtype)
    return kinds


def train_steps(peft_model: Any, steps: int, seq: int) -> list[float]:
    import torch

    from bench.data import fixed_length_rows, render_all

    rows = render_all(fixed_length_rows(4, seq))
    device = next(peft_model.parameters()).device
    ids = torch.tensor([r[0] for r in rows], device=device)
    mask = torch.tensor([r[1] for r in rows], device=device)
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    peft_model.train()
    for _ in range(steps):
        loss = peft_model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


class _Collect:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.reason = ""

    def put_token(self, token_id: int) -> None:
        self.tokens.append(token_id)

    def finish(self, reason: str, completion_tokens: int) -> None:
        self.reason = reason

    def fail(self, error: BaseException) -> None:
        raise error

    def cancelled(self) -> bool:
        return False


def decode(cache: Any, adapter: str | None, prompt: list[int]) -> list[int]:
    from app.inference.decoding import Row, decode_batch
    from app.inference.types import SamplingParams

    sink = _Collect()
    with cache.activate(adapter) as model:
        decode_batch(
            model,
            [Row(prompt, SamplingParams(max_new_tokens=16), sink)],
            pad_id=199999,
            stop_ids=frozenset({200002, 200012}),
        )
    return sink.tokens


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--backend", default="unsloth", help="'hf' for a CPU dry run")
    args = p.parse_args()
    facts: dict[str, Any] = run_header()
    facts["copy_gbs"] = copy_bandwidth_gbs()
    from app.inference.adapters import AdapterCache
    from app.inference.types import AdapterSpec
    from app.ml.harmony import render_prompt
    from app.ml.modeling import ATTENTION_TARGETS, EXPERT_TARGETS, apply_lora, load_base
    from bench.models import ensure_random_model

    path = str(_timed(facts, "build_s", lambda: ensure_random_model(args.models_dir, full=False)))
    kw = {"backend": args.backend, "load_in_4bit": True, "max_seq_length": 512, "models_dir": args.models_dir}
    loaded = _timed(facts, "load_train_s", lambda: load_base(path, for_training=True, **kw))
    facts["backend"] = loaded.backend
    facts["train_modules"] = _module_kinds(loaded.model)
    peft_model = apply_lora(
        loaded,
        r=8,
        alpha=16,
        dropout=0.0,
        target_modules=ATTENTION_TARGETS,
        target_parameters=EXPERT_TARGETS,
        seed=0,
        gradient_checkpointing=True,
    )
    facts["lora_param_names"] = sorted(
        {n.split(".lora_")[0].split(".")[-1] for n, p in peft_model.named_parameters() if p.requires_grad}
    )[:20]
    facts["trainable"] = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    started = time.perf_counter()
    facts["losses"] = train_steps(peft_model, 4, args.seq)
    facts["train_s"] = round(time.perf_counter() - started, 3)
    adapter_dir = args.models_dir.parent / "smoke-adapter"
    peft_model.save_pretrained(str(adapter_dir))
    facts["adapter_config"] = json.loads((adapter_dir / "adapter_config.json").read_text())
    facts["adapter_files"] = sorted(f.name for f in adapter_dir.iterdir())
    facts["peak_gib_train"] = peak_gib()
    del peft_model, loaded
    base = _timed(facts, "load_infer_s", lambda: load_base(path, for_training=False, **kw))
    cache = AdapterCache(base.model, capacity=4, pinned=set(), fingerprint=base.fingerprint, base_model=path)
    spec = AdapterSpec("adp_smoke", "smoke", adapter_dir, None)
    _timed(facts, "adapter_load_s", lambda: cache.ensure(spec))
    prompt = render_prompt([{"role": "user", "content": "Say hi."}], reasoning_effort="low")
    facts["tokens_base"] = decode(cache, None, prompt)
    facts["tokens_adapter"] = _timed(facts, "decode16_adapter_s", lambda: decode(cache, "adp_smoke", prompt))
    facts["tokens_base_again"] = decode(cache, None, prompt)
    facts["peak_gib"] = peak_gib()
    write_json(args.out, facts)
    print(json.dumps(facts, indent=1, default=str))


if __name__ == "__main__":
    main()
