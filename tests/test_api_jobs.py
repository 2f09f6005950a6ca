"""The jobs API against the real app on a real SQLite file and a real PostgreSQL database (no worker:
these jobs stay queued)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.ml.data import SAMPLES_DIR
from tests.fixtures_service import SMALL_TRAINING, all_events
from tests.pg import ON_BOTH_DATABASES

pytestmark = ON_BOTH_DATABASES


def submit(client: TestClient, **body: Any) -> dict[str, Any]:
    body.setdefault("dataset", "sample:capitals")
    body.setdefault("hyperparameters", SMALL_TRAINING)
    response = client.post("/jobs", json=body)
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()
    return job


def test_submit_answers_queued_job_with_defaults(svc_client: TestClient) -> None:
    job = submit(svc_client, suffix="pirate", seed=7, metadata={"team": "a"})
    assert job["status"] == "queued"
    assert job["base_model"] == "tiny-gpt-oss"  # Settings.resolved_base_model() off GPU
    assert job["hyperparameters"]["seed"] == 7
    assert job["hyperparameters"]["max_steps"] == SMALL_TRAINING["max_steps"]
    assert job["hyperparameters"]["lora_r"] == 8  # TrainConfig's documented default
    assert job["metadata"] == {"team": "a"} and job["name"] == "pirate"
    assert job["queue_position"] == 1 and job["attempts"] == 0 and job["error"] is None
    assert svc_client.get(f"/jobs/{job['id']}").json()["id"] == job["id"]


def test_a_bare_sample_name_is_the_bundled_sample(svc_client: TestClient) -> None:
    job = submit(svc_client, dataset="continents")
    assert job["hyperparameters"]["dataset"] == "sample:continents"


def test_queue_position_follows_priority_then_age(svc_client: TestClient) -> None:
    first, second = submit(svc_client), submit(svc_client)
    urgent = submit(svc_client, priority=5)
    positions = {
        j: svc_client.get(f"/jobs/{j}").json()["queue_position"] for j in (first["id"], second["id"])
    }
    assert svc_client.get(f"/jobs/{urgent['id']}").json()["queue_position"] == 1
    assert positions == {first["id"]: 2, second["id"]: 3}


def test_idempotency_key_returns_the_first_job(svc_client: TestClient) -> None:
    body = {"dataset": "sample:capitals", "hyperparameters": SMALL_TRAINING}
    first = svc_client.post("/jobs", json=body, headers={"Idempotency-Key": "k-1"})
    again = svc_client.post("/jobs", json=body, headers={"Idempotency-Key": "k-1"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    other = svc_client.post("/jobs", json={**body, "seed": 1}, headers={"Idempotency-Key": "k-1"})
    assert other.status_code == 409 and other.json()["error"]["field"] == "Idempotency-Key"
    assert len(svc_client.get("/jobs").json()["data"]) == 1


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({}, 422, "dataset"),
        ({"dataset": "sample:capitals", "hyperparameters": {"lora_r": 0}}, 422, "hyperparameters.lora_r"),
        (
            {"dataset": "sample:capitals", "hyperparameters": {"learning_rate": -1}},
            422,
            "hyperparameters.learning_rate",
        ),
        (
            {"dataset": "sample:capitals", "hyperparameters": {"no_such_option": 1}},
            422,
            "hyperparameters.no_such_option",
        ),
        ({"dataset": "sample:capitals", "hyperparameters": {"dataset": "x"}}, 422, "hyperparameters.dataset"),
        (
            {"dataset": "sample:capitals", "hyperparameters": {"max_rows": 10**9}},
            422,
            "hyperparameters.max_rows",
        ),
        (
            {"dataset": "sample:capitals", "hyperparameters": {"eval_dataset": "/etc/passwd"}},
            422,
            "hyperparameters.eval_dataset",
        ),
        ({"dataset": "sample:no-such-sample"}, 422, "dataset"),
        ({"dataset": "/etc/passwd"}, 422, "dataset"),
        ({"dataset": "hf:not an id"}, 422, "dataset"),
        ({"dataset": "sample:capitals", "base_model": "/etc"}, 422, "base_model"),
        ({"dataset": "file_missing"}, 404, "dataset"),
        ({"dataset": "sample:capitals", "priority": 11}, 422, "priority"),
        ({"dataset": "sample:capitals", "suffix": "has space"}, 422, "suffix"),
        ({"dataset": "sample:capitals", "seed": -1}, 422, "seed"),
        ({"dataset": "sample:capitals", "metadata": {str(i): "v" for i in range(17)}}, 422, "metadata"),
        ({"dataset": "sample:capitals", "surprise": True}, 422, "surprise"),
    ],
)
def test_bad_job_requests_name_the_field(svc_client: TestClient, body: dict, status: int, field: str) -> None:
    response = svc_client.post("/jobs", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field
    assert error["message"].startswith(f"{field}:") if status == 422 else "does not exist" in error["message"]


def test_list_filters_by_status_and_pages_with_a_cursor(svc_client: TestClient) -> None:
    ids = [submit(svc_client)["id"] for _ in range(5)]
    svc_client.post(f"/jobs/{ids[0]}/cancel")
    seen: list[str] = []
    after = None
    while True:
        page = svc_client.get("/jobs", params={"limit": 2, **({"after": after} if after else {})}).json()
        seen += [job["id"] for job in page["data"]]
        if not page["has_more"]:
            break
        after = page["next_cursor"]
    assert seen == ids[::-1]  # newest first, each exactly once
    queued = svc_client.get("/jobs", params={"status": "queued"}).json()["data"]
    assert sorted(job["id"] for job in queued) == sorted(ids[1:])
    assert svc_client.get("/jobs", params={"status": "nonsense"}).json()["error"]["field"] == "status"


def test_list_filters_by_metadata_as_openai_sends_it(
    svc_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """metadata[<key>]=<value> (OpenAI's deepObject form), repeatable: every pair must match; pages of a
    filtered list are whole (limit 1 here); keys with quotes, JSON-path characters or non-ASCII letters
    are data like any other."""
    monkeypatch.setattr("app.pagination.SCAN_CHUNK", 2)  # the scan crosses chunks, as on a long table
    odd = 'ünï "quoted" key.$[0]'
    made = [
        submit(svc_client, metadata={"team": "research", "run": "1"})["id"],
        submit(svc_client, metadata={"team": "ops"})["id"],
        submit(svc_client, metadata={"team": "research", "run": "2", odd: "x"})["id"],
        submit(svc_client)["id"],
        submit(svc_client, metadata={"team": "research", "run": "3"})["id"],
    ]

    def listed(**params: str) -> list[str]:
        seen: list[str] = []
        after = None
        while True:
            query = {**params, "limit": "1", **({"after": after} if after else {})}
            page = svc_client.get("/jobs", params=query).json()
            seen += [job["id"] for job in page["data"]]
            if not page["has_more"]:
                return seen
            after = page["next_cursor"]

    assert listed(**{"metadata[team]": "research"}) == [made[4], made[2], made[0]]
    assert listed(**{"metadata[team]": "research", "metadata[run]": "2"}) == [made[2]]
    assert listed(**{f"metadata[{odd}]": "x"}) == [made[2]]
    assert listed(**{"metadata[team]": "nobody"}) == []
    v1 = svc_client.get("/v1/fine_tuning/jobs", params={"metadata[team]": "ops"}).json()["data"]
    assert [job["id"] for job in v1] == [made[1]] and v1[0]["metadata"] == {"team": "ops"}
    for bad in ({"metadata": "team"}, {"metadata[]": "x"}, {"metadata[" + "k" * 65 + "]": "x"}):
        response = svc_client.get("/jobs", params=bad)
        assert response.status_code == 422 and response.json()["error"]["field"] == "metadata", bad


def test_cancel_while_queued_is_immediate_and_final(svc_client: TestClient) -> None:
    job = submit(svc_client)
    cancelled = svc_client.post(f"/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["finished_at"] is not None and cancelled.json()["queue_position"] is None
    again = svc_client.post(f"/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and "already cancelled" in again.json()["error"]["message"]
    messages = [e["message"] for e in all_events(svc_client, job["id"], kind="status")]
    assert messages == ["queued", "cancelled while queued"]


def test_unknown_job_is_404_on_every_route(svc_client: TestClient) -> None:
    for method, path in [
        ("get", "/jobs/ftjob_nope"),
        ("post", "/jobs/ftjob_nope/cancel"),
        ("get", "/jobs/ftjob_nope/events"),
        ("get", "/jobs/ftjob_nope/checkpoints"),
    ]:
        response = getattr(svc_client, method)(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"


def test_adapters_listing_and_unknown_adapter(svc_client: TestClient) -> None:
    assert svc_client.get("/adapters").json() == {
        "object": "list",
        "data": [],
        "has_more": False,
        "next_cursor": None,
    }
    missing = svc_client.get("/adapters/adp_nope")
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "adapter"
    assert svc_client.delete("/adapters/adp_nope").status_code == 404


def test_health_and_readiness(svc_client: TestClient) -> None:
    assert svc_client.get("/healthz").json() == {"status": "ok"}
    ready = svc_client.get("/readyz")
    assert ready.status_code == 200
    checks = ready.json()["checks"]
    assert checks["database"]["ok"] and checks["migrations"]["current"] == checks["migrations"]["head"]


def test_openapi_documents_the_routes_with_examples(svc_client: TestClient) -> None:
    spec = svc_client.get("/openapi.json").json()
    for path in [
        "/jobs",
        "/jobs/{job_id}",
        "/jobs/{job_id}/cancel",
        "/jobs/{job_id}/events",
        "/jobs/{job_id}/checkpoints",
        "/files",
        "/files/{file_id}",
        "/adapters",
        "/adapters/{ref}",
        "/healthz",
        "/readyz",
    ]:
        assert path in spec["paths"], path
    assert spec["components"]["schemas"]["JobCreate"]["examples"]
    assert svc_client.get("/docs").status_code == 200


def test_openapi_examples_of_job_create_are_accepted(svc_client: TestClient) -> None:
    examples = svc_client.get("/openapi.json").json()["components"]["schemas"]["JobCreate"]["examples"]
    for example in examples:
        response = svc_client.post("/jobs", json=example)
        assert response.status_code == 201, response.text


def test_rows_longer_than_max_seq_length_are_refused_before_queueing(svc_client: TestClient) -> None:
    # The capitals rows render to about 105 harmony tokens each.
    response = svc_client.post(
        "/jobs", json={"dataset": "sample:capitals", "hyperparameters": {"max_seq_length": 64}}
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_dataset" and error["field"] == "dataset" and error["row"] == 1
    assert "row 1, field 'messages'" in error["message"] and "max_seq_length 64" in error["message"]
    assert svc_client.get("/jobs").json()["data"] == []  # nothing was queued


def test_eval_dataset_contents_are_checked_before_queueing(svc_client: TestClient) -> None:
    lines = (SAMPLES_DIR / "capitals.jsonl").read_text().splitlines()[:3]
    long_row = json.loads(lines[1])
    long_row["messages"][1]["content"] = "Paris. " * 100  # far past max_seq_length 256
    lines[1] = json.dumps(long_row)
    content = ("\n".join(lines) + "\n").encode()
    record = svc_client.post("/files", files={"file": ("eval.jsonl", content, "application/jsonl")}).json()
    hyper = {**SMALL_TRAINING, "eval_dataset": record["id"]}
    response = svc_client.post("/jobs", json={"dataset": "sample:capitals", "hyperparameters": hyper})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "hyperparameters.eval_dataset" and error["row"] == 2
    assert "row 2, field 'messages'" in error["message"] and "max_seq_length 256" in error["message"]
    fine = svc_client.post(
        "/jobs", json={"dataset": "sample:capitals", "hyperparameters": {**hyper, "max_seq_length": 2048}}
    )
    assert fine.status_code == 201, fine.text


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/jobs", {"limit": 0}, "limit"),
        ("/jobs", {"after": "not-a-job-id"}, "after"),
        ("/jobs/{id}/events", {"limit": 0}, "limit"),
        ("/jobs/{id}/events", {"kind": "gossip"}, "kind"),
        ("/jobs/{id}/events", {"after": "yesterday"}, "after"),
        ("/jobs/{id}/events", {"after": -1}, "after"),
    ],
)
def test_bad_list_queries_name_the_field(
    svc_client: TestClient, path: str, params: dict[str, Any], field: str
) -> None:
    job = submit(svc_client)
    response = svc_client.get(path.format(id=job["id"]), params=params)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field


@pytest.mark.parametrize("field", ["dataset", "hyperparameters.eval_dataset"])
def test_a_sample_reference_is_a_bundled_name_never_a_path(svc_client: TestClient, field: str) -> None:
    """sample:<name> names one of app.ml.data.sample_names(); a path is refused naming the field, and
    the answer is the same whether the file it points at exists on the server or not."""
    answers = []
    for path in ["../../../../etc/passwd", "../samples/capitals", "../../no/such/file"]:
        ref = f"sample:{path}"
        body: dict[str, Any] = {"dataset": ref, "hyperparameters": SMALL_TRAINING}
        if field != "dataset":
            body = {"dataset": "sample:capitals", "hyperparameters": {**SMALL_TRAINING, "eval_dataset": ref}}
        response = svc_client.post("/jobs", json=body)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["field"] == field and "bundled sample" in error["message"]
        answers.append(error["message"])
    assert len(set(answers)) == 1  # nothing in the text depends on the server's files
    assert svc_client.get("/jobs").json()["data"] == []


def test_a_hyperparameter_typo_is_refused_naming_it(svc_client: TestClient) -> None:
    response = svc_client.post(
        "/jobs", json={"dataset": "sample:capitals", "hyperparameters": {"lora_rank": 8}}
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "hyperparameters.lora_rank" and "not permitted" in error["message"]
    # Fields the server owns are not hyperparameters either.
    for owned in ["backend", "load_in_4bit", "base_model", "seed", "max_bytes"]:
        refused = svc_client.post("/jobs", json={"dataset": "sample:capitals", "hyperparameters": {owned: 1}})
        assert refused.json()["error"]["field"] == f"hyperparameters.{owned}", owned


def test_openapi_documents_every_hyperparameter(svc_client: TestClient) -> None:
    schemas = svc_client.get("/openapi.json").json()["components"]["schemas"]
    hyper = schemas["Hyperparameters"]
    assert hyper["additionalProperties"] is False
    assert schemas["JobCreate"]["properties"]["hyperparameters"]["$ref"].endswith("/Hyperparameters")
    lora_r = hyper["properties"]["lora_r"]
    assert lora_r == {"type": "integer", "minimum": 1, "maximum": 256, "default": 8, "title": "Lora R",
                      "description": "LoRA rank"}  # fmt: skip
    assert "learning rate" in hyper["properties"]["learning_rate"]["description"]
    for name, prop in hyper["properties"].items():  # optional ones (default None) show as nullable
        assert prop.get("description"), name
        assert "default" in prop or {"type": "null"} in prop.get("anyOf", []), name
    assert not {"dataset", "base_model", "backend", "max_rows", "seed"} & set(hyper["properties"])
