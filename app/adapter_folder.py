"""The adapter folder: the one module that knows its layout, writes it, reads it, checks it, deletes it.

A folder is the PEFT weights + ``adapter_config.json``, the tokenizer, and ``manifest.json`` (what the
adapter was trained on and how). It is written into a temp folder beside its target and renamed into
place, so a reader sees a complete folder or none; it is deleted by a rename first, for the same
reason. The trainer, the worker, the registry, export and the inference cache all go through here.

Plain Python only at module level (no torch, FastAPI or SQLAlchemy): the trainer child, the worker and
the API all import it. Errors are this module's own; callers map them at their edge (the inference
side to NotFound / Conflict, the scripts let the FileNotFoundError / ValueError through).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
PEFT_CONFIG = "adapter_config.json"  # PEFT writes it beside the weights; no config, no adapter


class AdapterFolderError(Exception):
    """Base class of this module's errors."""


class IncompleteFolder(AdapterFolderError, FileNotFoundError):
    """The folder, its weights or its manifest is missing or unreadable. A FileNotFoundError, so
    callers that treat a missing file as the user's problem (the worker, the scripts) keep doing so."""


class BaseMismatch(AdapterFolderError, ValueError):
    """The adapter records another base model than the loaded one, or does not record one at all."""


class UnreadableLayout(AdapterFolderError, ValueError):
    """The LoRA weights are packed in a way this project cannot read or rewrite (app.ml.lora_layout)."""


# --- reading ---------------------------------------------------------------------------------------


def manifest_path(folder: Path) -> Path:
    return Path(folder) / MANIFEST


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest as a dict; IncompleteFolder when it is missing or not a JSON object."""
    path = manifest_path(folder)
    if not path.is_file():
        raise IncompleteFolder(
            f"{path} is missing: the adapter folder is incomplete "
            "(unfinished, deleted, or not written by this project)"
        )
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise IncompleteFolder(f"{path} is not valid JSON ({exc}); the adapter folder is damaged") from None
    if not isinstance(data, dict):
        raise IncompleteFolder(f"{path} is not a JSON object; the adapter folder is damaged")
    return data


def has_weights(folder: Path) -> bool:
    """PEFT's config is there (the weights beside it are PEFT's to check when it loads them)."""
    return (Path(folder) / PEFT_CONFIG).is_file()


def is_complete(folder: Path) -> bool:
    """Renamed into place by `write_adapter`: weights, config and manifest all there. The manifest is
    written last into the temp folder, and the rename is atomic, so this never sees half a write."""
    return has_weights(folder) and manifest_path(folder).is_file()


# --- the base model an adapter was trained on ------------------------------------------------------


@dataclass(frozen=True)
class BaseRecord:
    """Which base an adapter says it was trained on, and where it says so (for the error message)."""

    fingerprint: str | None
    model: str | None
    source: str = f"its {MANIFEST}"

    @classmethod
    def of(cls, manifest: dict[str, Any]) -> BaseRecord:
        fingerprint = manifest.get("base_fingerprint") or manifest.get("fingerprint")  # older manifests
        model = manifest.get("base_model")
        return cls(str(fingerprint) if fingerprint else None, str(model) if model else None)


def recorded_base(folder: Path) -> BaseRecord:
    """The base as the folder's own manifest records it: the files are the last word, not a registry
    row. A missing or unreadable manifest records nothing (and `check_base` refuses it for that)."""
    try:
        return BaseRecord.of(read_manifest(folder))
    except IncompleteFolder:
        return BaseRecord(None, None)


@dataclass(frozen=True)
class Where:
    """How a caller describes its loaded base and what it tells the user to do on a mismatch."""

    loaded: str  # followed by " '<model>' (fingerprint <12 hex>)"
    retry: str


SERVER = Where(
    "this server runs", "Serve it from a server running its base model, or retrain it on this one."
)
SCRIPT = Where(
    "the base loaded here is", "Leave --base out to use its own base model, or retrain it on this one."
)


def check_base(
    name: str,
    recorded: BaseRecord,
    *,
    fingerprint: str,
    model: str,
    where: Where = SERVER,
    strict: bool = True,
) -> None:
    """BaseMismatch unless the adapter was trained on the loaded base (fingerprint `fingerprint`,
    model id `model`).

    strict (serving): both the fingerprint and the model id must be recorded and equal. Applied to
    the wrong base, an adapter's deltas silently corrupt the answers rather than fail, so an adapter
    that does not say is refused too. Not strict (the scripts, where the user names the base, often by
    a local path that is not the recorded hub id): only a recorded fingerprint is compared."""
    loaded = f"{where.loaded} '{model}' (fingerprint {fingerprint[:12]})"
    if strict and (not recorded.fingerprint or not recorded.model):
        missing = "base_fingerprint" if not recorded.fingerprint else "base_model"
        raise BaseMismatch(
            f"adapter '{name}' does not record which base model it was trained for "
            f"({recorded.source} has no {missing}); {loaded}. "
            "Retrain it with this service so it can be checked."
        )
    other_fingerprint = bool(recorded.fingerprint) and recorded.fingerprint != fingerprint
    if other_fingerprint or (strict and recorded.model != model):
        raise BaseMismatch(
            f"adapter '{name}' was trained for another base model: '{recorded.model or '(not recorded)'}' "
            f"(fingerprint {(recorded.fingerprint or '')[:12]}); {loaded}. {where.retry}"
        )


# --- writing ---------------------------------------------------------------------------------------


@contextmanager
def staged_folder(target: Path, *, replace: bool) -> Iterator[Path]:
    """Yield a fresh temp folder beside `target`; on a clean exit rename it to `target` (replacing an
    existing one when `replace`, else FileExistsError up front). The temp folder is removed on any
    exit, and temp folders left by writers of `target` that died (SIGKILL runs no `finally`) are
    removed before this one is made. Also used for merged models (app.ml.export)."""
    target = Path(target)
    if target.exists() and not replace:
        raise FileExistsError(f"{target} already exists; choose a new folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if replace and target.exists():
            _remove(target)
        os.rename(tmp, target)  # not replace: fails (OSError) if a folder appeared there meanwhile
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_adapter(target: Path, save: Callable[[Path], None], manifest: dict[str, Any]) -> Path:
    """Write a complete adapter folder at `target` atomically: `save(folder)` writes the weights and
    tokenizer (e.g. ``save_pretrained``), then the manifest is added last. An existing `target` (a
    re-run of the CLI) is replaced."""
    with staged_folder(target, replace=True) as tmp:
        save(tmp)
        if not has_weights(tmp):
            raise IncompleteFolder(f"the adapter written for {target} has no {PEFT_CONFIG}")
        manifest_path(tmp).write_text(json.dumps(manifest, indent=2, default=str))
    return Path(target)


def _remove_stale_temps(target: Path) -> None:
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive, and not ours to clean
    return True


# --- registering and deleting ----------------------------------------------------------------------


def check_for_registration(folder: Path) -> dict[str, Any]:
    """The checks a finished folder passes before a registry row may point at it, and the work done
    on it once, there; returns its manifest. An expert LoRA is rewritten into PEFT's packing (what
    vLLM reads; a no-op for PEFT's own saves and current Unsloth ones), so every engine can rely on
    the layout of a registered folder. Whether vLLM can serve it (rank, modules) is the engine's
    check, at first use: it depends on the server's limits, not on the folder."""
    folder = Path(folder)
    if not has_weights(folder):
        raise IncompleteFolder(f"{folder / PEFT_CONFIG} is missing: the adapter folder is incomplete")
    manifest = read_manifest(folder)
    _normalize_lora_layout(folder)
    return manifest


def _normalize_lora_layout(folder: Path) -> None:
    from app.ml import lora_layout  # torch: imported only where an adapter is registered

    try:
        if lora_layout.has_expert_lora(lora_layout.read_config(folder)):
            lora_layout.normalize_adapter(folder)
    except lora_layout.AdapterLayoutError as exc:
        raise UnreadableLayout(f"adapter folder {folder}: {exc}") from exc


def delete(folder: Path) -> None:
    """Rename first, then delete: a reader sees the whole folder or none of it. A missing folder is
    already deleted (idempotent)."""
    folder = Path(folder)
    if folder.exists():
        _remove(folder)


def _remove(folder: Path) -> None:
    trash = folder.with_name(f".deleting-{folder.name}-{uuid.uuid4().hex[:8]}")
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)
