"""API keys: created by scripts/create_api_key.py (a real subprocess), checked on every route but health."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.fixtures_service import ROOT


@pytest.fixture(scope="module")
def keyed_settings(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Settings:
    """One database for the module, so the keys are made once (each is a subprocess)."""
    data_dir = tmp_path_factory.mktemp("auth") / "data"
    return Settings(
        data_dir=data_dir,
        models_dir=models_dir,
        base_model="tiny-gpt-oss",
        backend="hf",
        auth="keys",
        log_json=False,
        load_model_on_start=False,
    )


def create_key(settings: Settings, scopes: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GPTOSS_DATA_DIR": str(settings.data_dir), "GPTOSS_LOG_JSON": "false"}
    return subprocess.run(
        [sys.executable, "scripts/create_api_key.py", "--name", f"test-{scopes}", "--scopes", scopes],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def keys(keyed_settings: Settings) -> dict[str, str]:
    made = {scopes: create_key(keyed_settings, scopes) for scopes in ("read", "train,read", "admin")}
    for result in made.values():
        assert result.returncode == 0, result.stderr
    return {scopes: result.stdout.strip() for scopes, result in made.items()}


@pytest.fixture
def keyed_client(keyed_settings: Settings, keys: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(keyed_settings)) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_key_is_printed_once_and_stored_hashed(keyed_settings: Settings, keys: dict[str, str]) -> None:
    import sqlite3

    with sqlite3.connect(keyed_settings.data_dir / "service.db") as db:
        stored = db.execute("SELECT key_hash, scopes FROM api_keys").fetchall()
    assert len(stored) >= 3
    assert all(key not in str(stored) for key in keys.values())  # only hashes are in the database


def test_missing_or_unknown_key_is_401(keyed_client: TestClient) -> None:
    for headers in ({}, bearer("gpt-not-a-real-key"), {"Authorization": "Basic abc"}):
        response = keyed_client.get("/jobs", headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"]["field"] == "Authorization"


def test_scopes_are_enforced_with_403(keyed_client: TestClient, keys: dict[str, str]) -> None:
    body = {"dataset": "sample:capitals", "hyperparameters": {"max_steps": 2}}
    refused = keyed_client.post("/jobs", json=body, headers=bearer(keys["read"]))
    assert refused.status_code == 403 and "'train' scope" in refused.json()["error"]["message"]
    assert keyed_client.get("/jobs", headers=bearer(keys["read"])).status_code == 200
    made = keyed_client.post("/jobs", json=body, headers=bearer(keys["train,read"]))
    assert made.status_code == 201
    admin = bearer(keys["admin"])
    assert keyed_client.post(f"/jobs/{made.json()['id']}/cancel", headers=admin).status_code == 200
    upload = {"file": ("a.jsonl", b"{}")}
    assert keyed_client.post("/files", headers=bearer(keys["read"]), files=upload).status_code == 403


def test_health_needs_no_key(keyed_client: TestClient) -> None:
    assert keyed_client.get("/healthz").status_code == 200
    assert keyed_client.get("/readyz").status_code == 200


def test_unknown_scope_is_refused_by_the_script(keyed_settings: Settings) -> None:
    result = create_key(keyed_settings, "read,root")
    assert result.returncode == 2 and "--scopes" in result.stderr and "root" in result.stderr


def test_auth_none_is_announced_loudly(svc_settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"), TestClient(create_app(svc_settings)) as client:
        assert client.get("/jobs").status_code == 200  # no key needed
    assert any("GPTOSS_AUTH=none" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def test_idempotency_keys_are_scoped_per_api_key(keyed_client: TestClient, keys: dict[str, str]) -> None:
    body = {"dataset": "sample:capitals", "hyperparameters": {"max_steps": 2}}
    same = {"Idempotency-Key": "nightly-run"}
    trainer = keyed_client.post("/jobs", json=body, headers={**bearer(keys["train,read"]), **same})
    admin = keyed_client.post("/jobs", json=body, headers={**bearer(keys["admin"]), **same})
    assert (trainer.status_code, admin.status_code) == (201, 201)  # each key gets its own job
    assert trainer.json()["id"] != admin.json()["id"]
    again = keyed_client.post("/jobs", json=body, headers={**bearer(keys["admin"]), **same})
    assert again.status_code == 200 and again.json()["id"] == admin.json()["id"]


def test_last_use_is_stamped_once_a_minute_and_revocation_is_immediate(
    keyed_settings: Settings, keys: dict[str, str]
) -> None:
    """A key's last use is written at most once a minute (not a write transaction per request), while
    a revoked key is refused by the very next request."""
    import sqlite3

    from app.keys import hash_key

    key = create_key(keyed_settings, "read").stdout.strip()
    db_path = keyed_settings.data_dir / "service.db"
    long_ago = "2000-01-01 00:00:00.000000"

    def last_used() -> str | None:
        with sqlite3.connect(db_path) as db:
            row = db.execute("SELECT last_used_at FROM api_keys WHERE key_hash = ?", (hash_key(key),))
            value: str | None = row.fetchone()[0]
        return value

    with TestClient(create_app(keyed_settings)) as client:
        assert last_used() is None
        assert client.get("/jobs", headers=bearer(key)).status_code == 200
        first = last_used()
        assert first is not None
        for _ in range(3):
            assert client.get("/jobs", headers=bearer(key)).status_code == 200
        assert last_used() == first  # within the minute: no new write
        with sqlite3.connect(db_path) as db:
            db.execute(
                "UPDATE api_keys SET last_used_at = '2000-01-01 00:00:00' WHERE key_hash = ?",
                (hash_key(key),),
            )
        assert client.get("/jobs", headers=bearer(key)).status_code == 200
        assert last_used() not in (first, long_ago)  # an old stamp is renewed
        with sqlite3.connect(db_path) as db:
            db.execute(
                "UPDATE api_keys SET revoked_at = '2026-01-01 00:00:00' WHERE key_hash = ?", (hash_key(key),)
            )
        refused = client.get("/jobs", headers=bearer(key))
        assert refused.status_code == 401 and "revoked" in refused.json()["error"]["message"]
