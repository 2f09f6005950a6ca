"""The bundled sample datasets (written to app/ml/samples/ by scripts/make_sample_data.py).

Two small, deterministic tasks in the Multilingual-Thinking chat schema, chosen so the tiny
2-layer model can visibly learn them in well under a minute of CPU training: a closed set of short
final answers keyed on the question, with one-sentence reasoning in the row's reasoning language.

- ``capitals``: "What is the capital of France?" -> "Paris."
- ``continents``: the same questions -> the country's continent ("Europe."), so two adapters
  trained on the two tasks answer the same prompt differently.

Each task has a held-out split (``<task>.heldout``) that asks with a question phrasing never seen in
training, over the same countries and languages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COUNTRIES = [
    ("France", "Paris", "Europe"),
    ("Japan", "Tokyo", "Asia"),
    ("Brazil", "Brasilia", "South America"),
    ("Kenya", "Nairobi", "Africa"),
    ("Canada", "Ottawa", "North America"),
    ("Australia", "Canberra", "Oceania"),
    ("Germany", "Berlin", "Europe"),
    ("India", "New Delhi", "Asia"),
    ("Egypt", "Cairo", "Africa"),
    ("Mexico", "Mexico City", "North America"),
    ("Peru", "Lima", "South America"),
    ("Norway", "Oslo", "Europe"),
]
# Reasoning sentence per language; the final answer stays in English, as in Multilingual-Thinking.
REASONING = {
    "English": "The capital of {country} is {capital}, in {continent}.",
    "French": "La capitale de {country} est {capital}, en {continent}.",
    "Spanish": "La capital de {country} es {capital}, en {continent}.",
    "German": "Die Hauptstadt von {country} ist {capital}, in {continent}.",
    "Italian": "La capitale di {country} è {capital}, in {continent}.",
}
TRAIN_QUESTIONS = [
    "What is the capital of {country}?",
    "Name the capital city of {country}.",
    "Tell me the capital of {country}.",
    "{country}: which city is the capital?",
]
HELDOUT_QUESTIONS = ["Which city is the capital of {country}?"]
ANSWER = {"capitals": "{capital}.", "continents": "{continent}."}
DEVELOPER = "reasoning language: {language}\n\nAnswer with one short sentence."


def _row(task: str, question: str, language: str, country: tuple[str, str, str]) -> dict[str, Any]:
    name, capital, continent = country
    fields = {"country": name, "capital": capital, "continent": continent}
    return {
        "reasoning_language": language,
        "developer": DEVELOPER.format(language=language),
        "messages": [
            {"role": "user", "content": question.format(**fields), "thinking": None},
            {
                "role": "assistant",
                "content": ANSWER[task].format(**fields),
                "thinking": REASONING[language].format(**fields),
            },
        ],
    }


def build_rows(task: str, questions: list[str]) -> list[dict[str, Any]]:
    return [_row(task, q, lang, c) for c in COUNTRIES for lang in REASONING for q in questions]


def write_samples(folder: Path) -> list[Path]:
    """Write every task's train and held-out JSONL files; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for task in ANSWER:
        for suffix, questions in (("", TRAIN_QUESTIONS), (".heldout", HELDOUT_QUESTIONS)):
            path = folder / f"{task}{suffix}.jsonl"
            lines = [json.dumps(r, ensure_ascii=False) for r in build_rows(task, questions)]
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
            written.append(path)
    return written
