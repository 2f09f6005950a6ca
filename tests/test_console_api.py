"""The console's server side: the page and its files, the offline /docs, the live streams, auth.

The browser itself is driven in tests/test_console_browser.py; these check the HTTP contract."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.api.routes.console import JobsFeed
from app.api.routes.docs import ASSETS
from app.config import Settings
from app.main import create_app
from tests.test_auth_keys import bearer, create_key


def test_console_page_and_files_are_served_without_a_key(svc_client: TestClient) -> None:
    page = svc_client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/console/static/console.js"' in page.text
    for name, kind in [("console.js", "javascript"), ("console.css", "css"), ("favicon.svg", "svg")]:
        response = svc_client.get(f"/console/static/{name}")
        assert response.status_code == 200 and kind in response.headers["content-type"], name
    assert svc_client.get("/console/static/..%2Fapi%2Froutes%2Fconsole.py").status_code == 404
    assert svc_client.get("/console/static/index.html").status_code == 404  # only the listed files


def test_docs_and_redoc_load_their_assets_from_this_server(svc_client: TestClient) -> None:
    docs, redoc = svc_client.get("/docs"), svc_client.get("/redoc")
    assert docs.status_code == redoc.status_code == 200
    for page in (docs, redoc):
        assert "cdn." not in page.text and "googleapis" not in page.text  # nothing from outside
    assert "/docs/assets/swagger-ui-bundle.js" in docs.text and "/docs/assets/swagger-ui.css" in docs.text
    assert "'/openapi.json'" in docs.text or '"/openapi.json"' in docs.text
    assert "/docs/assets/redoc.standalone.js" in redoc.text
    for name in ASSETS:
        asset = svc_client.get(f"/docs/assets/{name}")
        assert asset.status_code == 200 and len(asset.content) > 1000, name
    assert svc_client.get("/docs/assets/other.js").status_code == 404
    assert svc_client.get("/docs/oauth2-redirect").status_code == 200
    assert svc_client.get("/openapi.json").json()["info"]["title"] == "gpt-oss tuner"


def test_config_tells_the_page_the_auth_mode_and_samples(svc_client: TestClient) -> None:
    config = svc_client.get("/console/config").json()
    assert config["auth"] == "none" and config["base_model"] == "tiny-gpt-oss"
    assert "sample:capitals" in config["samples"]


@pytest.fixture
def keyed(svc_settings: Settings) -> Iterator[tuple[TestClient, str]]:
    settings = svc_settings.model_copy(update={"auth": "keys"})
    with TestClient(create_app(settings)) as client:  # the lifespan creates the schema first
        made = create_key(settings, "read")
        assert made.returncode == 0, made.stderr
        yield client, made.stdout.strip()


def test_with_keys_on_the_page_and_docs_stay_public_and_the_data_does_not(
    keyed: tuple[TestClient, str],
) -> None:
    client, key = keyed
    for path in ("/", "/console/static/console.js", "/console/config", "/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 200, path
    assert client.get("/console/config").json()["auth"] == "keys"
    for path in ("/console/events", "/console/jobs/ftjob_0/events", "/jobs"):
        refused = client.get(path)
        assert refused.status_code == 401, path
        assert refused.json()["error"]["field"] == "Authorization"
    # With the key, a missing job is a 404 before any stream starts.
    assert client.get("/console/jobs/ftjob_0/events", headers=bearer(key)).status_code == 404


def read_events(response: httpx.Response, until: str) -> list[tuple[str, object]]:
    """Parse server-sent events from a streaming response until one named `until` arrives."""
    events: list[tuple[str, object]] = []
    name = "message"
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            events.append((name, json.loads(line.split(":", 1)[1])))
            if name == until:
                return events
    raise AssertionError(f"stream ended before a {until!r} event: {events}")


def test_streams_send_the_job_list_and_a_finished_job_to_its_end(svc_server: str, tmp_path: Path) -> None:
    with httpx.Client(base_url=svc_server, timeout=30) as http:
        job = http.post("/jobs", json={"dataset": "sample:capitals", "suffix": "streamed"}).json()
        cancelled = http.post(f"/jobs/{job['id']}/cancel").json()  # a queued job is cancelled at once
        assert cancelled["status"] == "cancelled"
        with http.stream("GET", "/console/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            (_, listed), *_ = read_events(stream, "jobs")
        rows = listed["jobs"]  # type: ignore[index]
        assert [(r["id"], r["status"], r["name"]) for r in rows] == [(job["id"], "cancelled", "streamed")]

        with http.stream("GET", f"/console/jobs/{job['id']}/events") as stream:
            events = read_events(stream, "end")
        names = [name for name, _ in events]
        assert names[0] == "job" and names[-1] == "end" and "events" in names
        assert events[0][1]["status"] == "cancelled"  # type: ignore[index]
        sent = [e for name, batch in events if name == "events" for e in batch]  # type: ignore[attr-defined]
        api_events = http.get(f"/jobs/{job['id']}/events").json()["data"]
        assert [e["id"] for e in sent] == [e["id"] for e in api_events]  # every event, once, in order

        # A client that reconnects with `after` gets only what it has not seen.
        with http.stream("GET", f"/console/jobs/{job['id']}/events?after={sent[-1]['id']}") as stream:
            again = read_events(stream, "end")
        assert [name for name, _ in again] == ["job", "end"]


def test_jobs_feed_reads_once_per_interval_for_all_listeners() -> None:
    reads = []

    def read() -> str:
        reads.append(1)
        return json.dumps({"jobs": [], "read": len(reads) // 3})  # changes every third read

    async def listen(feed: JobsFeed, count: int) -> list[str]:
        got: list[str] = []
        async for text in feed.follow():
            if text is not None:
                got.append(text)
            if len(got) == count:
                return got
        return got

    async def main() -> tuple[list[str], list[str]]:
        feed = JobsFeed(read, interval_s=0.02)
        first, second = await asyncio.gather(listen(feed, 3), listen(feed, 3))
        await asyncio.sleep(0.1)  # with nobody listening the reading task stops
        stopped_at = len(reads)
        await asyncio.sleep(0.1)
        assert len(reads) == stopped_at
        return first, second

    first, second = asyncio.run(main())
    assert first == second  # both saw the same snapshots, each exactly once
    assert len(set(first)) == 3
    assert len(reads) <= 3 * 3 + 2  # one reader for both listeners: ~3 reads per change, not 6
