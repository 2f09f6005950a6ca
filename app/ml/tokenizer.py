"""The real GPT-OSS tokenizer (o200k_harmony), built offline from the vocabulary `quicktok-v1` ships.

No hub access is needed: the BPE ranks come from quicktok, are written out as the official
``o200k_base.tiktoken`` file (checked against its published sha256), and transformers'
``TikTokenConverter`` turns that file into a ``tokenizer.json`` with every harmony special token at its
real id. The folder is built once per models directory and reused; where a model folder or hub id
brings its own tokenizer, that one is used instead (``app.ml.modeling.load_tokenizer``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

HARMONY_DIRNAME = "o200k_harmony"
TIKTOKEN_FILENAME = "o200k_base.tiktoken"
# sha256 of the official https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
N_MERGEABLE = 199_998  # ids 0..199,997 are byte-level BPE tokens; 199,998.. are specials
VOCAB_SIZE = 201_088
# tiktoken's o200k pre-tokenisation regex (tiktoken_ext.openai_public.o200k_base).
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
# The ids the harmony format relies on; tests check them against the built tokenizer.
SPECIAL_IDS = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
    "<|endofprompt|>": 200018,
}
_REQUIRED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", TIKTOKEN_FILENAME)


@lru_cache(maxsize=1)
def _quicktok() -> Any:
    import quicktok

    return quicktok.get_encoding("o200k_harmony")


def token_bytes(token_id: int) -> bytes:
    """The raw bytes of one token (may be part of a UTF-8 character)."""
    return bytes(_quicktok().decode_single_token_bytes(token_id))


def special_token_names() -> list[str]:
    """Names of ids 199,998..201,087 in id order. Id 200018 has two names in quicktok
    (`<|reserved_200018|>` and `<|endofprompt|>`); tiktoken and the hub tokenizer use `<|endofprompt|>`."""
    enc = _quicktok()
    by_id: dict[int, str] = {}
    for name in enc.special_tokens_set:
        token_id = enc.encode_single_token(name)
        if token_id not in by_id or name == "<|endofprompt|>":
            by_id[token_id] = name
    ids = sorted(by_id)
    assert ids == list(range(N_MERGEABLE, VOCAB_SIZE)), "quicktok specials are not contiguous"
    return [by_id[i] for i in ids]


def write_tiktoken_file(path: Path) -> str:
    """Write o200k_base.tiktoken (base64 bytes + rank per line) and return its sha256."""
    enc = _quicktok()
    lines = [
        base64.b64encode(enc.decode_single_token_bytes(i)).decode("ascii") + f" {i}\n"
        for i in range(N_MERGEABLE)
    ]
    data = "".join(lines).encode("ascii")
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _write_configs(folder: Path) -> None:
    # Same choices as the hub's openai/gpt-oss-20b tokenizer: generation ends on <|return|>,
    # padding uses <|endoftext|>.
    special_map = {"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
        **special_map,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))


def _build(folder: Path) -> None:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tiktoken_path = folder / TIKTOKEN_FILENAME
    digest = write_tiktoken_file(tiktoken_path)
    if digest != O200K_BASE_SHA256:
        raise RuntimeError(
            f"o200k_base.tiktoken rebuilt from quicktok has sha256 {digest}, expected {O200K_BASE_SHA256}; "
            "the installed quicktok-v1 is not the pinned 0.4.0"
        )
    # Specials are appended in order after the 199,998 BPE tokens, so they land on their real ids.
    converter = TikTokenConverter(
        vocab_file=str(tiktoken_path), pattern=O200K_PATTERN, extra_special_tokens=special_token_names()
    )
    converter.converted().save(str(folder / "tokenizer.json"))
    _write_configs(folder)


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


def atomic_build(target: Path, build: Any) -> Path:
    """Run ``build(tmp_folder)`` and rename the result to ``target``. Two processes may race: the
    first rename wins and the loser's copy is discarded, so readers only ever see a whole folder."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():  # a real failure, not a lost race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_harmony_assets(models_dir: Path) -> Path:
    """Build (once) ``<models_dir>/o200k_harmony/`` and point openai-harmony's loader at it."""
    folder = Path(models_dir) / HARMONY_DIRNAME
    if not _is_complete(folder):
        shutil.rmtree(folder, ignore_errors=True)  # a folder left incomplete by hand; rebuild it
        atomic_build(folder, _build)
    # openai-harmony looks for o200k_base.tiktoken here instead of downloading it.
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(folder.resolve())
    return folder


@lru_cache(maxsize=4)
def load_fast(folder: str) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(folder)


def has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file()
