"""Dataset loading and validation: both schemas, limits, and clear errors naming row and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.ml.data import SAMPLES_DIR, DatasetError, encode_examples, load_rows, validate_rows
from app.ml.sample_data import write_samples

GOOD = {
    "messages": [
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello.", "thinking": "Greet back."},
    ]
}


def _write(path: Path, rows: list[Any]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize(
    ("row", "field", "reason"),
    [
        (
            {"messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role",
            "must be one of user, assistant",
        ),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "must be a string"),
        ({"messages": [{"role": "user", "content": "x"}]}, "messages", "at least one assistant message"),
        ({"messages": []}, "messages", "non-empty list"),
        ({"messages": ["hi"]}, "messages[0]", "must be an object"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "messages", "user message before"),
        ({**GOOD, "reasoning_effort": "max"}, "reasoning_effort", "must be one of low, medium, high"),
        ({"user": "q"}, "final", "missing or empty"),
        ({"final": "a"}, "user", "missing or empty"),
        ([1, 2], "(row)", "must be a JSON object"),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a", "thinking": 3},
                ]
            },
            "messages[1].thinking",
            "must be a string",
        ),
    ],
)
def test_bad_rows_name_row_field_and_reason(row: Any, field: str, reason: str) -> None:
    with pytest.raises(DatasetError) as err:
        validate_rows([GOOD, GOOD, row], max_rows=10)
    assert (err.value.row, err.value.field) == (3, field)
    assert reason in err.value.reason
    assert str(err.value).startswith(f"row 3, field '{field}': ")


def test_invalid_json_line_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", [GOOD, "{not json"])
    with pytest.raises(DatasetError, match=r"row 2, field '\(json\)': not valid JSON"):
        load_rows(str(path), data_dir=tmp_path, max_rows=10, max_bytes=10_000)


def test_row_and_byte_limits_are_named(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", [GOOD] * 3)
    with pytest.raises(DatasetError, match="more than the limit of 2 rows"):
        load_rows(str(path), data_dir=tmp_path, max_rows=2, max_bytes=10_000)
    with pytest.raises(DatasetError, match="more than the limit of 100 bytes"):
        load_rows(str(path), data_dir=tmp_path, max_rows=10, max_bytes=100)


def test_sequence_length_limit_is_named() -> None:
    long = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}
    examples = validate_rows([GOOD, long], max_rows=10)
    with pytest.raises(
        DatasetError, match=r"row 2, field 'messages': \d+ tokens, longer than max_seq_length 128"
    ):
        encode_examples(examples, max_seq_length=128, default_effort="medium", train_on_reasoning=True)


def test_unknown_sources(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no bundled sample named 'nope'"):
        load_rows("sample:nope", data_dir=tmp_path, max_rows=10, max_bytes=10)
    with pytest.raises(DatasetError, match="not found"):
        load_rows("missing.jsonl", data_dir=tmp_path, max_rows=10, max_bytes=10)


def test_flat_multilingual_thinking_schema_is_normalised() -> None:
    row = {"reasoning_language": "German", "user": "Q?", "analysis": "Denken.", "final": "A."}
    (ex,) = validate_rows([row], max_rows=1)
    assert ex.developer == "reasoning language: German"
    assert ex.messages[-1] == {"role": "assistant", "content": "A.", "thinking": "Denken."}


def test_multilingual_thinking_chat_rows_keep_instructions_once() -> None:
    row = {
        "reasoning_language": "French",
        "developer": "You are cheerful.",
        "messages": [
            {
                "role": "system",
                "content": "reasoning language: French\n\nYou are cheerful.",
                "thinking": None,
            },
            {"role": "user", "content": "Hi?", "thinking": None},
            {"role": "assistant", "content": "Hello!", "thinking": "L'utilisateur salue."},
        ],
    }
    (ex,) = validate_rows([row], max_rows=1)
    assert ex.developer is None and ex.messages[0]["role"] == "system"
    assert ex.meta["reasoning_language"] == "French"


def test_relative_path_resolves_in_data_dir(tmp_path: Path) -> None:
    _write(tmp_path / "up.jsonl", [GOOD])
    assert load_rows("up.jsonl", data_dir=tmp_path, max_rows=5, max_bytes=10_000) == [GOOD]


def test_bundled_samples_are_reproducible_and_valid(tmp_path: Path) -> None:
    for path in write_samples(tmp_path):
        committed = SAMPLES_DIR / path.name
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed} is stale: run scripts/make_sample_data.py"
        )
    rows = load_rows("sample:capitals", data_dir=tmp_path, max_rows=1000, max_bytes=10**7)
    examples = validate_rows(rows, max_rows=1000)
    assert len(examples) >= 200
    assert {e.meta["reasoning_language"] for e in examples} >= {"English", "French", "German"}
    assert all(e.messages[-1]["thinking"] for e in examples)
    held = {
        r["messages"][0]["content"]
        for r in load_rows("sample:capitals.heldout", data_dir=tmp_path, max_rows=1000, max_bytes=10**7)
    }
    assert held.isdisjoint({r["messages"][0]["content"] for r in rows})
