"""Batched autoregressive decoding with a KV cache, per-row sampling and per-row stopping.

Rows of different lengths are left-padded; the attention mask hides the padding and position ids
count only real tokens, so a row decodes (up to float rounding) exactly as it would alone. Rows that
finish are dropped from the batch and the cache, so a long answer never makes short ones pay.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from app.inference.types import SamplingParams, TokenSink


@dataclass
class Row:
    """One request inside a batch."""

    prompt_ids: list[int]
    params: SamplingParams
    sink: TokenSink
    generated: int = 0
    finish_reason: str | None = None
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        # A private generator per row: a seeded request samples the same tokens whatever it is batched with.
        seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[i, width - len(prompt) :] = 1
    return ids, mask


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Temperature + nucleus sampling for one row of float32 logits on the CPU."""
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0.0
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def pick_tokens(logits: torch.Tensor, rows: list[Row]) -> list[int]:
    greedy = logits.argmax(dim=-1).tolist()
    if all(row.params.greedy for row in rows):
        return greedy
    cpu_logits = logits.float().cpu()
    return [
        greedy[i] if row.params.greedy else sample_row(cpu_logits[i], row.params, row.generator)
        for i, row in enumerate(rows)
    ]


def _deliver(token: int, row: Row, stop_ids: frozenset[int]) -> bool:
    """Hand one token to its request; False once the row is finished (and its sink told why)."""
    row.generated += 1
    if token in stop_ids:
        return _finish(row, "stop")
    row.sink.put_token(token)
    if row.sink.cancelled():
        return _finish(row, "cancelled")
    if row.generated >= row.params.max_new_tokens:
        return _finish(row, "length")
    return True


def _finish(row: Row, reason: str) -> bool:
    row.finish_reason = reason
    row.sink.finish(reason, row.generated)
    return False


def _forward(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any
) -> torch.Tensor:
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1, :]


@torch.inference_mode()
def decode_batch(model: Any, rows: list[Row], *, pad_id: int, stop_ids: frozenset[int]) -> None:
    """Generate for every row until each stops, runs out of tokens or is cancelled."""
    device = next(model.parameters()).device
    ids, mask = left_pad([row.prompt_ids for row in rows], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    logits = _forward(model, ids, mask, pos, cache)
    pos = pos[:, -1:]
    while rows:
        tokens = pick_tokens(logits, rows)
        keep = [
            i for i, (tok, row) in enumerate(zip(tokens, rows, strict=True)) if _deliver(tok, row, stop_ids)
        ]
        if not keep:
            return
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, pos = mask[index], pos[index]
            rows, tokens = [rows[i] for i in keep], [tokens[i] for i in keep]
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        pos = pos + 1
        step_ids = torch.tensor(tokens, device=device).unsqueeze(1)
        logits = _forward(model, step_ids, mask, pos, cache)
