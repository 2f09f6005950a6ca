"""Dataset uploads against the real app: validated on upload, stored by content hash, guarded deletes;
on SQLite and on PostgreSQL."""

from __future__ import annotations

import hashlib
import json

from fastapi.testclient import TestClient

from app.config import Settings
from app.ml.data import SAMPLES_DIR
from tests.pg import ON_BOTH_DATABASES

pytestmark = ON_BOTH_DATABASES


def _rows(count: int) -> bytes:
    lines = (SAMPLES_DIR / "capitals.jsonl").read_text().splitlines()[:count]
    return ("\n".join(lines) + "\n").encode()


def upload(client: TestClient, content: bytes, name: str = "train.jsonl"):  # type: ignore[no-untyped-def]
    return client.post("/files", files={"file": (name, content, "application/jsonl")})


def test_upload_validates_hashes_and_lists(svc_client: TestClient, svc_settings: Settings) -> None:
    content = _rows(12)
    response = upload(svc_client, content)
    assert response.status_code == 201, response.text
    record = response.json()
    assert record["rows"] == 12 and record["bytes"] == len(content)
    assert record["sha256"] == hashlib.sha256(content).hexdigest()
    stored = svc_settings.uploads_dir / f"{record['sha256']}.jsonl"
    assert stored.read_bytes() == content
    assert svc_client.get(f"/files/{record['id']}").json() == record
    assert [f["id"] for f in svc_client.get("/files").json()["data"]] == [record["id"]]
    assert not list(svc_settings.uploads_dir.glob(".upload-*"))  # no temp file left behind
    fetched = svc_client.get(f"/files/{record['id']}/content")
    assert fetched.status_code == 200 and fetched.content == content
    assert record["filename"] in fetched.headers["content-disposition"]
    stored.unlink()  # the row without its bytes: said so, not a bare 500
    lost = svc_client.get(f"/files/{record['id']}/content")
    assert lost.status_code == 500 and record["id"] in lost.json()["error"]["message"]


def test_bad_row_is_refused_with_its_number_and_field(svc_client: TestClient, svc_settings: Settings) -> None:
    lines = _rows(5).decode().splitlines()
    bad = json.loads(lines[2])
    bad["messages"][1]["role"] = "robot"
    lines[2] = json.dumps(bad)
    response = upload(svc_client, ("\n".join(lines) + "\n").encode())
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_dataset" and error["field"] == "file" and error["row"] == 3
    assert "row 3" in error["message"] and "messages[1].role" in error["message"]
    assert svc_client.get("/files").json()["data"] == []
    assert not list(svc_settings.uploads_dir.iterdir())


def test_not_json_is_refused_with_the_row(svc_client: TestClient) -> None:
    response = upload(svc_client, _rows(2) + b"{not json\n")
    assert response.status_code == 422 and response.json()["error"]["row"] == 3


def test_too_large_upload_is_413(svc_client: TestClient, svc_settings: Settings) -> None:
    svc_settings.max_upload_bytes = 1000  # the app reads this very object
    response = upload(svc_client, _rows(40))
    assert response.status_code == 413
    assert response.json()["error"]["field"] == "file" and "1000 bytes" in response.json()["error"]["message"]
    huge = upload(svc_client, _rows(240) * 2)  # refused on its Content-Length, before it is read
    assert huge.status_code == 413 and huge.json()["error"]["field"] == "file"
    assert not list(svc_settings.uploads_dir.iterdir())


def test_file_used_by_an_active_job_cannot_be_deleted(svc_client: TestClient, svc_settings: Settings) -> None:
    record = upload(svc_client, _rows(8)).json()
    job = svc_client.post("/jobs", json={"dataset": record["id"], "hyperparameters": {"max_steps": 2}}).json()
    # The job stores the reference, never the server path it resolves to (that happens when it trains).
    assert job["file_id"] == job["dataset"] == job["hyperparameters"]["dataset"] == record["id"]
    refused = svc_client.delete(f"/files/{record['id']}")
    assert refused.status_code == 409 and job["id"] in refused.json()["error"]["message"]
    svc_client.post(f"/jobs/{job['id']}/cancel")
    assert svc_client.delete(f"/files/{record['id']}").json() == {
        "id": record["id"],
        "object": "file",
        "deleted": True,
    }
    assert svc_client.get(f"/files/{record['id']}").status_code == 404
    assert not (svc_settings.uploads_dir / f"{record['sha256']}.jsonl").exists()
    assert svc_client.get(f"/jobs/{job['id']}").json()["file_id"] is None  # the job keeps its history


def test_same_content_twice_shares_the_bytes_until_both_are_deleted(
    svc_client: TestClient, svc_settings: Settings
) -> None:
    first, second = upload(svc_client, _rows(3)).json(), upload(svc_client, _rows(3)).json()
    assert first["id"] != second["id"] and first["sha256"] == second["sha256"]
    stored = svc_settings.uploads_dir / f"{first['sha256']}.jsonl"
    svc_client.delete(f"/files/{first['id']}")
    assert stored.is_file()  # the second record still uses these bytes
    svc_client.delete(f"/files/{second['id']}")
    assert not stored.exists()


def test_upload_without_a_file_part_names_the_field(svc_client: TestClient) -> None:
    response = svc_client.post("/files", data={"purpose": "fine-tune"})
    assert response.status_code == 422 and response.json()["error"]["field"] == "file"


def test_bad_listing_queries_name_the_field(svc_client: TestClient) -> None:
    for params, field in [({"limit": 0}, "limit"), ({"after": "not-a-cursor"}, "after")]:
        response = svc_client.get("/files", params=params)
        assert response.status_code == 422 and response.json()["error"]["field"] == field, params


def test_an_upload_used_as_eval_dataset_cannot_be_deleted(svc_client: TestClient) -> None:
    record = upload(svc_client, _rows(4)).json()
    body = {"dataset": "sample:capitals", "hyperparameters": {"max_steps": 2, "eval_dataset": record["id"]}}
    job = svc_client.post("/jobs", json=body)
    assert job.status_code == 201, job.text
    refused = svc_client.delete(f"/files/{record['id']}")
    assert refused.status_code == 409 and job.json()["id"] in refused.json()["error"]["message"]
    svc_client.post(f"/jobs/{job.json()['id']}/cancel")
    assert svc_client.delete(f"/files/{record['id']}").status_code == 200
