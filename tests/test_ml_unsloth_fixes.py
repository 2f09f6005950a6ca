"""The patch that makes Unsloth's expert-LoRA lookup follow the active adapter (app/ml/unsloth_fixes.py).

Unsloth cannot be installed here (no CUDA), so its module is stood in for by one that reproduces the
lookup's adapter choice exactly as unsloth_zoo 2026.10.9 makes it (the default name "default", else
the first key of ``lora_A``). The wrappers it reads are real: PEFT ``ParamWrapper`` layers on the tiny
GPT-OSS's expert parameters, with two adapters. The patched lookup under real Unsloth is checked on
the GPU by tests/test_gpu.py (each adapter answers its own task with both resident).
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from app.ml.modeling import EXPERT_TARGETS
from app.ml.tiny_model import tiny_config
from app.ml.unsloth_fixes import active_expert_adapter, make_expert_lora_follow_active_adapter


def _unsloth_lookup(wrapper: Any, adapter_name: str = "default", experts_module: Any = None) -> Any:
    """Unsloth's adapter choice in _extract_lora_from_wrapper (moe_utils.py), returning A's weight."""
    if not getattr(wrapper, "lora_A", None):
        return None
    if adapter_name not in wrapper.lora_A:
        adapter_name = list(wrapper.lora_A.keys())[0]
    return wrapper.lora_A[adapter_name].weight


_unsloth_lookup.__name__ = "_extract_lora_from_wrapper"


@pytest.fixture
def standin() -> Iterator[types.ModuleType]:
    module = types.ModuleType("unsloth_standin_moe_utils")
    module._extract_lora_from_wrapper = _unsloth_lookup  # type: ignore[attr-defined]
    module._get_moe_lora_weights = _unsloth_lookup  # type: ignore[attr-defined]  # Unsloth's alias
    sys.modules[module.__name__] = module
    yield module
    del sys.modules[module.__name__]


@pytest.fixture(scope="module")
def two_adapters() -> Any:
    """The tiny GPT-OSS with two LoRA adapters on attention and experts, different random weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssForCausalLM

    torch.manual_seed(0)
    config = tiny_config()
    config.vocab_size, config.pad_token_id = 512, 0  # the vocabulary plays no part here
    model = GptOssForCausalLM(config)
    lora = LoraConfig(
        r=4, target_modules=["q_proj"], target_parameters=EXPERT_TARGETS, init_lora_weights=False
    )
    peft = get_peft_model(model, lora, adapter_name="first")
    peft.add_adapter("second", lora)
    return peft


def _expert_wrappers(peft: Any) -> list[Any]:
    from peft.tuners.lora.layer import ParamWrapper

    return [m for m in peft.modules() if isinstance(m, ParamWrapper)]


def test_unpatched_lookup_serves_the_first_adapter_whichever_is_active(
    two_adapters: Any, standin: types.ModuleType
) -> None:
    """The bug as seen on the H200: with "second" active, the lookup still returns "first"."""
    wrapper = _expert_wrappers(two_adapters)[0]
    two_adapters.set_adapter("second")
    assert wrapper.active_adapters == ["second"]
    assert standin._extract_lora_from_wrapper(wrapper) is wrapper.lora_A["first"].weight


def test_patched_lookup_follows_set_adapter(two_adapters: Any, standin: types.ModuleType) -> None:
    wrappers = _expert_wrappers(two_adapters)
    assert len(wrappers) == 2 * tiny_config().num_hidden_layers  # gate_up_proj and down_proj per layer
    assert make_expert_lora_follow_active_adapter() == "patched"
    lookup = standin._extract_lora_from_wrapper
    assert standin._get_moe_lora_weights is lookup  # both names patched, with one wrapper
    for active in ["second", "first", "second"]:
        two_adapters.set_adapter(active)
        for wrapper in wrappers:
            assert lookup(wrapper) is wrapper.lora_A[active].weight
    # a caller that names the adapter (Unsloth's routed decode path) is left as it asked
    assert lookup(wrappers[0], "first") is wrappers[0].lora_A["first"].weight
    # idempotent: a second call (after every adapter load) does not wrap the wrapper
    assert make_expert_lora_follow_active_adapter() == "patched"
    assert standin._extract_lora_from_wrapper is lookup


def test_an_adapter_without_expert_lora_gets_none_not_another_adapters() -> None:
    """An active adapter with LoRA on attention only: the experts must run plain, where Unsloth's
    lookup would hand them the other adapter's expert LoRA."""
    from app.ml.unsloth_fixes import _follow_active

    wrapper = types.SimpleNamespace(
        lora_A={"experts_adapter": types.SimpleNamespace(weight=torch.ones(1))},
        active_adapters=["attention_only_adapter"],
    )
    assert _unsloth_lookup(wrapper) is wrapper.lora_A["experts_adapter"].weight
    assert _follow_active(_unsloth_lookup)(wrapper) is None
    assert active_expert_adapter(wrapper, "experts_adapter") == "experts_adapter"  # named: as asked


def test_absent_when_unsloth_is_not_loaded() -> None:
    assert not any(name.startswith("unsloth") for name in sys.modules)
    assert make_expert_lora_follow_active_adapter() == "absent"


def test_engine_keeps_one_adapter_on_unsloth_unless_the_patch_applies(
    tmp_path: Path, models_dir: Path, standin: types.ModuleType
) -> None:
    from app.inference.engine import InferenceEngine
    from tests.fixtures_inference import inference_settings

    many = {"adapter_cache_size": 4, "pinned_adapters": ["adp_a"]}
    engine = InferenceEngine(inference_settings(tmp_path / "data", models_dir, **many))
    assert engine._cache_policy("unsloth") == (4, {"adp_a"})  # the lookup is patched
    off = inference_settings(tmp_path / "data", models_dir, unsloth_multi_adapter=False, **many)
    assert InferenceEngine(off)._cache_policy("unsloth") == (1, set())
    assert InferenceEngine(off)._cache_policy("hf") == (4, {"adp_a"})
