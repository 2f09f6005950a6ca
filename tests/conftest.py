"""Shared fixtures. Each area keeps its own fixtures in tests/fixtures_<area>.py (loaded below).

The database is a SQLite file under the test's tmp_path; a test marked with tests.pg.ON_BOTH_DATABASES
runs a second time on its own fresh database of a PostgreSQL server the session starts (tests/pg.py).
The offline tokenizer and the tiny model are built once per machine into a cache folder
(GPTOSS_TEST_CACHE, default /tmp/gptoss-test-cache) and shared by every test; everything a test
writes (database, uploads, jobs, adapters) goes under its own tmp_path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.config import Settings
from tests.pg import DEFAULT_BACKEND, MISSING, PostgresServer, find_bin_dir

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


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server per test session (per xdist worker), started only if a test asks."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip(MISSING)
    server = PostgresServer(bin_dir)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def db_backend(request: pytest.FixtureRequest) -> str:
    """A test parametrized over tests.pg.BACKENDS (indirect) gets each; any other test gets
    GPTOSS_TEST_DATABASE (default sqlite; `GPTOSS_TEST_DATABASE=postgresql pytest` runs all on PostgreSQL)."""
    return str(getattr(request, "param", DEFAULT_BACKEND))


@pytest.fixture
def database_url(db_backend: str, request: pytest.FixtureRequest) -> Iterator[str | None]:
    """None (the default SQLite file in the data dir), or a fresh PostgreSQL database for this test."""
    if db_backend == "sqlite":
        yield None
        return
    server: PostgresServer = request.getfixturevalue("pg_server")
    name = server.create_database()
    yield server.url(name)
    server.drop_database(name)


@pytest.fixture
def settings(tmp_path: Path, models_dir: Path, database_url: str | None) -> Settings:
    """Settings for one test: its own data dir and database, the shared tiny model, no auth."""
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        models_dir=models_dir,
        base_model="tiny-gpt-oss",
        backend="hf",
        auth="none",
        log_json=False,
    )
