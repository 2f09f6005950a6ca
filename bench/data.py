"""Benchmark datasets, rendered with the project's own harmony code so every loop sees the same tokens.

`fixed_length_rows` makes chat rows whose rendered training sequence is exactly `seq_len` tokens (so
the service's job and the bare loops process the same number of tokens per step, with no padding);
`uneven_rows` makes rows of spread-out lengths for the packing benchmark.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

# Short common words: almost always one token each with their leading space in o200k, so the
# rendered length grows by one per word and a target length can be hit exactly.
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "are",
    "were",
    "which",
    "this",
    "be",
    "or",
    "have",
    "had",
    "not",
    "but",
    "one",
    "all",
    "they",
    "an",
    "you",
    "their",
    "has",
    "been",
    "more",
    "when",
    "who",
    "will",
    "no",
    "if",
    "out",
    "so",
    "said",
    "what",
    "up",
    "its",
    "about",
    "into",
    "than",
    "them",
    "can",
    "only",
    "other",
    "new",
    "some",
    "could",
    "time",
    "these",
    "two",
    "may",
    "then",
    "do",
    "first",
    "any",
    "my",
    "now",
    "such",
    "like",
    "our",
    "over",
    "man",
    "me",
    "even",
    "most",
    "made",
    "after",
    "also",
    "did",
    "many",
    "before",
    "must",
]

Row = dict[str, Any]


def _messages(user_words: list[str], answer_words: list[str], thinking: str) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": " ".join(user_words)},
        {"role": "assistant", "content": " ".join(answer_words), "thinking": thinking},
    ]


def rendered_length(messages: list[dict[str, Any]]) -> int:
    from app.ml.harmony import render_training

    ids, _mask = render_training(messages)
    return len(ids)


def _row_of_length(target: int, rng: random.Random) -> Row:
    """One row whose rendered length is `target` (or the closest below it, which is rare)."""
    user = [rng.choice(WORDS) for _ in range(16)]
    thinking = " ".join(rng.choice(WORDS) for _ in range(8))
    pool = [rng.choice(WORDS) for _ in range(target)]
    lo, hi = 0, target
    while lo < hi:  # largest word count whose rendering fits in `target`
        mid = (lo + hi + 1) // 2
        if rendered_length(_messages(user, pool[:mid], thinking)) <= target:
            lo = mid
        else:
            hi = mid - 1
    return {"messages": _messages(user, pool[:lo], thinking)}


def fixed_length_rows(n: int, seq_len: int, seed: int = 0) -> list[Row]:
    """`n` rows, each rendering to `seq_len` tokens. Copies of a few distinct rows: rendering is slow."""
    rng = random.Random(seed)
    distinct = [_row_of_length(seq_len, rng) for _ in range(min(n, 8))]
    return [distinct[i % len(distinct)] for i in range(n)]


def uneven_rows(n: int, min_len: int, max_len: int, seed: int = 0) -> list[Row]:
    """`n` rows whose rendered lengths are spread log-uniformly over [min_len, max_len] (chat-like)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        target = int(min_len * (max_len / min_len) ** rng.random())
        user = [rng.choice(WORDS) for _ in range(8)]
        answer = [rng.choice(WORDS) for _ in range(target)]
        excess = rendered_length(_messages(user, answer, "ok")) - target
        # one word is one token here, so trimming the excess lands on the target (never above max_len)
        rows.append({"messages": _messages(user, answer[: max(1, target - max(excess, 0))], "ok")})
    return rows


def write_jsonl(rows: list[Row], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def render_all(rows: list[Row]) -> list[tuple[list[int], list[int]]]:
    """Input ids and completion masks of each row, as the service renders them."""
    from app.ml.harmony import render_training

    return [render_training(r["messages"]) for r in rows]
