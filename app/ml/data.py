"""Training data: load rows from a bundled sample, a JSONL file or the hub; validate; tokenise.

Two row schemas are accepted and normalised to one ``Example``:

- chat: ``{"messages": [{"role", "content", "thinking"?}, ...], "developer"?, "reasoning_effort"?}``
  (HuggingFaceH4/Multilingual-Thinking rows carry ``messages`` in this shape, with the reasoning in
  the assistant's ``thinking`` and the reasoning language in a leading system message);
- flat Multilingual-Thinking columns: ``user``, ``final``, optional ``analysis``, ``developer``,
  ``reasoning_language``.

Every problem is a ``DatasetError`` naming the row (1-based), the field and why.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from app.ml.harmony import REASONING_EFFORTS

SAMPLES_DIR = Path(__file__).parent / "samples"
ROLES = ("user", "assistant", "system", "developer")
EFFORTS = REASONING_EFFORTS


class DatasetError(ValueError):
    """A bad dataset; ``row`` is 1-based (0 = the file as a whole)."""

    def __init__(self, row: int, field: str, reason: str) -> None:
        self.row, self.field, self.reason = row, field, reason
        where = f"row {row}, field '{field}'" if row else f"field '{field}'"
        super().__init__(f"{where}: {reason}")


@dataclass
class Example:
    messages: list[dict[str, Any]]
    developer: str | None = None
    reasoning_effort: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


# --- loading ---------------------------------------------------------------------------------------


def sample_names() -> list[str]:
    return sorted(p.name.removesuffix(".jsonl") for p in SAMPLES_DIR.glob("*.jsonl"))


def _resolve_path(source: str, data_dir: Path | None) -> Path:
    if source.startswith("sample:"):
        name = source.removeprefix("sample:")
        path = SAMPLES_DIR / f"{name}.jsonl"
        if name not in sample_names():  # a name, never a path ("sample:../x" reads nothing)
            raise DatasetError(
                0, "dataset", f"no bundled sample named {name!r}; choose one of {sample_names()}"
            )
        return path
    path = Path(source).expanduser()
    if data_dir is not None and not path.is_absolute() and (Path(data_dir) / path).is_file():
        path = Path(data_dir) / path
    if not path.is_file():
        raise DatasetError(
            0, "dataset", f"file {source!r} not found (give a JSONL path, sample:<name> or hf:<id>)"
        )
    return path


def _read_jsonl(path: Path, *, max_rows: int, max_bytes: int) -> list[dict]:
    size = path.stat().st_size
    if size > max_bytes:
        raise DatasetError(0, "dataset", f"file is {size} bytes, more than the limit of {max_bytes} bytes")
    rows: list[dict] = []
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            if len(rows) >= max_rows:
                raise DatasetError(number, "dataset", f"more than the limit of {max_rows} rows")
            rows.append(_parse_row(raw, number))
    return rows


def _parse_row(raw: bytes, number: int) -> Any:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(
            number, "(encoding)", f"not UTF-8: byte 0x{raw[exc.start]:02x} at byte {exc.start + 1}"
        ) from None
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(number, "(json)", f"not valid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:  # json's C decoder recurses once per nesting level
        raise DatasetError(number, "(json)", "nested too deeply to be a chat row") from None


def _load_hub(dataset_id: str, *, max_rows: int) -> list[dict]:
    try:
        from datasets import load_dataset

        ds = load_dataset(dataset_id, split="train")
    except Exception as exc:  # no network, unknown id, gated...
        raise DatasetError(0, "dataset", f"could not load hub dataset {dataset_id!r}: {exc}") from None
    if len(ds) > max_rows:
        raise DatasetError(0, "dataset", f"{len(ds)} rows, more than the limit of {max_rows} rows")
    return [dict(row) for row in ds]


def load_rows(source: str, *, data_dir: Path | None, max_rows: int, max_bytes: int) -> list[dict]:
    """Raw rows from ``sample:<name>``, a JSONL path (relative paths try ``data_dir`` first) or
    ``hf:<dataset id>`` (connected hosts only)."""
    if source.startswith("hf:"):
        return _load_hub(source.removeprefix("hf:"), max_rows=max_rows)
    return _read_jsonl(_resolve_path(source, data_dir), max_rows=max_rows, max_bytes=max_bytes)


# --- validation ------------------------------------------------------------------------------------


def _optional_str(row: dict, key: str, number: int, prefix: str = "") -> str | None:
    value = row.get(key)
    if value is not None and not isinstance(value, str):
        raise DatasetError(number, f"{prefix}{key}", f"must be a string, got {type(value).__name__}")
    return value


def _check_message(msg: Any, number: int, index: int) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(msg, dict):
        raise DatasetError(
            number, where, f"must be an object with role and content, got {type(msg).__name__}"
        )
    role = msg.get("role")
    if role not in ROLES:
        raise DatasetError(number, f"{where}.role", f"must be one of {', '.join(ROLES)}")
    content = msg.get("content")
    if not isinstance(content, str):
        raise DatasetError(number, f"{where}.content", "must be a string")
    thinking = _optional_str(msg, "thinking", number, f"{where}.")
    return {"role": role, "content": content, "thinking": thinking or None}


def _chat_example(row: dict, number: int) -> Example:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise DatasetError(number, "messages", "must be a non-empty list of messages")
    checked = [_check_message(m, number, i) for i, m in enumerate(messages)]
    assistants = [i for i, m in enumerate(checked) if m["role"] == "assistant"]
    if not assistants:
        raise DatasetError(number, "messages", "needs at least one assistant message to learn from")
    if not checked[assistants[-1]]["content"].strip():
        raise DatasetError(
            number, f"messages[{assistants[-1]}].content", "the last assistant answer is empty"
        )
    if not any(m["role"] == "user" for m in checked[: assistants[0]]):
        raise DatasetError(number, "messages", "needs a user message before the first assistant message")
    developer = _optional_str(row, "developer", number)
    if any(m["role"] in ("system", "developer") for m in checked):
        # Multilingual-Thinking repeats its `developer` column inside the system message; the
        # messages win so the instructions are not rendered twice.
        developer = None
    return Example(checked, developer=developer)


def _flat_example(row: dict, number: int) -> Example:
    user = _optional_str(row, "user", number)
    final = _optional_str(row, "final", number)
    if not user or not user.strip():
        raise DatasetError(number, "user", "missing or empty (or give a 'messages' list)")
    if not final or not final.strip():
        raise DatasetError(number, "final", "missing or empty: the answer to learn")
    analysis = _optional_str(row, "analysis", number)
    developer = _optional_str(row, "developer", number)
    language = _optional_str(row, "reasoning_language", number)
    if not developer and language:
        developer = f"reasoning language: {language}"
    messages = [
        {"role": "user", "content": user, "thinking": None},
        {"role": "assistant", "content": final, "thinking": analysis or None},
    ]
    return Example(messages, developer=developer or None)


def _validate_row(row: Any, number: int) -> Example:
    if not isinstance(row, dict):
        raise DatasetError(number, "(row)", f"must be a JSON object, got {type(row).__name__}")
    example = _chat_example(row, number) if "messages" in row else _flat_example(row, number)
    effort = row.get("reasoning_effort")
    if effort is not None and effort not in EFFORTS:
        raise DatasetError(number, "reasoning_effort", f"must be one of {', '.join(EFFORTS)}")
    example.reasoning_effort = effort
    if isinstance(row.get("reasoning_language"), str):
        example.meta["reasoning_language"] = row["reasoning_language"]
    return example


def validate_rows(rows: list[Any], *, max_rows: int) -> list[Example]:
    """Check every row and normalise both schemas to ``Example``."""
    if not rows:
        raise DatasetError(0, "dataset", "is empty: no rows to train on")
    if len(rows) > max_rows:
        raise DatasetError(0, "dataset", f"{len(rows)} rows, more than the limit of {max_rows} rows")
    return [_validate_row(row, number) for number, row in enumerate(rows, start=1)]


def dataset_fingerprint(examples: list[Example]) -> str:
    """sha256 over the normalised examples: the same data gives the same id whatever its file."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps(asdict(ex), sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


# --- tokenisation ----------------------------------------------------------------------------------


def encode_examples(
    examples: list[Example],
    *,
    max_seq_length: int,
    default_effort: str,
    train_on_reasoning: bool,
    first_row: int = 1,
) -> list[dict[str, list[int]]]:
    """Harmony-render each example to ``input_ids`` + ``completion_mask``; a row longer than
    ``max_seq_length`` is an error (truncating would cut off the answer it should learn)."""
    from app.ml.harmony import render_training

    out = []
    for number, ex in enumerate(examples, start=first_row):
        ids, mask = render_training(
            ex.messages,
            developer=ex.developer,
            reasoning_effort=ex.reasoning_effort or default_effort,
            train_on_reasoning=train_on_reasoning,
        )
        if len(ids) > max_seq_length:
            raise DatasetError(
                number, "messages", f"{len(ids)} tokens, longer than max_seq_length {max_seq_length}"
            )
        out.append({"input_ids": ids, "completion_mask": mask})
    return out
