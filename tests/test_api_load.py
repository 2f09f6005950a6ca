"""The API under a busy client, over real HTTP (uvicorn on a free port, a real SQLite file).

Many concurrent requests are all answered, none with a 500 (the database pool fits the API's threads
and a request gives its connection back as soon as its route returns); past the server's limits a
client gets a fast 503 or 429 with Retry-After, and the probes keep answering. Timings are in
bench/load_bench.py and BENCHMARKS.md, not asserted here.
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest

from app.config import Settings
from tests.fixtures_service import SMALL_TRAINING


@pytest.fixture
def svc_settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """The service settings, with the limits a test asks for through `@pytest.mark.limits(...)`."""
    marker = request.node.get_closest_marker("limits")
    limits = marker.kwargs if marker else {}
    update = {"load_model_on_start": False, "log_json": False, "rate_limit_per_minute": 0, **limits}
    return settings.model_copy(update=update)


def _job(http: httpx.Client) -> str:
    body = {"dataset": "sample:capitals", "hyperparameters": SMALL_TRAINING}
    response = http.post("/jobs", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


@pytest.mark.limits(max_requests_in_flight_per_client=1000)
def test_many_concurrent_reads_all_answer_without_a_server_error(svc_server: str) -> None:
    """Before: 60 concurrent GETs left 40 of them waiting 30 s for a pooled connection, then 500."""
    with httpx.Client(base_url=svc_server, timeout=120) as http:
        job_id = _job(http)

        def poll(_: int) -> int:
            with httpx.Client(base_url=svc_server, timeout=120) as own:
                return own.get(f"/jobs/{job_id}").status_code

        with ThreadPoolExecutor(max_workers=120) as pool:
            statuses = Counter(pool.map(poll, range(240)))
    assert statuses == {200: 240}


@contextmanager
def held_request(url: str) -> Iterator[socket.socket]:
    """An upload whose body never finishes arriving: the request holds its turn until the socket closes."""
    parsed = httpx.URL(url)
    sock = socket.create_connection((parsed.host, parsed.port or 80))
    head = (
        "POST /files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        "Content-Length: 1000\r\n\r\n--b\r\n"
    )
    sock.sendall(head.encode())
    try:
        yield sock
    finally:
        sock.close()


def _wait_in_flight(http: httpx.Client, path: str, status: int) -> httpx.Response:
    """The held request reaches the middleware a moment after its bytes are sent: ask until it has."""
    for _ in range(100):
        response = http.get(path)
        if response.status_code == status:
            return response
    raise AssertionError(f"GET {path} never answered {status}; last {response.status_code} {response.text}")


@pytest.mark.limits(max_requests_in_flight=1, request_queue_s=0.2, max_requests_in_flight_per_client=100)
def test_past_the_server_limit_a_request_gets_a_fast_503_with_retry_after(svc_server: str) -> None:
    with httpx.Client(base_url=svc_server, timeout=30) as http, held_request(svc_server):
        busy = _wait_in_flight(http, "/jobs", 503)
        assert busy.headers["Retry-After"] == "1"
        error = busy.json()["error"]
        assert error["code"] == "busy" and "max_requests_in_flight" in error["message"]
        assert http.get("/healthz").status_code == 200  # probes never wait for a turn
        assert http.get("/metrics").status_code == 200
    with httpx.Client(base_url=svc_server, timeout=30) as http:
        assert http.get("/jobs").status_code == 200  # the turn came back when the request ended


@pytest.mark.limits(max_requests_in_flight_per_client=1)
def test_one_client_past_its_share_gets_429_and_others_go_on(svc_server: str) -> None:
    with httpx.Client(base_url=svc_server, timeout=30) as http, held_request(svc_server):
        limited = _wait_in_flight(http, "/jobs", 429)
        assert limited.headers["Retry-After"] == "1"
        assert "max_requests_in_flight_per_client" in limited.json()["error"]["message"]
        # Another client (here: another API key's bucket, as the rate limit keys them) is let through.
        other = http.get("/jobs", headers={"Authorization": "Bearer another-client"})
        assert other.status_code == 200  # auth=none in these tests: the header only picks the bucket
