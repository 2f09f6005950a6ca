"""A plain one-row generation loop (KV cache, greedy or temperature/top-p sampling, stop tokens).

Used by scripts/infer.py and the ML tests; the service's batched engine lives in app/inference.
Sampling draws from a private ``torch.Generator`` so a seed reproduces a generation without
touching global RNG state that other requests share.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from app.ml.harmony import STOP_TOKEN_IDS


def pick_token(logits: Any, temperature: float, top_p: float, generator: Any) -> int:
    """Greedy when temperature is 0, else sample from the top-p nucleus of softmax(logits / T)."""
    import torch

    if temperature <= 0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        cut = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p
        sorted_probs[cut] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def generate_ids(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: Iterable[int] = STOP_TOKEN_IDS,
) -> list[int]:
    """New token ids after ``prompt_ids``, including the stop token when one ended the generation.
    ``tokenizer`` is accepted for interface symmetry with the engine; ids in, ids out."""
    import torch

    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    stops = set(stop_ids)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed) if seed is not None else torch.Generator()
    step_ids = torch.tensor([list(prompt_ids)], device=device)
    past = None
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            result = model(input_ids=step_ids, past_key_values=past, use_cache=True, logits_to_keep=1)
            past = result.past_key_values
            token = pick_token(result.logits[0, -1], temperature, top_p, generator)
            out.append(token)
            if token in stops:
                break
            step_ids = torch.tensor([[token]], device=device)
    return out
