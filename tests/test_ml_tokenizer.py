"""The offline o200k_harmony tokenizer: official file hash, real special ids, and agreement with
openai-harmony, quicktok and (where the local HF cache has it) the real gpt-oss-20b tokenizer."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import openai_harmony as oh
import pytest
import quicktok

from app.ml.modeling import load_tokenizer
from app.ml.tiny_model import ensure_tiny_model
from app.ml.tokenizer import (
    O200K_BASE_SHA256,
    SPECIAL_IDS,
    TIKTOKEN_FILENAME,
    ensure_harmony_assets,
)

TEXTS = [
    "Hello, world! The capital of France is Paris.",
    "Größe, 東京都, Москва, नमस्ते, 🙂🚀 — mixed scripts and emoji",
    "def f(x):\n    return x ** 2  # code\n\n\tTabs and   spaces",
    "numbers 1234567 and 3.14159, URLs https://example.com/a?b=c",
    "<|start|>user<|message|>Hi<|end|><|start|>assistant<|channel|>final<|message|>Yo<|return|>",
]


def _harmony() -> oh.HarmonyEncoding:
    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


def test_tiktoken_file_is_the_official_one(models_dir: Path) -> None:
    data = (ensure_harmony_assets(models_dir) / TIKTOKEN_FILENAME).read_bytes()
    assert hashlib.sha256(data).hexdigest() == O200K_BASE_SHA256


def test_special_tokens_keep_their_real_ids(models_dir: Path) -> None:
    tok = load_tokenizer(str(ensure_harmony_assets(models_dir)), models_dir)
    assert len(tok) == 201_088
    for name, token_id in SPECIAL_IDS.items():
        assert tok.convert_tokens_to_ids(name) == token_id, name
    assert tok.eos_token == "<|return|>" and tok.pad_token_id == 199_999


def test_offline_tokenizer_matches_harmony_and_quicktok(models_dir: Path) -> None:
    tok = load_tokenizer(str(ensure_harmony_assets(models_dir)), models_dir)
    harmony, qt = _harmony(), quicktok.get_encoding("o200k_harmony")
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == harmony.encode(text, allowed_special="all") == qt.encode(text, allowed_special="all")
        assert tok.decode(ids) == text


def test_all_special_ids_decode_like_harmony(models_dir: Path) -> None:
    tok = load_tokenizer(str(ensure_harmony_assets(models_dir)), models_dir)
    harmony = _harmony()
    # Id 200018 has two names; harmony prints <|reserved_200018|>, tiktoken and the hub tokenizer
    # <|endofprompt|>, which we keep.
    ids = [i for i in range(199_998, 201_088) if i != 200_018]
    assert tok.convert_ids_to_tokens(ids) == [harmony.decode([i]) for i in ids]
    assert tok.convert_ids_to_tokens(200_018) == "<|endofprompt|>"


def _cached_hub_tokenizer(repo_id: str) -> Path | None:
    """The hub tokenizer.json from the local HF cache only (never the network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "tokenizer.json")
    return Path(found) if isinstance(found, str) else None


def test_offline_tokenizer_equals_the_real_gpt_oss_tokenizer(models_dir: Path) -> None:
    """The offline build against openai/gpt-oss-20b's own tokenizer.json, where a local HF cache has
    it: same vocabulary (specials included) and same ids on every test text."""
    hub_file = _cached_hub_tokenizer("openai/gpt-oss-20b")
    if hub_file is None:
        pytest.skip("openai/gpt-oss-20b's tokenizer.json is not in the local HF cache (offline host)")
    from transformers import PreTrainedTokenizerFast

    real = PreTrainedTokenizerFast(tokenizer_file=str(hub_file))
    offline = load_tokenizer(str(ensure_harmony_assets(models_dir)), models_dir)
    assert real.get_vocab() == offline.get_vocab()
    for text in TEXTS:
        assert real.encode(text, add_special_tokens=False) == offline.encode(text, add_special_tokens=False)


def test_a_model_folder_brings_its_own_tokenizer(models_dir: Path, tmp_path: Path) -> None:
    """load_tokenizer prefers the tokenizer inside a model folder over the offline one: a folder
    with a (deliberately different, three-word) tokenizer.json gets that one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    own_tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    own_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    own_tokenizer.save(str(tmp_path / "tokenizer.json"))
    own = load_tokenizer(str(tmp_path), models_dir)
    assert Path(own.name_or_path).resolve() == tmp_path.resolve()
    assert own.encode("hello world", add_special_tokens=False) == [1, 2] and len(own) == 3
    tiny = load_tokenizer("tiny-gpt-oss", models_dir)  # the tiny model ships a copy of the offline one
    assert Path(tiny.name_or_path).resolve() == ensure_tiny_model(models_dir).resolve()


def test_folder_without_tokenizer_falls_back_to_offline(models_dir: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(str(tmp_path), models_dir)
    assert Path(tok.name_or_path).resolve() == ensure_harmony_assets(models_dir).resolve()


# Run in fresh interpreters that import only app.ml.tokenizer (fast), like an API and a worker
# starting at the same time.
_BUILDER = """
import sys, time
from pathlib import Path
from app.ml.tokenizer import atomic_build

def build(folder):
    (folder / "part1").write_text("a")
    time.sleep(0.5)  # widen the window in which all builders are mid-build
    (folder / "part2").write_text("b")

atomic_build(Path(sys.argv[1]), build)
"""


def test_concurrent_builds_leave_one_whole_folder(tmp_path: Path) -> None:
    target = tmp_path / "assets"
    procs = [subprocess.Popen([sys.executable, "-c", _BUILDER, str(target)]) for _ in range(3)]
    assert [p.wait(60) for p in procs] == [0, 0, 0]
    assert sorted(x.name for x in target.iterdir()) == ["part1", "part2"]
    assert [x.name for x in tmp_path.iterdir()] == ["assets"]  # no temp folders left behind
