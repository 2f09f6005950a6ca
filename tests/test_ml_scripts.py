"""The command line: train.py, infer.py and the export (merge) path, on the tiny model."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from app.ml.export import merge_adapter
from app.ml.harmony import render_prompt
from app.ml.modeling import load_base, load_hf_model
from app.ml.tiny_model import ensure_tiny_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _script(name: str) -> ModuleType:
    """Load scripts/<name>.py as a module: the real CLI code, run in-process to skip a fresh
    interpreter's imports and tokenizer load."""
    spec = importlib.util.spec_from_file_location(f"cli_{name}", ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, models_dir: Path) -> Callable[..., int]:
    monkeypatch.setenv("GPTOSS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("GPTOSS_MODELS_DIR", str(models_dir))
    monkeypatch.chdir(ROOT)

    def run(name: str, *args: str) -> int:
        monkeypatch.setattr(sys, "argv", [f"{name}.py", *args])
        return int(_script(name).main())

    return run


def test_train_cli_writes_an_adapter(
    cli: Callable[..., int], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "outputs"
    sets = ["max_steps=2", "per_device_train_batch_size=2", "eval_dataset=null", "save_steps=2"]
    args = ["--config", "configs/train.yaml", "--output_dir", str(out)]
    assert cli("train", *args, *[a for s in sets for a in ("--set", s)]) == 0
    captured = capsys.readouterr()
    assert "backend hf; steps 2/2" in captured.out
    assert "loss=" in captured.err  # the tqdm bar shows the loss
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["hyperparameters"]["learning_rate"] == 5e-3  # cpu_overrides applied here
    assert (tmp_path / "data/train-cli/checkpoints/checkpoint-2").is_dir()


def test_train_cli_reports_bad_data(
    cli: Callable[..., int], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "bot", "content": "x"}]}\n')
    assert cli("train", "--config", "configs/train.yaml", "--set", f"dataset={bad}") == 2
    expected = "row 1, field 'messages[0].role': must be one of user, assistant, system, developer"
    assert expected in capsys.readouterr().err


def test_infer_cli_prints_reasoning_and_answer(
    cli: Callable[..., int], trained_adapter: Path, capsys: pytest.CaptureFixture
) -> None:
    args = [
        "--adapter",
        str(trained_adapter),
        "--user",
        "What is the capital of Peru?",
        "--max_new_tokens",
        "40",
    ]
    assert cli("infer", *args, "--reasoning_effort", "low") == 0
    out = capsys.readouterr().out
    assert "[base tiny-gpt-oss | backend hf" in out  # the base came from the adapter's manifest
    assert "reasoning: " in out and "answer: " in out


def test_infer_cli_explains_an_unreachable_base(cli: Callable[..., int], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        cli("infer", "--base", str(tmp_path / "no-such-model"), "--user", "hi")
    assert "cannot load base" in str(exc.value) and "--base tiny-gpt-oss" in str(exc.value)


def test_export_merges_adapter_into_base(trained_adapter: Path, models_dir: Path, tmp_path: Path) -> None:
    merged_dir = merge_adapter(trained_adapter, tmp_path / "merged", models_dir=models_dir, dtype="float32")
    assert (merged_dir / "merged_from.json").is_file() and (merged_dir / "tokenizer.json").is_file()
    ids = torch.tensor([render_prompt([{"role": "user", "content": "Capital of Japan?"}])])
    loaded = load_base("tiny-gpt-oss", backend="hf", models_dir=models_dir, for_training=False)
    with torch.inference_mode():
        base_logits = loaded.model(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(loaded.model, str(trained_adapter)).eval()
        expected = adapted(input_ids=ids).logits
        merged = load_base(str(merged_dir), backend="hf", models_dir=models_dir, for_training=False).model
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-3)
    assert not torch.allclose(got, base_logits, atol=1e-3)  # the merge changed the weights
    with pytest.raises(FileExistsError):
        merge_adapter(trained_adapter, merged_dir, models_dir=models_dir, dtype="float32")


def _mxfp4_tiny_model(models_dir: Path, folder: Path) -> Path:
    """The tiny model laid out as openai/gpt-oss-* ship: experts as MXFP4 ``*_blocks`` (two 4-bit
    values a byte, 32 per block) + ``*_scales`` (one power-of-two exponent a block), declared in
    config.json. Random blocks; scale 124 = 2**-3 keeps the weights small."""
    shutil.copytree(ensure_tiny_model(models_dir), folder)
    weights = load_file(str(folder / "model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    for name in [n for n in weights if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, rows, cols = weights.pop(name).shape  # stored transposed: [E, out, in/32, 16]
        shape = (experts, cols, rows // 32)
        weights[f"{name}_blocks"] = torch.randint(
            0, 256, (*shape, 16), dtype=torch.uint8, generator=generator
        )
        weights[f"{name}_scales"] = torch.full(shape, 124, dtype=torch.uint8)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_export_merges_into_an_mxfp4_base(trained_adapter: Path, models_dir: Path, tmp_path: Path) -> None:
    base = _mxfp4_tiny_model(models_dir, tmp_path / "mxfp4-base")
    merged_dir = merge_adapter(
        trained_adapter, tmp_path / "merged", models_dir=models_dir, base=str(base), dtype="float32"
    )
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    experts = load_file(str(merged_dir / "model.safetensors"))["model.layers.0.mlp.experts.gate_up_proj"]
    assert experts.dtype == torch.float32 and experts.shape == (4, 64, 128)  # plain weights, all saved
    ids = torch.tensor([render_prompt([{"role": "user", "content": "Capital of Japan?"}])])
    with torch.inference_mode():
        dequantized = load_hf_model(str(base), load_in_4bit=False, dtype=torch.float32)
        base_logits = dequantized(input_ids=ids).logits
        expected = PeftModel.from_pretrained(dequantized, str(trained_adapter)).eval()(input_ids=ids).logits
        got = load_hf_model(str(merged_dir), load_in_4bit=False)(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-3)
    assert not torch.allclose(got, base_logits, atol=1e-3)  # the adapter is in the merged weights
