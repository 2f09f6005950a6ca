"""Merge a LoRA adapter into 16-bit base weights (PEFT ``merge_and_unload``) and save the result as a
plain transformers model folder, written to a temp folder and renamed into place."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from app import adapter_folder
from app.ml.modeling import config_fingerprint, load_hf_model, load_tokenizer, resolve_model_path

DTYPES = ("bfloat16", "float16", "float32")


def check_fits(adapter_dir: Path, config: Any, base: str) -> None:
    """ValueError (`adapter_folder.BaseMismatch`) for an adapter trained on another architecture,
    FileNotFoundError for a folder without a manifest. Not strict: the user names the base, often by a
    local path that is not the recorded hub id, so only a recorded fingerprint is compared."""
    adapter_folder.check_base(
        Path(adapter_dir).name,
        adapter_folder.BaseRecord.of(adapter_folder.read_manifest(adapter_dir)),
        fingerprint=config_fingerprint(config),
        model=base,
        where=adapter_folder.SCRIPT,
        strict=False,
    )


def merge_adapter(
    adapter_dir: Path, out_dir: Path, *, models_dir: Path, base: str | None = None, dtype: str = "bfloat16"
) -> Path:
    """Load ``base`` (default: the adapter's manifest base) unquantised in ``dtype`` (MXFP4 experts of
    openai/gpt-oss-* dequantized, as for training), merge the adapter into it and save model +
    tokenizer + ``merged_from.json`` to ``out_dir``."""
    import torch
    from peft import PeftModel

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
    manifest = adapter_folder.read_manifest(adapter_dir)
    base = base or manifest["base_model"]
    path = resolve_model_path(base, models_dir)
    model = load_hf_model(path, load_in_4bit=False, dtype=getattr(torch, dtype))
    check_fits(adapter_dir, model.config, base)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return _save_atomically(merged, load_tokenizer(base, models_dir), manifest, Path(out_dir))


def _save_atomically(model: Any, tokenizer: Any, manifest: dict[str, Any], out_dir: Path) -> Path:
    """A merged model is no adapter folder, but is written the same way: staged, then renamed."""
    with adapter_folder.staged_folder(out_dir, replace=False) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "merged_from.json").write_text(json.dumps(manifest, indent=2, default=str))
    return out_dir
