"""LoRA adapters hot-loaded onto one shared base model, in a least-recently-used cache.

Only the engine thread calls into this class: PEFT's active adapter is global state on the model,
so loading, switching and deleting must never overlap a forward pass. Loads and unloads are
idempotent; the base model is the `None` adapter (PEFT's adapters switched off).
"""

from __future__ import annotations

import gc
import logging
import sys
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from app import adapter_folder
from app.exceptions import Conflict, NotFound
from app.inference.types import AdapterSpec

log = logging.getLogger(__name__)


def check_adapter_files(spec: AdapterSpec, base_fingerprint: str, base_model: str) -> None:
    """NotFound when the adapter's files are gone; Conflict unless both the registry row and the
    manifest on disk (the last word) say it was trained on exactly this base: same architecture
    fingerprint and same model id (`adapter_folder.check_base`, strict)."""
    if not adapter_folder.has_weights(spec.path):
        raise NotFound(f"adapter '{spec.name}' has no files at {spec.path} (deleted?)", field="adapter")
    # The row is checked for what it records; what it leaves out, the manifest must record.
    row_fingerprint, row_model = spec.fingerprint or base_fingerprint, spec.base_model or base_model
    if row_fingerprint != base_fingerprint or row_model != base_model:
        row_says = spec.base_model or "(not recorded)"
        row = adapter_folder.BaseRecord(row_fingerprint, row_says, "its registry row")
        _check_base(spec.name, row, base_fingerprint, base_model)
    _check_base(spec.name, adapter_folder.recorded_base(spec.path), base_fingerprint, base_model)


def _check_base(name: str, recorded: adapter_folder.BaseRecord, fingerprint: str, model: str) -> None:
    try:
        adapter_folder.check_base(name, recorded, fingerprint=fingerprint, model=model)
    except adapter_folder.BaseMismatch as err:
        raise Conflict(str(err), field="adapter") from None


class AdapterCache:
    def __init__(self, model: Any, *, capacity: int, pinned: set[str], fingerprint: str, base_model: str):
        self.base = model  # the plain model, as load_base returned it
        self.peft: Any = None  # a PeftModel wrapping `base` once the first adapter is loaded
        self.capacity = capacity
        self.pinned = pinned
        self.fingerprint = fingerprint
        self.base_model = base_model
        self.loaded: OrderedDict[str, AdapterSpec] = OrderedDict()  # least recently used first

    def ensure(self, spec: AdapterSpec) -> None:
        """Make `spec` loaded and most recently used, evicting the least recently used if full."""
        if spec.id in self.loaded:
            self.loaded.move_to_end(spec.id)
            return
        self._check_files(spec)
        self._make_room()
        self._load(spec)
        self.loaded[spec.id] = spec
        log.info("adapter loaded", extra={"adapter_id": spec.id, "cached": len(self.loaded)})

    def unload(self, adapter_id: str) -> bool:
        if adapter_id not in self.loaded:
            return False
        del self.loaded[adapter_id]
        if not self.loaded:
            # PEFT has no "zero adapters" state; strip the LoRA layers and serve the plain base again.
            self.base = self.peft.unload()
            self.peft = None
        else:
            with (
                warnings.catch_warnings()
            ):  # "was active ... setting active adapter to X": we set it per batch
                warnings.simplefilter("ignore", UserWarning)
                self.peft.delete_adapter(adapter_id)
        _free_memory()
        log.info("adapter unloaded", extra={"adapter_id": adapter_id})
        return True

    @contextmanager
    def activate(self, adapter_id: str | None) -> Iterator[Any]:
        """Yield the module to run for `adapter_id` (None = base). Only valid on the engine thread."""
        if self.peft is None:
            if adapter_id is not None:
                raise RuntimeError(f"adapter {adapter_id} is not loaded")
            yield self.base
        elif adapter_id is None:
            with self.peft.disable_adapter():
                yield self.peft
        else:
            self.peft.set_adapter(adapter_id)
            yield self.peft

    def _check_files(self, spec: AdapterSpec) -> None:
        # Checked again at load time: the files may have changed since the request was accepted.
        check_adapter_files(spec, self.fingerprint, self.base_model)

    def _make_room(self) -> None:
        while len(self.loaded) >= self.capacity:
            victim = next((a for a in self.loaded if a not in self.pinned), None)
            if victim is None:
                log.warning("adapter cache full of pinned adapters; growing past adapter_cache_size")
                return
            self.unload(victim)

    def _load(self, spec: AdapterSpec) -> None:
        from peft import PeftModel

        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, str(spec.path), adapter_name=spec.id)
            else:
                self.peft.load_adapter(str(spec.path), adapter_name=spec.id)
        except Exception as exc:
            self._discard_partial(spec.id)
            raise Conflict(f"adapter '{spec.name}' could not be loaded: {exc}", field="adapter") from exc
        if "unsloth" in sys.modules:  # Unsloth may load more of its MoE code with the first adapter
            from app.ml.unsloth_fixes import make_expert_lora_follow_active_adapter

            make_expert_lora_follow_active_adapter()
        self.peft.eval()

    def _discard_partial(self, adapter_id: str) -> None:
        """A load that failed half-way must leave no layers behind that a later forward would apply."""
        if self.peft is None or adapter_id not in self.peft.peft_config:
            return
        if self.loaded:
            self.peft.delete_adapter(adapter_id)
        else:
            self.base = self.peft.unload()
            self.peft = None


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
