"""POST /generate over real HTTP (uvicorn on 127.0.0.1) with the real tiny model and trained adapters."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest

from tests.fixtures_inference import ANSWERS, DEVELOPER, QUESTION, LiveServer, TrainedAdapter, copy_adapter


def body(**extra: Any) -> dict[str, Any]:
    base = {
        "messages": [{"role": "user", "content": QUESTION}],
        "developer": DEVELOPER,
        "reasoning_effort": "low",
        "max_new_tokens": 12,
        "temperature": 0,
    }
    return {**base, **extra}


def post(server: LiveServer, payload: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}/generate", json=payload, timeout=120)


def sse_events(server: LiveServer, payload: dict[str, Any]) -> list[dict[str, Any]]:
    events = []
    with httpx.stream("POST", f"{server.url}/generate", json=payload, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: ") :]))
    return events


def test_generate_with_each_adapter_and_the_base(inference_server: LiveServer) -> None:
    answers = {}
    for ref in ["capitals", "adp_continents", None]:  # by name, by id, none
        response = post(inference_server, body(adapter=ref))
        assert response.status_code == 200, response.text
        answers[ref] = data = response.json()
        assert data["model"] == "tiny-gpt-oss"
        assert data["finish_reason"] in ("stop", "length")
        assert data["usage"]["prompt_tokens"] > 10
        assert 1 <= data["usage"]["completion_tokens"] <= 12
        assert (
            data["usage"]["total_tokens"]
            == data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"]
        )
        assert {"first_token_ms", "total_ms", "tokens_per_s"} <= set(data["timings"])
    assert answers["capitals"]["adapter"] == "capitals"
    assert answers["adp_continents"]["adapter"] == "continents"
    assert answers[None]["adapter"] is None
    assert ANSWERS["capitals"] in answers["capitals"]["content"]
    assert ANSWERS["continents"] in answers["adp_continents"]["content"]
    metrics = httpx.get(f"{inference_server.url}/metrics", timeout=30).text
    assert 'gptoss_generated_tokens_total{adapter="capitals"}' in metrics
    assert "gptoss_loaded_adapters" in metrics


def test_prompt_shorthand_equals_one_user_message(inference_server: LiveServer) -> None:
    as_messages = post(inference_server, body(adapter="capitals")).json()
    payload = body(adapter="capitals", prompt=QUESTION)
    del payload["messages"]
    as_prompt = post(inference_server, payload).json()
    assert as_prompt["content"] == as_messages["content"]
    assert as_prompt["usage"] == as_messages["usage"]


def test_streaming_assembles_to_the_non_streamed_answer(inference_server: LiveServer) -> None:
    for adapter in ["capitals", "continents"]:
        plain = post(inference_server, body(adapter=adapter)).json()
        events = sse_events(inference_server, body(adapter=adapter, stream=True))
        deltas, done = events[:-1], events[-1]
        assert all(e["type"] == "delta" for e in deltas) and done["type"] == "done"
        assert "".join(e["text"] for e in deltas if e["kind"] == "content") == plain["content"]
        assert "".join(e["text"] for e in deltas if e["kind"] == "reasoning") == plain["reasoning"]
        for key in ["content", "reasoning", "finish_reason", "usage", "adapter"]:
            assert done[key] == plain[key]


def test_a_client_that_disconnects_stops_its_generation(inference_server: LiveServer) -> None:
    engine = inference_server.engine
    cancelled_before = engine.stats["cancelled"]
    with httpx.stream(
        "POST", f"{inference_server.url}/generate", json=body(stream=True, max_new_tokens=64), timeout=60
    ) as response:
        assert response.status_code == 200
    # The row is cancelled at its next token rather than decoding all 64 for nobody.
    deadline = time.monotonic() + 30
    while engine.stats["cancelled"] == cancelled_before:
        assert time.monotonic() < deadline, "the abandoned generation kept running"
        time.sleep(0.01)


def test_stop_string_cuts_the_content(inference_server: LiveServer) -> None:
    full = post(inference_server, body(adapter="capitals")).json()["content"]
    assert full, "the capitals adapter should answer something"
    stop = full[1:3]
    cut = post(inference_server, body(adapter="capitals", stop=[stop])).json()
    assert cut["content"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"


def test_adapter_registered_after_start_is_served_without_restart(
    inference_server: LiveServer, task_adapters: dict[str, TrainedAdapter]
) -> None:
    assert post(inference_server, body(adapter="late-capitals")).status_code == 404
    folder = copy_adapter(task_adapters["capitals"], inference_server.settings.adapters_dir / "adp_late")
    inference_server.register("adp_late", "late-capitals", folder)
    late = post(inference_server, body(adapter="late-capitals"))
    assert late.status_code == 200, late.text
    assert late.json()["content"] == post(inference_server, body(adapter="capitals")).json()["content"]


def test_deleting_an_adapter_unloads_it(
    inference_server: LiveServer, task_adapters: dict[str, TrainedAdapter]
) -> None:
    folder = copy_adapter(task_adapters["continents"], inference_server.settings.adapters_dir / "adp_doomed")
    inference_server.register("adp_doomed", "doomed", folder)
    assert post(inference_server, body(adapter="doomed")).status_code == 200
    assert "adp_doomed" in inference_server.engine.loaded_adapters()
    assert httpx.delete(f"{inference_server.url}/adapters/adp_doomed", timeout=60).status_code in (200, 204)
    assert "adp_doomed" not in inference_server.engine.loaded_adapters()
    assert post(inference_server, body(adapter="doomed")).status_code == 404


def test_adapter_lookups_are_remembered_for_at_most_their_ttl(
    inference_server: LiveServer, task_adapters: dict[str, TrainedAdapter]
) -> None:
    """The generation routes remember an adapter lookup for AdapterLookup.TTL_S: a row deleted behind
    this API's back (another API process) is still served within that bound, and refused after it. A
    deletion through this API forgets at once (test_deleting_an_adapter_unloads_it)."""
    from app.api.deps import AdapterLookup
    from app.models import Adapter

    folder = copy_adapter(task_adapters["capitals"], inference_server.settings.adapters_dir / "adp_ttl")
    inference_server.register("adp_ttl", "ttl", folder)
    assert post(inference_server, body(adapter="ttl")).status_code == 200
    with inference_server.app.state.sessionmaker() as session:  # type: ignore[attr-defined]
        session.delete(session.get(Adapter, "adp_ttl"))
        session.commit()
    assert post(inference_server, body(adapter="ttl")).status_code == 200  # remembered
    time.sleep(AdapterLookup.TTL_S + 0.2)
    assert post(inference_server, body(adapter="ttl")).status_code == 404


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


def test_unknown_adapter_is_404(inference_server: LiveServer) -> None:
    error = _error(post(inference_server, body(adapter="no-such-adapter")), 404)
    assert error["field"] == "adapter" and "no-such-adapter" in error["message"]


def test_adapter_for_another_base_is_409(
    inference_server: LiveServer, task_adapters: dict[str, TrainedAdapter]
) -> None:
    folder = copy_adapter(
        task_adapters["capitals"], inference_server.settings.adapters_dir / "adp_alien", fingerprint="a" * 64
    )
    inference_server.register("adp_alien", "alien", folder)
    error = _error(post(inference_server, body(adapter="alien")), 409)
    assert error["field"] == "adapter"
    assert "trained for another base model: 'tiny-gpt-oss' (fingerprint aaaaaaaaaaaa)" in error["message"]
    loaded = inference_server.engine.fingerprint[:12]
    assert f"this server runs 'tiny-gpt-oss' (fingerprint {loaded})" in error["message"]
    assert "adp_alien" not in inference_server.engine.loaded_adapters()
    # An adapter whose manifest records no fingerprint cannot be checked, so it is not served either.
    folder = copy_adapter(
        task_adapters["capitals"],
        inference_server.settings.adapters_dir / "adp_unsigned",
        manifest={"base_fingerprint": None},
    )
    inference_server.register("adp_unsigned", "unsigned", folder)
    error = _error(post(inference_server, body(adapter="unsigned")), 409)
    assert "does not record which base model" in error["message"] and "base_fingerprint" in error["message"]


def test_default_max_new_tokens_fits_a_lower_cap(inference_server: LiveServer) -> None:
    cap = inference_server.settings.max_new_tokens_cap
    assert cap < 512  # the fixture's cap is below the default, the case this covers
    payload = body(adapter="capitals")
    del payload["max_new_tokens"]
    response = post(inference_server, payload)
    assert response.status_code == 200, response.text
    assert 1 <= response.json()["usage"]["completion_tokens"] <= cap


@pytest.mark.parametrize(
    ("change", "field", "needle"),
    [
        ({"max_new_tokens": 65}, "max_new_tokens", "at most 64"),
        ({"max_new_tokens": 0}, "max_new_tokens", "greater than or equal to 1"),
        ({"messages": [{"role": "user", "content": "word " * 600}]}, "messages", "at most 512"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort", "'low', 'medium' or 'high'"),
        ({"temperature": 3}, "temperature", "less than or equal to 2"),
        ({"top_p": 0}, "top_p", "greater than 0"),
        ({"prompt": "hi"}, "body", "exactly one of 'messages' or 'prompt'"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", "'user'"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4 stop strings"),
        ({"colour": "blue"}, "colour", "Extra inputs"),
    ],
)
def test_bad_input_is_422_naming_the_field(
    inference_server: LiveServer, change: dict[str, Any], field: str, needle: str
) -> None:
    error = _error(post(inference_server, body(**change)), 422)
    assert error["field"] == field, error
    assert needle in error["message"], error


def test_busy_server_answers_503_with_retry_after(inference_server: LiveServer) -> None:
    engine = inference_server.engine
    limit = engine.settings.max_concurrent_generations
    engine.settings.max_concurrent_generations = 1
    first = threading.Thread(target=post, args=(inference_server, body(max_new_tokens=64)))
    try:
        first.start()  # the base model rarely stops early, so this holds the only slot for a while
        deadline = time.monotonic() + 60
        while engine.in_flight() == 0:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        busy = post(inference_server, body())
        assert busy.status_code == 503, busy.text
        assert int(busy.headers["Retry-After"]) >= 1
        assert busy.json()["error"]["code"] == "busy"
    finally:
        first.join()
        engine.settings.max_concurrent_generations = limit
    assert post(inference_server, body()).status_code == 200
