"""app.adapter_folder on real folders: the atomic write, reading, the base check, deletion.

The adapters here are a stand-in PEFT config + weights file written by the test (no model is loaded:
this module never looks inside the weights); the trained ones go through it in test_ml_trainer.py,
test_worker_e2e.py and test_inference_engine.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app import adapter_folder as af

FP = "f" * 64
MANIFEST = {"base_model": "tiny-gpt-oss", "base_fingerprint": FP, "backend": "hf"}


def save_peft_files(folder: Path) -> None:
    (folder / af.PEFT_CONFIG).write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"weights")


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    return int(proc.stdout)


def test_write_puts_a_complete_folder_in_place(tmp_path: Path) -> None:
    target = tmp_path / "adapters/adp_1"
    assert af.write_adapter(target, save_peft_files, MANIFEST) == target
    assert af.is_complete(target) and af.read_manifest(target) == MANIFEST
    assert af.check_for_registration(target) == MANIFEST
    assert [p.name for p in target.parent.iterdir()] == ["adp_1"]  # no temp folder left


def test_write_replaces_an_existing_folder_whole(tmp_path: Path) -> None:
    target = tmp_path / "adp_1"
    af.write_adapter(target, save_peft_files, MANIFEST)
    (target / "stale.bin").write_bytes(b"old")
    af.write_adapter(target, save_peft_files, {**MANIFEST, "backend": "unsloth"})
    assert af.read_manifest(target)["backend"] == "unsloth" and not (target / "stale.bin").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["adp_1"]


def test_a_failed_write_leaves_neither_target_nor_temp(tmp_path: Path) -> None:
    target = tmp_path / "adp_1"

    def crash(folder: Path) -> None:
        (folder / af.PEFT_CONFIG).write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        af.write_adapter(target, crash, MANIFEST)
    with pytest.raises(af.IncompleteFolder, match="has no adapter_config.json"):
        af.write_adapter(target, lambda folder: None, MANIFEST)
    assert list(tmp_path.iterdir()) == []


def test_temp_folders_of_dead_writers_are_cleaned_live_ones_kept(tmp_path: Path) -> None:
    target = tmp_path / "adp_1"
    dead = tmp_path / f".adp_1.tmp-{dead_pid()}-0000abcd"
    live = tmp_path / f".adp_1.tmp-{os.getpid()}-0000ef01"  # this test's pid
    other = tmp_path / f".adp_2.tmp-{dead_pid()}-00001234"  # another target's: not this writer's to judge
    for folder in (dead, live, other):
        folder.mkdir()
        save_peft_files(folder)
    af.write_adapter(target, save_peft_files, MANIFEST)
    assert not dead.exists() and live.exists() and other.exists()


def test_staged_folder_without_replace_refuses_an_existing_target(tmp_path: Path) -> None:
    (tmp_path / "merged").mkdir()
    with (
        pytest.raises(FileExistsError, match="merged already exists"),
        af.staged_folder(tmp_path / "merged", replace=False),
    ):
        pass


def test_reading_an_incomplete_folder_says_so(tmp_path: Path) -> None:
    folder = tmp_path / "adp_1"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json is missing: the adapter folder is incomplete"):
        af.read_manifest(folder)
    (folder / af.MANIFEST).write_text("{half")
    with pytest.raises(af.IncompleteFolder, match="not valid JSON"):
        af.read_manifest(folder)
    (folder / af.MANIFEST).write_text("[1]")
    with pytest.raises(af.IncompleteFolder, match="not a JSON object"):
        af.read_manifest(folder)
    assert af.recorded_base(folder) == af.BaseRecord(None, None)  # unreadable records nothing
    (folder / af.MANIFEST).write_text(json.dumps(MANIFEST))
    assert not af.is_complete(folder)  # a manifest without PEFT's files is no adapter
    with pytest.raises(af.IncompleteFolder, match="adapter_config.json is missing"):
        af.check_for_registration(folder)


def test_base_check_strict_needs_both_recorded_and_equal() -> None:
    def check(fingerprint: str | None, model: str | None) -> None:
        af.check_base("a", af.BaseRecord(fingerprint, model), fingerprint=FP, model="tiny-gpt-oss")

    check(FP, "tiny-gpt-oss")
    other = r"another base model: 'tiny-gpt-oss' \(fingerprint eeeeeeeeeeee\)"
    with pytest.raises(af.BaseMismatch, match=other):
        check("e" * 64, "tiny-gpt-oss")
    with pytest.raises(ValueError, match="another base model: 'acme/x'.*this server runs 'tiny-gpt-oss'"):
        check(FP, "acme/x")
    with pytest.raises(af.BaseMismatch, match="its manifest.json has no base_fingerprint"):
        check(None, "tiny-gpt-oss")
    with pytest.raises(af.BaseMismatch, match="its manifest.json has no base_model"):
        check(FP, None)


def test_base_check_for_scripts_compares_a_recorded_fingerprint_only() -> None:
    def check(fingerprint: str | None, model: str | None) -> None:
        recorded = af.BaseRecord(fingerprint, model)
        af.check_base("a", recorded, fingerprint=FP, model="/models/x", where=af.SCRIPT, strict=False)

    check(FP, "tiny-gpt-oss")  # the base given by path, the manifest names its hub id: same architecture
    check(None, None)
    with pytest.raises(ValueError, match="the base loaded here is '/models/x'.*Leave --base out"):
        check("e" * 64, "tiny-gpt-oss")


def test_delete_renames_then_removes_and_is_idempotent(tmp_path: Path) -> None:
    target = tmp_path / "adp_1"
    af.write_adapter(target, save_peft_files, MANIFEST)
    af.delete(target)
    af.delete(target)
    assert list(tmp_path.iterdir()) == []
