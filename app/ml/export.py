"""Merge a LoRA adapter into 16-bit base weights (PEFT ``merge_and_unload``) and save the result as a
plain transformers model folder, written to a temp folder and renamed into place."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from app.ml.modeling import config_fingerprint, load_hf_model, load_tokenizer, resolve_model_path

DTYPES = ("bfloat16", "float16", "float32")


def read_manifest(adapter_dir: Path) -> dict[str, Any]:
    path = Path(adapter_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{adapter_dir} has no manifest.json; is it an adapter folder from this project?"
        )
    return dict(json.loads(path.read_text()))


def check_fits(manifest: dict[str, Any], config: Any, base: str) -> None:
    """Refuse an adapter trained for another architecture."""
    expected = manifest.get("base_fingerprint")
    if expected and expected != config_fingerprint(config):
        raise ValueError(
            f"adapter was trained on {manifest.get('base_model')!r} (fingerprint {expected[:12]}), "
            f"which does not match base {base!r}"
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
    manifest = read_manifest(adapter_dir)
    base = base or manifest["base_model"]
    path = resolve_model_path(base, models_dir)
    model = load_hf_model(path, load_in_4bit=False, dtype=getattr(torch, dtype))
    check_fits(manifest, model.config, base)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return _save_atomically(merged, load_tokenizer(base, models_dir), manifest, Path(out_dir))


def _save_atomically(model: Any, tokenizer: Any, manifest: dict[str, Any], out_dir: Path) -> Path:
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; choose a new --out folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "merged_from.json").write_text(json.dumps(manifest, indent=2, default=str))
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
