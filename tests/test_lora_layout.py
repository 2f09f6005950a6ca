"""Adapter normalization for vLLM, checked against PEFT's own forward on the tiny GPT-OSS model.

A PEFT LoRA on attention and on the experts (``target_parameters``) is given random non-zero weights
and its logits taken; the same adapter is written the way Unsloth's legacy fused-expert forward
packs lora_B (``grouped_by_expert``, built from the PEFT weights as unsloth_zoo's
``_grouped_by_expert_delta_weight`` reads them) with Unsloth's adapter_config.json markers;
``normalize_adapter`` must bring it back so that PEFT, loading it, gives the original logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.config import Settings
from app.exceptions import NotFound
from app.ml.lora_layout import (
    GROUPED_BY_EXPERT,
    RANK_MAJOR,
    AdapterLayoutError,
    check_servable,
    expert_pairs,
    grouped_from_rank_major,
    normalize_adapter,
    rank_major_from_grouped,
)
from app.ml.tiny_model import tiny_config

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _base() -> torch.nn.Module:
    from transformers import GptOssForCausalLM

    torch.manual_seed(3)
    model = GptOssForCausalLM(tiny_config()).eval()
    return model


def _peft_adapter(folder: Path, *, r: int = 4, modules: list[str] | None = None) -> torch.Tensor:
    """Save a PEFT adapter with random (non-zero) A and B into ``folder``; return its logits."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=modules or ATTENTION, target_parameters=EXPERTS)
    model = get_peft_model(_base(), config)
    torch.manual_seed(11)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data.normal_(0.0, 0.2)
    model.save_pretrained(str(folder))
    return _logits(model)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[200006, 1428, 200008, 3086, 382, 290, 9029, 328, 10128, 30, 200007]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def _peft_logits(folder: Path) -> torch.Tensor:
    from peft import PeftModel

    return _logits(PeftModel.from_pretrained(_base(), str(folder)).eval())


def _write_unsloth_legacy(peft_folder: Path, out: Path) -> None:
    """The PEFT adapter as a legacy Unsloth fused-expert save: expert lora_B columns expert-slowest
    (``B.reshape(out, E, r)``), lora_A untouched (grouped by expert in both), and the markers
    unsloth_zoo's ``write_fused_expert_lora_layout`` puts in adapter_config.json."""
    shutil.copytree(peft_folder, out)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    experts = tiny_config().num_local_experts
    for pair in expert_pairs(tensors).values():
        for _, b_key in (pair.gate_up, pair.down):
            tensors[b_key] = grouped_from_rank_major(tensors[b_key], experts)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "adapter_config.json").read_text())
    entry = {"lora_B_layout": GROUPED_BY_EXPERT, "num_experts": experts}
    config["unsloth_fused_expert_lora"] = {
        "lora_A_layout": GROUPED_BY_EXPERT,
        "lora_B_layout": GROUPED_BY_EXPERT,
        "parameters": {"gate_up_proj": dict(entry), "down_proj": dict(entry)},
    }
    config["lora_B_layout"] = GROUPED_BY_EXPERT
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def test_permutations_are_inverse_and_move_columns() -> None:
    b = torch.arange(2 * 12, dtype=torch.float32).reshape(2, 12)  # E=4 experts, r=3
    grouped = grouped_from_rank_major(b, 4)
    assert not torch.equal(grouped, b)
    assert torch.equal(rank_major_from_grouped(grouped, 4), b)
    # rank-major column k*E+e (k=1, e=2 -> 6) is grouped column e*r+k (2*3+1 = 7)
    assert torch.equal(grouped[:, 7], b[:, 6])


def test_legacy_unsloth_layout_normalizes_to_peft_logits(tmp_path: Path) -> None:
    expected = _peft_adapter(tmp_path / "peft")
    _write_unsloth_legacy(tmp_path / "peft", tmp_path / "unsloth")
    scrambled = _peft_logits(tmp_path / "unsloth")
    assert not torch.allclose(scrambled, expected, atol=1e-3), "the layout must matter for this test"
    with pytest.raises(AdapterLayoutError, match="grouped_by_expert"):
        check_servable(tmp_path / "unsloth", max_lora_rank=16)

    assert normalize_adapter(tmp_path / "unsloth") is True
    torch.testing.assert_close(_peft_logits(tmp_path / "unsloth"), expected, rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "unsloth" / "adapter_config.json").read_text())
    assert config["lora_B_layout"] == RANK_MAJOR
    assert {e["lora_B_layout"] for e in config["unsloth_fused_expert_lora"]["parameters"].values()} == {
        RANK_MAJOR
    }
    check_servable(tmp_path / "unsloth", max_lora_rank=16)
    # Idempotent: a second run changes nothing (the weights record their packing).
    assert normalize_adapter(tmp_path / "unsloth") is False


def test_interrupted_normalization_is_finished_not_repeated(tmp_path: Path) -> None:
    """Weights rewritten but the config still saying grouped_by_expert (a crash between the two
    replaces): running again fixes the config and leaves the weights alone."""
    expected = _peft_adapter(tmp_path / "peft")
    _write_unsloth_legacy(tmp_path / "peft", tmp_path / "a")
    config_before = (tmp_path / "a" / "adapter_config.json").read_text()
    normalize_adapter(tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(config_before)
    assert normalize_adapter(tmp_path / "a") is True
    torch.testing.assert_close(_peft_logits(tmp_path / "a"), expected, rtol=1e-5, atol=1e-5)


def test_peft_layout_is_left_alone(tmp_path: Path) -> None:
    _peft_adapter(tmp_path / "peft")
    before = (tmp_path / "peft" / "adapter_model.safetensors").read_bytes()
    assert normalize_adapter(tmp_path / "peft") is False
    assert (tmp_path / "peft" / "adapter_model.safetensors").read_bytes() == before
    check_servable(tmp_path / "peft", max_lora_rank=4)


def test_unsloth_rank_major_marker_is_peft_layout(tmp_path: Path) -> None:
    """What current Unsloth saves: PEFT's packing, recorded as rank_major. Nothing to do."""
    expected = _peft_adapter(tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    entry = {"lora_B_layout": RANK_MAJOR, "num_experts": 4}
    config["unsloth_fused_expert_lora"] = {
        "lora_A_layout": GROUPED_BY_EXPERT,
        "lora_B_layout": RANK_MAJOR,
        "parameters": {"gate_up_proj": entry, "down_proj": entry},
    }
    config["lora_B_layout"] = RANK_MAJOR
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    assert normalize_adapter(tmp_path / "peft") is False
    torch.testing.assert_close(_peft_logits(tmp_path / "peft"), expected)


def test_swapped_nesting_is_renamed(tmp_path: Path) -> None:
    """An adapter whose gate_up sits on the outer wrapper (another tool's nesting) is renamed to what
    vLLM reads: experts.base_layer = gate_up."""
    _peft_adapter(tmp_path / "peft")
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    swap = {".experts.base_layer.lora_": ".experts.lora_", ".experts.lora_": ".experts.base_layer.lora_"}
    renamed = {}
    for key, value in tensors.items():
        for old, new in swap.items():
            if old in key:
                key = key.replace(old, new)
                break
        renamed[key] = value
    save_file(renamed, str(tmp_path / "peft" / "adapter_model.safetensors"))
    with pytest.raises(AdapterLayoutError, match="base_layer"):
        check_servable(tmp_path / "peft", max_lora_rank=16)
    assert normalize_adapter(tmp_path / "peft") is True
    assert load_file(str(tmp_path / "peft" / "adapter_model.safetensors")).keys() == tensors.keys()
    check_servable(tmp_path / "peft", max_lora_rank=16)


def test_refuses_rank_above_server_max(tmp_path: Path) -> None:
    _peft_adapter(tmp_path / "peft", r=8)
    with pytest.raises(AdapterLayoutError, match=r"rank 8 is above the server's max_lora_rank 4"):
        check_servable(tmp_path / "peft", max_lora_rank=4)


def test_refuses_modules_vllm_does_not_serve(tmp_path: Path) -> None:
    _peft_adapter(tmp_path / "peft", modules=["q_proj", "lm_head"])
    with pytest.raises(AdapterLayoutError, match="lm_head"):
        check_servable(tmp_path / "peft", max_lora_rank=16)


def test_refuses_expert_lora_on_one_projection(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=["q_proj"], target_parameters=["mlp.experts.down_proj"])
    get_peft_model(_base(), config).save_pretrained(str(tmp_path / "one"))
    with pytest.raises(AdapterLayoutError, match="both mlp.experts.gate_up_proj and mlp.experts.down_proj"):
        check_servable(tmp_path / "one", max_lora_rank=16)


def test_registration_normalizes_once_and_refuses_an_unknown_packing(
    tmp_path: Path, settings: Settings
) -> None:
    """What the worker does when a job succeeds (registry.register_adapter -> adapter_folder): a
    legacy Unsloth adapter is rewritten into PEFT's packing before its row exists, so every engine
    serves it as trained; an adapter whose packing this project does not know gets no row."""
    from app import adapter_folder
    from app.db import make_engine, make_sessionmaker, upgrade_to_head
    from app.registry import find_adapter, register_adapter

    expected = _peft_adapter(tmp_path / "peft")
    _write_unsloth_legacy(tmp_path / "peft", settings.adapters_dir / "adp_legacy")
    manifest = {"base_model": "tiny-gpt-oss", "base_fingerprint": "f" * 64}
    (settings.adapters_dir / "adp_legacy" / "manifest.json").write_text(json.dumps(manifest))
    upgrade_to_head(settings)
    with make_sessionmaker(make_engine(settings))() as session:
        register_adapter(
            session,
            adapter_id="adp_legacy",
            name="legacy",
            folder=settings.adapters_dir / "adp_legacy",
            job_id=None,
        )
        assert find_adapter(session, "legacy").manifest == manifest
        check_servable(settings.adapters_dir / "adp_legacy", max_lora_rank=16)
        torch.testing.assert_close(
            _peft_logits(settings.adapters_dir / "adp_legacy"), expected, rtol=1e-5, atol=1e-5
        )

        odd = settings.adapters_dir / "adp_odd"
        _write_unsloth_legacy(tmp_path / "peft", odd)
        config = json.loads((odd / "adapter_config.json").read_text())
        config["unsloth_fused_expert_lora"]["parameters"]["down_proj"]["lora_B_layout"] = "expert_major_v2"
        (odd / "adapter_config.json").write_text(json.dumps(config))
        (odd / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(
            adapter_folder.UnreadableLayout, match="down_proj: unknown lora_B_layout 'expert_major_v2'"
        ):
            register_adapter(session, adapter_id="adp_odd", name="odd", folder=odd, job_id=None)
        with pytest.raises(NotFound):
            find_adapter(session, "odd")
