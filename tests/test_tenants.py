"""Keys separate tenants (issue 16): every file, job and adapter belongs to the key that made it; another
key gets 404 everywhere (read, list, cancel, delete, a job on another's file, generation with another's
adapter, the /v1 routes) with the same text as for an id that never existed; an admin key sees all.

The real app with auth=keys on a real SQLite file; keys made through app.keys."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app import keys
from app.config import Settings
from app.main import create_app
from app.models import Adapter
from tests.fixtures_service import SMALL_TRAINING

CAPITALS_ROW = (
    b'{"messages": [{"role": "user", "content": "Capital of Peru?"}, '
    b'{"role": "assistant", "content": "Lima."}]}\n'
)


class Tenant:
    def __init__(self, client: TestClient, secret: str, key_id: str) -> None:
        self.client, self.headers, self.key_id = client, {"Authorization": f"Bearer {secret}"}, key_id

    def get(self, path: str, **kw: Any) -> Any:
        return self.client.get(path, headers=self.headers, **kw)

    def post(self, path: str, headers: dict[str, str] | None = None, **kw: Any) -> Any:
        return self.client.post(path, headers={**self.headers, **(headers or {})}, **kw)

    def delete(self, path: str) -> Any:
        return self.client.delete(path, headers=self.headers)


@pytest.fixture
def tenants(svc_settings: Settings) -> Iterator[dict[str, Tenant]]:
    settings = svc_settings.model_copy(update={"auth": "keys", "rate_limit_per_minute": 0})
    with TestClient(create_app(settings)) as client:
        made = {}
        with client.app.state.sessionmaker() as session:  # type: ignore[attr-defined]
            for name, scopes in (("a", ["read", "train", "generate"]), ("b", ["read", "train", "generate"])):
                key, secret = keys.create_api_key(session, name, scopes)
                made[name] = Tenant(client, secret, key.id)
            key, secret = keys.create_api_key(session, "root", ["admin"])
            made["admin"] = Tenant(client, secret, key.id)
        yield made


def _upload(tenant: Tenant) -> str:
    response = tenant.post("/files", files={"file": ("d.jsonl", CAPITALS_ROW * 4)})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _job(tenant: Tenant, dataset: str, **hyper: Any) -> str:
    body = {"dataset": dataset, "hyperparameters": {**SMALL_TRAINING, **hyper}}
    response = tenant.post("/jobs", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _missing(response: Any, what: str) -> None:
    assert response.status_code == 404, response.text
    assert what in response.text and "another" not in response.text


def test_files_belong_to_their_key(tenants: dict[str, Tenant]) -> None:
    a, b, admin = tenants["a"], tenants["b"], tenants["admin"]
    file_id = _upload(a)
    never = "file_0000000000000000000000000"
    for path in (f"/files/{file_id}", f"/v1/files/{file_id}"):
        _missing(b.get(path), file_id)
        _missing(b.get(f"{path}/content"), file_id)
    assert a.get(f"/files/{file_id}/content").content == CAPITALS_ROW * 4  # the owner reads the bytes
    assert b.get(f"/files/{never}").json()["error"]["message"] == (
        b.get(f"/files/{file_id}").json()["error"]["message"].replace(file_id, never)
    )  # the same words as for an id that never existed
    assert b.get("/files").json()["data"] == [] and b.get("/v1/files").json()["data"] == []
    _missing(b.delete(f"/files/{file_id}"), file_id)
    _missing(b.post("/jobs", json={"dataset": file_id, "hyperparameters": SMALL_TRAINING}), file_id)
    evaluated = {"dataset": "sample:capitals", "hyperparameters": {**SMALL_TRAINING, "eval_dataset": file_id}}
    _missing(b.post("/jobs", json=evaluated), file_id)
    assert [f["id"] for f in a.get("/files").json()["data"]] == [file_id]
    assert admin.get(f"/files/{file_id}").status_code == 200


def test_jobs_their_events_and_checkpoints_belong_to_their_key(tenants: dict[str, Tenant]) -> None:
    a, b, admin = tenants["a"], tenants["b"], tenants["admin"]
    job_id = _job(a, _upload(a))
    for path in ("", "/events", "/checkpoints", "/loss.png"):
        _missing(b.get(f"/jobs/{job_id}{path}"), job_id)
    for path in ("", "/events", "/checkpoints"):
        assert b.get(f"/v1/fine_tuning/jobs/{job_id}{path}").status_code == 404
    _missing(b.post(f"/jobs/{job_id}/cancel"), job_id)
    assert b.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 404
    assert b.get("/jobs").json()["data"] == [] and b.get("/v1/fine_tuning/jobs").json()["data"] == []
    assert a.get(f"/jobs/{job_id}").json()["status"] == "queued"  # B's cancel did nothing
    assert [j["id"] for j in admin.get("/jobs").json()["data"]] == [job_id]
    assert admin.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelled"


def test_adapters_belong_to_the_key_of_their_job(tenants: dict[str, Tenant], svc_settings: Settings) -> None:
    a, b, admin = tenants["a"], tenants["b"], tenants["admin"]
    app = a.client.app
    with app.state.sessionmaker() as session:  # type: ignore[attr-defined]
        # The row the worker registers for A's job (worker._succeed passes the job's key).
        row = Adapter(
            id="adp_a1", name="ft:tiny:a:1", base_model="tiny-gpt-oss", path="/nowhere", api_key_id=a.key_id
        )
        session.add(row)
        session.commit()
    for ref in ("adp_a1", "ft:tiny:a:1"):
        _missing(b.get(f"/adapters/{ref}"), ref)
        _missing(b.delete(f"/adapters/{ref}"), ref)
    assert b.get("/adapters").json()["data"] == []
    assert "ft:tiny:a:1" not in [m["id"] for m in b.get("/v1/models").json()["data"]]
    assert b.get("/v1/models/ft:tiny:a:1").status_code == 404
    _missing(b.post("/generate", json={"prompt": "hi", "adapter": "adp_a1", "max_new_tokens": 1}), "adp_a1")
    chat = {"model": "ft:tiny:a:1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    answer = b.post("/v1/chat/completions", json=chat)
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found"
    assert a.get("/adapters/adp_a1").status_code == 200
    assert "ft:tiny:a:1" in [m["id"] for m in a.get("/v1/models").json()["data"]]
    assert [x["id"] for x in admin.get("/adapters").json()["data"]] == ["adp_a1"]


def test_an_idempotency_key_is_per_api_key(tenants: dict[str, Tenant]) -> None:
    a, b = tenants["a"], tenants["b"]
    body = {"dataset": "sample:capitals", "hyperparameters": SMALL_TRAINING}
    first = a.post("/jobs", json=body, headers={"Idempotency-Key": "same"})
    other = b.post("/jobs", json=body, headers={"Idempotency-Key": "same"})
    assert (first.status_code, other.status_code) == (201, 201)
    assert first.json()["id"] != other.json()["id"]


def test_a_conflict_names_only_the_jobs_the_caller_may_see(tenants: dict[str, Tenant]) -> None:
    a, admin = tenants["a"], tenants["admin"]
    file_id = _upload(a)
    admins_job = _job(admin, file_id)  # an admin may train on anyone's upload
    conflict = a.delete(f"/files/{file_id}")
    assert conflict.status_code == 409
    assert "1 active job(s)" in conflict.text and admins_job not in conflict.text
    assert admins_job in admin.delete(f"/files/{file_id}").text
