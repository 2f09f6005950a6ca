"""GPU tests (`pytest -m gpu`, skipped without CUDA): the Unsloth backend, 4-bit loading, LoRA on
attention and experts, adapter hot-load and switch, and mixed-adapter traffic, through the project's
own code on a small random GPT-OSS (4 layers sliding/full, sinks, 8 experts top-4, the real 201,088
vocabulary; bench/models.py). The full-size 20B path is proven by the end-to-end service run
(bench/gpu_e2e.py). The H200 runs' output is kept under bench/results/ (latest:
2026-11-28-h200-session3/call3/gpu-tests.txt, 10 of 10 passed).

The adapters are trained by `app.ml.trainer.train` exactly as a worker job does, on the inference
tests' two tasks (the same French question answered "Paris." or "Europe."), so each adapter's own
answer identifies it: that check survives the float differences 4-bit kernels show between batch
shapes, where exact token equality (asserted by the CPU engine tests) need not.

With two adapters resident, unpatched Unsloth 2026.10.9 serves the expert LoRA of the adapter loaded
first (H200, 2026-11-28: the second adapter answered like the first). The engine patches Unsloth's
lookup to follow the active adapter (app/ml/unsloth_fixes.py); the generation tests below run with
both adapters resident, and one test runs the one-adapter fallback.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

STEPS = 24  # the random base learns a fixed one-line answer in about a dozen steps; twice that for margin


def _greedy(max_new_tokens: int = 16) -> Any:
    from app.inference.types import SamplingParams

    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)


@pytest.fixture(scope="module")
def mini_model(models_dir: Path) -> Path:
    from bench.models import ensure_random_model

    return ensure_random_model(models_dir, full=False)


def _train(task: str, root: Path, base: Path, models_dir: Path) -> Any:
    from app.ml.trainer import TrainConfig
    from tests.fixtures_inference import TrainedAdapter, _task_rows
    from tests.fixtures_ml import train_recorded

    data = root / f"{task}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _task_rows(task)))
    cfg = TrainConfig.model_validate(
        {
            "base_model": str(base),
            "backend": "unsloth",
            "load_in_4bit": True,
            "dataset": str(data),
            "lora_r": 16,
            "lora_alpha": 64,
            "max_grad_norm": 0.5,
            "max_steps": STEPS,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "learning_rate": 5e-3,
            "warmup_steps": 0,
            "save_steps": 1000,
            "max_seq_length": 256,
        }
    )
    result, hooks = train_recorded(cfg, root / task, models_dir)
    assert result.adapter_dir is not None and result.backend == "unsloth"
    # Unsloth's own loss (the model's forward with labels), not TRL's fused head: see loss_path
    assert any("loss computed on the 'model' path" in line for line in hooks.lines)
    losses = [loss for _, loss in hooks.losses]
    assert len(losses) == STEPS and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 1.0, losses
    return TrainedAdapter(task, result.adapter_dir, result.manifest)


@pytest.fixture(scope="module")
def gpu_adapters(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, mini_model: Path
) -> dict[str, Any]:
    """{"capitals": ..., "continents": ...}: two adapters trained on the GPU with the Unsloth backend."""
    from tests.fixtures_inference import ANSWERS

    root = tmp_path_factory.mktemp("gpu-adapters")
    return {task: _train(task, root, mini_model, models_dir) for task in ANSWERS}


def _unsloth_settings(root: Path, models_dir: Path, mini_model: Path, **overrides: Any) -> Any:
    """Engine settings serving the mini model from Unsloth in 4-bit."""
    from tests.fixtures_inference import inference_settings

    return inference_settings(
        root / "data",
        models_dir,
        base_model=str(mini_model),
        backend="unsloth",
        load_in_4bit=True,
        **overrides,
    )


@pytest.fixture(scope="module")
def gpu_engine(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, mini_model: Path) -> Iterator[Any]:
    """The inference engine serving the mini model from Unsloth in 4-bit."""
    from app.inference.engine import InferenceEngine

    root = tmp_path_factory.mktemp("gpu-engine")
    settings = _unsloth_settings(root, models_dir, mini_model, max_batch_size=16)
    engine = InferenceEngine(settings)
    engine.start()
    yield engine
    engine.close()


def _spec(engine: Any, adapter: Any) -> Any:
    from app.inference.types import AdapterSpec

    return AdapterSpec(f"adp_{adapter.task}", adapter.task, adapter.path, engine.fingerprint)


def _prompt(question: str | None = None) -> list[int]:
    from app.ml.harmony import render_prompt
    from tests.fixtures_inference import DEVELOPER, QUESTION

    turns = [{"role": "user", "content": question or QUESTION}]
    return render_prompt(turns, developer=DEVELOPER, reasoning_effort="low")


def _run(engine: Any, ids: list[int], spec: Any) -> list[int]:
    from app.inference.stream import CollectingSink

    sink = CollectingSink()
    engine.submit(ids, _greedy(), sink, spec)
    return sink.wait()


def _content(tokens: list[int]) -> str:
    from app.ml.harmony import parse_completion

    return parse_completion(tokens).content.strip()


# --- loading ---------------------------------------------------------------------------------------


def test_engine_loads_the_base_in_4bit_with_unsloth(gpu_engine: Any) -> None:
    import bitsandbytes as bnb

    loaded = gpu_engine._loaded  # the engine exposes no model on purpose; the test looks inside
    assert loaded.backend == "unsloth"
    projections = [
        m for n, m in loaded.model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
    ]
    assert len(projections) == 4 * loaded.model.config.num_hidden_layers
    for module in projections:
        assert isinstance(module, bnb.nn.Linear4bit)
        assert module.weight.quant_state is not None  # really quantised, not a bf16 weight in a 4-bit class
        assert module.weight.dtype == torch.uint8
    assert next(loaded.model.parameters()).device.type == "cuda"


# --- training --------------------------------------------------------------------------------------


def test_unsloth_job_trains_lora_on_attention_and_experts_only(gpu_adapters: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    for adapter in gpu_adapters.values():
        assert adapter.manifest["backend"] == "unsloth"
        weights = load_file(str(adapter.path / "adapter_model.safetensors"))
        assert all("lora_" in name for name in weights), "the adapter must hold LoRA weights only"
        attention_b = [t for n, t in weights.items() if "q_proj" in n and "lora_B" in n]
        expert = [n for n in weights if "experts" in n]
        assert attention_b and expert, sorted(weights)[:8]
        # LoRA B starts at zero: non-zero B means the step updates reached the adapter
        assert all(t.abs().max() > 0 for t in attention_b)
        expert_b = [t for n, t in weights.items() if "experts" in n and "lora_B" in n]
        assert expert_b and all(t.abs().max() > 0 for t in expert_b)


def test_checkpoints_kept_on_the_gpu_train_exactly_as_offloaded_ones(
    tmp_path: Path, models_dir: Path, mini_model: Path
) -> None:
    """``offload_checkpoints`` only moves where the checkpointed activations wait (CPU RAM for
    Unsloth's "unsloth" mode, the GPU for standard checkpointing): the same rows in the same order
    must give the same losses. max_seq_length 512: below it Unsloth uses standard checkpointing
    whatever it is asked."""
    from app.ml.trainer import TrainConfig
    from tests.fixtures_inference import _task_rows
    from tests.fixtures_ml import train_recorded

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _task_rows("capitals")))
    losses = {}
    for offload in (True, False):
        cfg = TrainConfig(
            base_model=str(mini_model),
            backend="unsloth",
            dataset=str(data),
            max_steps=3,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=1,
            warmup_steps=0,
            learning_rate=5e-3,
            max_seq_length=512,
            shuffle=False,
            offload_checkpoints=offload,
        )
        _, hooks = train_recorded(cfg, tmp_path / f"offload-{offload}", models_dir)
        losses[offload] = [loss for _, loss in hooks.losses]
    assert len(losses[True]) == 3
    assert losses[False] == pytest.approx(losses[True], rel=2e-3), losses


def test_hot_loaded_adapter_reproduces_the_trained_model(
    tmp_path: Path, models_dir: Path, mini_model: Path
) -> None:
    """Logits of the model as trained == logits after saving and hot-loading onto a fresh 4-bit base
    (Unsloth's own expert-LoRA layout must survive the round trip)."""
    from app.inference.adapters import AdapterCache
    from app.inference.types import AdapterSpec
    from app.ml.modeling import ATTENTION_TARGETS, EXPERT_TARGETS, apply_lora, load_base

    kw: dict[str, Any] = {
        "backend": "unsloth",
        "load_in_4bit": True,
        "max_seq_length": 256,
        "models_dir": models_dir,
    }
    trained = apply_lora(
        load_base(str(mini_model), for_training=True, **kw),
        r=8,
        alpha=32,
        dropout=0.0,
        target_modules=ATTENTION_TARGETS,
        target_parameters=EXPERT_TARGETS,
        seed=0,
        gradient_checkpointing=True,
    )
    ids = torch.tensor([_prompt()], device="cuda")
    opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=2e-3)
    trained.train()
    for _ in range(4):
        trained(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    trained.eval()
    with torch.no_grad():
        expected = trained(input_ids=ids).logits.float()
    trained.save_pretrained(str(tmp_path / "adapter"))
    del trained, opt
    torch.cuda.empty_cache()

    base = load_base(str(mini_model), for_training=False, **kw)
    # the manifest a job writes: the cache refuses an adapter that does not name this base
    manifest = {"base_model": "mini", "base_fingerprint": base.fingerprint}
    (tmp_path / "adapter/manifest.json").write_text(json.dumps(manifest))
    cache = AdapterCache(
        base.model, capacity=2, pinned=set(), fingerprint=base.fingerprint, base_model="mini"
    )
    cache.ensure(AdapterSpec("adp_rt", "rt", tmp_path / "adapter", None))
    with torch.inference_mode():
        with cache.activate("adp_rt") as model:
            hot = model(input_ids=ids).logits.float()
        with cache.activate(None) as model:
            plain = model(input_ids=ids).logits.float()
    error = (hot - expected).norm() / expected.norm()
    moved = (plain - expected).norm() / expected.norm()
    assert error < 0.05, f"hot-loaded adapter differs from the trained one by {error:.3f}"
    assert moved > 5 * error, f"training moved the logits by {moved:.3f} only; the check would be vacuous"


# --- generation ------------------------------------------------------------------------------------


def test_engine_patches_unsloths_expert_lora_lookup(gpu_engine: Any) -> None:
    from app.ml.unsloth_fixes import make_expert_lora_follow_active_adapter

    assert make_expert_lora_follow_active_adapter() == "patched"
    assert gpu_engine._cache.capacity == gpu_engine.settings.adapter_cache_size > 1


def test_each_adapter_answers_its_own_task(gpu_engine: Any, gpu_adapters: dict[str, Any]) -> None:
    from tests.fixtures_inference import ANSWERS

    base = _content(_run(gpu_engine, _prompt(), None))
    for _ in range(2):  # the second round with both adapters resident
        for task, adapter in gpu_adapters.items():
            reply = _content(_run(gpu_engine, _prompt(), _spec(gpu_engine, adapter)))
            assert reply.startswith(ANSWERS[task]), (task, reply)
    assert {f"adp_{task}" for task in ANSWERS} <= set(gpu_engine.loaded_adapters())
    assert not base.startswith(tuple(ANSWERS.values()))


def test_one_adapter_fallback_answers_each_task(
    tmp_path: Path, models_dir: Path, mini_model: Path, gpu_adapters: dict[str, Any]
) -> None:
    """unsloth_multi_adapter=false: one adapter resident, reloaded on every switch."""
    from app.inference.engine import InferenceEngine
    from tests.fixtures_inference import ANSWERS

    settings = _unsloth_settings(tmp_path, models_dir, mini_model, unsloth_multi_adapter=False)
    engine = InferenceEngine(settings)
    engine.start()
    try:
        for task in ["capitals", "continents", "capitals"]:
            reply = _content(_run(engine, _prompt(), _spec(engine, gpu_adapters[task])))
            assert reply.startswith(ANSWERS[task]) and len(engine.loaded_adapters()) == 1, (task, reply)
    finally:
        engine.close()


def test_switching_adapters_back_and_forth_gives_identical_answers(
    gpu_engine: Any, gpu_adapters: dict[str, Any]
) -> None:
    order = ["capitals", "continents", None, "capitals", None, "continents", "capitals"]
    seen: dict[str | None, set[tuple[int, ...]]] = {}
    for task in order:
        spec = _spec(gpu_engine, gpu_adapters[task]) if task else None
        seen.setdefault(task, set()).add(tuple(_run(gpu_engine, _prompt(), spec)))
    assert all(len(outputs) == 1 for outputs in seen.values()), seen  # same shapes: bit-identical
    assert len({next(iter(outputs)) for outputs in seen.values()}) == 3


def test_concurrent_mixed_adapter_requests_each_get_their_own_adapter(
    gpu_engine: Any, gpu_adapters: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from app.inference.stream import CollectingSink
    from tests.fixtures_inference import ANSWERS

    questions = [None, "Name the capital city of France.", "What is the capital of France, please?"]
    # every (adapter, question) pair twice, shuffled: each adapter meets its trained question
    jobs = [(task, q) for task in [*ANSWERS, None] for q in questions] * 2
    random.Random(3).shuffle(jobs)
    solo = [_run(gpu_engine, _prompt(q), _spec(gpu_engine, gpu_adapters[t]) if t else None) for t, q in jobs]
    sinks = [CollectingSink() for _ in jobs]
    for (task, question), sink in zip(jobs, sinks, strict=True):
        spec = _spec(gpu_engine, gpu_adapters[task]) if task else None
        gpu_engine.submit(_prompt(question), _greedy(), sink, spec)
    together = [sink.wait() for sink in sinks]
    for (task, question), tokens in zip(jobs, together, strict=True):
        if task is None:
            assert not _content(tokens).startswith(tuple(ANSWERS.values()))
        elif question is None:  # the trained question: the adapter's own answer, never the other's
            assert _content(tokens).startswith(ANSWERS[task])
    same = sum(a == b for a, b in zip(together, solo, strict=True))
    with capsys.disabled():
        print(
            f"\nconcurrent vs solo: {same}/{len(jobs)} replies token-identical (4-bit kernels vary by batch)"
        )


def test_unloading_an_adapter_leaves_the_base_and_the_other_adapter_intact(
    gpu_engine: Any, gpu_adapters: dict[str, Any]
) -> None:
    from tests.fixtures_inference import ANSWERS

    capitals, continents = (_spec(gpu_engine, gpu_adapters[t]) for t in ("capitals", "continents"))
    base_before = _run(gpu_engine, _prompt(), None)
    _run(gpu_engine, _prompt(), capitals)
    _run(gpu_engine, _prompt(), continents)
    gpu_engine.unload(capitals.id)
    assert capitals.id not in gpu_engine.loaded_adapters()
    assert _run(gpu_engine, _prompt(), None) == base_before
    assert _content(_run(gpu_engine, _prompt(), continents)).startswith(ANSWERS["continents"])
    assert _content(_run(gpu_engine, _prompt(), capitals)).startswith(ANSWERS["capitals"])  # loads again
