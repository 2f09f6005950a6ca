"""Shared fixtures. Each area keeps its own fixtures in tests/fixtures_<area>.py (loaded below).

The offline tokenizer and the tiny model are built once per machine into a cache folder
(GPTOSS_TEST_CACHE, default /tmp/gptoss-test-cache) and shared by every test; everything a test
writes (database, uploads, jobs, adapters) goes under its own tmp_path.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.config import Settings

pytest_plugins = ["tests.fixtures_ml", "tests.fixtures_service", "tests.fixtures_inference"]

TEST_CACHE = Path(os.environ.get("GPTOSS_TEST_CACHE", "/tmp/gptoss-test-cache"))


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The shared models folder: offline harmony tokenizer + the tiny GPT-OSS model."""
    from app.ml.tiny_model import ensure_tiny_model
    from app.ml.tokenizer import ensure_harmony_assets

    path = TEST_CACHE / "models"
    ensure_harmony_assets(path)
    ensure_tiny_model(path)
    return path


@pytest.fixture
def settings(tmp_path: Path, models_dir: Path) -> Settings:
    """Settings for one test: its own data dir and SQLite file, the shared tiny model, no auth."""
    return Settings(
        data_dir=tmp_path / "data",
        models_dir=models_dir,
        base_model="tiny-gpt-oss",
        backend="hf",
        auth="none",
        log_json=False,
    )
