"""The on-disk layout of a gpt-oss LoRA adapter, made into the one vLLM serves, and checked for it.

A fused-expert LoRA (PEFT ``target_parameters`` on ``mlp.experts.gate_up_proj`` / ``down_proj``) stores
one ``lora_A`` of shape ``(r * E, in)`` and one ``lora_B`` of shape ``(out, r * E)`` per projection
(E experts). How the expert axis is packed into those ``r * E`` rows / columns is the layout:

- ``lora_A``: grouped by expert, ``A.reshape(E, r, in)``, in PEFT, in Unsloth and in vLLM alike.
- ``lora_B``: PEFT packs it rank-major, ``B.reshape(out, r, E)`` (column ``k * E + e`` is rank ``k`` of
  expert ``e``): ``ParamWrapper.get_delta_weight`` and ``get_delta_factors`` read it so (peft 0.18 -
  0.21), and vLLM 0.26's ``LoRAModelManager._stack_moe_lora_weights`` reads it the same way. Unsloth
  records the packing it trained in ``adapter_config.json`` (``lora_B_layout`` and the nested
  ``unsloth_fused_expert_lora``); ``rank_major`` is PEFT's, while ``grouped_by_expert`` (written by
  Unsloth builds before unsloth_zoo#1269, or with ``UNSLOTH_MOE_LORA_B_LAYOUT=grouped_by_expert``)
  means ``B.reshape(out, E, r)``, which vLLM would silently misread.

vLLM names the two projections by nesting, not by name: ``mlp.experts.base_layer.lora_*`` is gate_up and
``mlp.experts.lora_*`` is down (PEFT saves them so), and it needs both. ``normalize_adapter`` rewrites an
adapter folder into that layout (a no-op for PEFT's own); ``check_servable`` refuses what vLLM cannot
serve. Pure torch + safetensors: it runs where the adapter is registered, without a GPU or vLLM.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

RANK_MAJOR = "rank_major"  # PEFT's and vLLM's lora_B packing
GROUPED_BY_EXPERT = "grouped_by_expert"  # Unsloth's legacy lora_B packing; every lora_A's packing
LAYOUT_KEY = "lora_B_layout"  # unsloth_zoo's flat key
DETAIL_KEY = "unsloth_fused_expert_lora"  # unsloth_zoo's nested key

# What vLLM 0.26 serves for gpt-oss: q/k/v (packed into qkv_proj there) and o_proj, and the experts.
SUPPORTED_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")

_KEY = re.compile(r"^(?P<prefix>.*)\.(?P<kind>lora_A|lora_B)\.weight$")


class AdapterLayoutError(ValueError):
    """The adapter cannot be served by vLLM as it is; the message says why and what to do."""


@dataclass(frozen=True)
class ExpertPair:
    """One layer's expert LoRA keys, by projection."""

    gate_up: tuple[str, str]  # (lora_A key, lora_B key)
    down: tuple[str, str]


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterLayoutError(f"{path} cannot be read as JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterLayoutError(f"{path} does not hold a JSON object")
    return config


def lora_b_layouts(config: dict[str, Any]) -> dict[str, str]:
    """The recorded lora_B packing per expert projection ('gate_up_proj' / 'down_proj'); PEFT's
    rank-major where nothing is recorded. AdapterLayoutError for a lora_A packing or a layout name
    this module does not know (guessing would permute the weights silently)."""
    detail = config.get(DETAIL_KEY) or {}
    if not isinstance(detail, dict):
        raise AdapterLayoutError(f"{DETAIL_KEY} in {CONFIG_FILE} is not an object")
    a_layout = detail.get("lora_A_layout", GROUPED_BY_EXPERT)
    if a_layout != GROUPED_BY_EXPERT:
        raise AdapterLayoutError(
            f"unknown fused-expert lora_A_layout {a_layout!r}; expected {GROUPED_BY_EXPERT!r}"
        )
    flat = detail.get(LAYOUT_KEY) or config.get(LAYOUT_KEY) or RANK_MAJOR
    layouts = {name: flat for name in EXPERT_PARAMETERS}
    for name, entry in (detail.get("parameters") or {}).items():
        short = _expert_parameter(name)
        if short is not None and isinstance(entry, dict) and entry.get(LAYOUT_KEY):
            layouts[short] = entry[LAYOUT_KEY]
    for name, layout in layouts.items():
        if layout not in (RANK_MAJOR, GROUPED_BY_EXPERT):
            raise AdapterLayoutError(
                f"{name}: unknown lora_B_layout {layout!r} "
                f"(expected {RANK_MAJOR!r} or {GROUPED_BY_EXPERT!r}); "
                "retrain the adapter with this service"
            )
    return layouts


def _expert_parameter(name: str) -> str | None:
    tail = name.rsplit(".", 1)[-1]
    return tail if tail in EXPERT_PARAMETERS else None


def expert_pairs(tensors: Mapping[str, Any]) -> dict[str, ExpertPair]:
    """Per layer prefix (``...mlp.experts``), the gate_up and down keys, told apart by shape rather than
    trusted from the nesting: gate_up's B has twice as many rows as down's A has columns (2 x
    intermediate), and its A as many columns as down's B has rows (hidden)."""
    by_prefix: dict[str, dict[str, str]] = {}
    for key in tensors:
        match = _KEY.match(key)
        if match and ".mlp.experts" in match["prefix"]:
            experts = match["prefix"].split(".mlp.experts")[0] + ".mlp.experts"
            slot = "inner" if match["prefix"].endswith(".base_layer") else "outer"
            by_prefix.setdefault(experts, {})[f"{slot}_{match['kind']}"] = key
    pairs = {}
    for prefix, keys in by_prefix.items():
        if set(keys) != {"inner_lora_A", "inner_lora_B", "outer_lora_A", "outer_lora_B"}:
            raise AdapterLayoutError(
                f"{prefix}: LoRA on only one of the expert projections; vLLM serves expert LoRA only on "
                "both mlp.experts.gate_up_proj and mlp.experts.down_proj: train with both or neither"
            )
        inner = (keys["inner_lora_A"], keys["inner_lora_B"])
        outer = (keys["outer_lora_A"], keys["outer_lora_B"])
        if _is_gate_up(tensors, inner, outer):
            pairs[prefix] = ExpertPair(gate_up=inner, down=outer)
        elif _is_gate_up(tensors, outer, inner):
            pairs[prefix] = ExpertPair(gate_up=outer, down=inner)
        else:
            raise AdapterLayoutError(f"{prefix}: expert LoRA shapes fit neither gate_up_proj nor down_proj")
    return pairs


def _is_gate_up(tensors: Mapping[str, Any], cand: tuple[str, str], other: tuple[str, str]) -> bool:
    a, b = tensors[cand[0]], tensors[cand[1]]
    other_a, other_b = tensors[other[0]], tensors[other[1]]
    return b.shape[0] == 2 * other_a.shape[1] and a.shape[1] == other_b.shape[0]


def rank_major_from_grouped(b: torch.Tensor, num_experts: int) -> torch.Tensor:
    """lora_B ``(out, E * r)`` packed expert-slowest (column ``e * r + k``) -> PEFT's rank-major
    (column ``k * E + e``)."""
    out, total = b.shape
    return b.reshape(out, num_experts, total // num_experts).transpose(1, 2).reshape(out, total).contiguous()


def grouped_from_rank_major(b: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The inverse of ``rank_major_from_grouped``: how an adapter trained the legacy Unsloth way looks."""
    out, total = b.shape
    return b.reshape(out, total // num_experts, num_experts).transpose(1, 2).reshape(out, total).contiguous()


def _num_experts(config: dict[str, Any], tensors: dict[str, torch.Tensor], pair: ExpertPair) -> int:
    detail = config.get(DETAIL_KEY) or {}
    for entry in (detail.get("parameters") or {}).values():
        if isinstance(entry, dict) and entry.get("num_experts"):
            return int(entry["num_experts"])
    rank = int(config.get("r") or 0)
    total = tensors[pair.gate_up[0]].shape[0]
    if rank <= 0 or total % rank:
        raise AdapterLayoutError(f"cannot tell the number of experts: lora_A has {total} rows, r is {rank}")
    return total // rank


def has_expert_lora(config: dict[str, Any]) -> bool:
    """LoRA on the fused experts (``target_parameters``), or Unsloth's record of it: what
    ``normalize_adapter`` may have to rewrite. Attention-only adapters are served as saved."""
    params = _as_list(config.get("target_parameters"))
    return bool(config.get(DETAIL_KEY)) or any(_expert_parameter(p) for p in params)


def normalize_adapter(folder: Path) -> bool:
    """Rewrite ``folder`` in place into the layout vLLM reads (PEFT's): lora_B rank-major, gate_up as
    ``experts.base_layer``. True when something was rewritten; False for an adapter already so (PEFT's
    own saves, Unsloth's current ones). Each file is replaced atomically, the weights first (their
    safetensors metadata records the packing they now have) and the config's marker after them, so a
    crash between the two is repaired by running it again rather than permuting twice."""
    folder = Path(folder)
    config = read_config(folder)
    layouts = lora_b_layouts(config)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterLayoutError(f"{weights_path} is missing (vLLM reads safetensors adapters)")
    permuted_before = _weights_layout(weights_path) == RANK_MAJOR  # only the config lags behind
    tensors = load_file(str(weights_path))
    rewrite = False
    for prefix, pair in expert_pairs(tensors).items():
        experts = _num_experts(config, tensors, pair)
        for name, (_, b_key) in (("gate_up_proj", pair.gate_up), ("down_proj", pair.down)):
            if layouts[name] == GROUPED_BY_EXPERT and not permuted_before:
                tensors[b_key] = rank_major_from_grouped(tensors[b_key], experts)
                rewrite = True
        if not pair.gate_up[0].startswith(prefix + ".base_layer"):  # nested the other way round
            tensors = _swap_nesting(tensors, prefix, pair)
            rewrite = True
    if rewrite:
        _atomic_save_tensors(tensors, weights_path)
    normalized = _rank_major_config(config)
    if normalized != config:
        _atomic_write_json(folder / CONFIG_FILE, normalized)
    return rewrite or normalized != config


def _weights_layout(path: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return (handle.metadata() or {}).get(LAYOUT_KEY)


def _swap_nesting(tensors: dict[str, torch.Tensor], prefix: str, pair: ExpertPair) -> dict[str, torch.Tensor]:
    names = {
        pair.gate_up[0]: f"{prefix}.base_layer.lora_A.weight",
        pair.gate_up[1]: f"{prefix}.base_layer.lora_B.weight",
        pair.down[0]: f"{prefix}.lora_A.weight",
        pair.down[1]: f"{prefix}.lora_B.weight",
    }
    return {names.get(k, k): v for k, v in tensors.items()}


def _rank_major_config(config: dict[str, Any]) -> dict[str, Any]:
    config = dict(config)
    if LAYOUT_KEY in config:
        config[LAYOUT_KEY] = RANK_MAJOR
    detail = config.get(DETAIL_KEY)
    if isinstance(detail, dict):
        detail = {**detail, LAYOUT_KEY: RANK_MAJOR}
        params = detail.get("parameters") or {}
        detail["parameters"] = {
            name: ({**entry, LAYOUT_KEY: RANK_MAJOR} if isinstance(entry, dict) else entry)
            for name, entry in params.items()
        }
        config[DETAIL_KEY] = detail
    return config


def check_servable(folder: Path, *, max_lora_rank: int) -> None:
    """AdapterLayoutError unless vLLM (0.26, gpt-oss) can serve ``folder`` as it is on disk: rank at
    most ``max_lora_rank`` (the server's --max-lora-rank), LoRA only on q/k/v/o and on both expert
    projections, no DoRA / bias / modules_to_save / embedding LoRA, PEFT's packing."""
    folder = Path(folder)
    config = read_config(folder)
    problems = _config_problems(config, max_lora_rank)
    if any(layout != RANK_MAJOR for layout in lora_b_layouts(config).values()):
        problems.append("its expert lora_B is packed grouped_by_expert: normalize it first")
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterLayoutError(f"{weights_path} is missing (vLLM reads safetensors adapters)")
    tensors = _shapes(weights_path)  # the header only: this runs on an adapter's first request
    problems += _key_problems(tensors)
    if not problems:
        for prefix, pair in expert_pairs(tensors).items():
            if not pair.gate_up[0].startswith(prefix + ".base_layer"):
                problems.append(f"{prefix}: gate_up_proj is not experts.base_layer: normalize it first")
                break
    if problems:
        raise AdapterLayoutError("vLLM cannot serve this adapter: " + "; ".join(problems))


def _config_problems(config: dict[str, Any], max_lora_rank: int) -> list[str]:
    problems = []
    ranks = [int(config.get("r") or 0), *(int(v) for v in (config.get("rank_pattern") or {}).values())]
    if max(ranks) > max_lora_rank:
        problems.append(
            f"rank {max(ranks)} is above the server's max_lora_rank {max_lora_rank}; "
            f"retrain with lora_r <= {max_lora_rank} or raise the server's --max-lora-rank"
        )
    if config.get("use_dora"):
        problems.append("DoRA (use_dora) is not supported by vLLM")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("LoRA bias is not supported by vLLM")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']} is not supported by vLLM")
    modules = _as_list(config.get("target_modules"))
    unsupported = sorted(m for m in modules if m.rsplit(".", 1)[-1] not in SUPPORTED_MODULES)
    if unsupported:
        problems.append(f"LoRA on {unsupported}: vLLM serves gpt-oss LoRA on {sorted(SUPPORTED_MODULES)}")
    params = _as_list(config.get("target_parameters"))
    bad_params = sorted(p for p in params if _expert_parameter(p) is None)
    if bad_params:
        problems.append(f"target_parameters {bad_params}: only mlp.experts.gate_up_proj/down_proj are served")
    return problems


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):  # PEFT allows a regex here; vLLM needs to know the modules
        return [value] if value in SUPPORTED_MODULES else [f"(regex) {value}"]
    return [str(v) for v in value]


@dataclass(frozen=True)
class _Shaped:
    shape: tuple[int, ...]


def _shapes(path: Path) -> dict[str, _Shaped]:
    """Each tensor's shape from the safetensors header, without reading the weights."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: _Shaped(tuple(handle.get_slice(key).get_shape())) for key in handle.keys()}  # noqa: SIM118


def _key_problems(tensors: Mapping[str, Any]) -> list[str]:
    odd = []
    for key in tensors:
        match = _KEY.match(key)
        name = match["prefix"].removesuffix(".base_layer") if match else key
        last = name.rsplit(".", 1)[-1]
        if match is None or (last not in SUPPORTED_MODULES and not name.endswith(".mlp.experts")):
            odd.append(key)
    return [f"weights vLLM does not serve: {odd[:3]}{' ...' if len(odd) > 3 else ''}"] if odd else []


def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            tmp,
            metadata={"format": "pt", LAYOUT_KEY: RANK_MAJOR},
        )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
