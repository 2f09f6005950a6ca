"""The official `openai` client, unchanged, against a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import calendar
import os
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import openai
import pytest

from tests.fixtures_inference import ANSWERS, DEVELOPER, QUESTION, LiveServer


@pytest.fixture
def client(inference_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{inference_server.url}/v1", api_key="unused-auth-is-off", max_retries=0)


def chat(**extra: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": DEVELOPER}, {"role": "user", "content": QUESTION}]
    return {"messages": messages, "max_tokens": 12, "temperature": 0, "reasoning_effort": "low", **extra}


def test_models_lists_the_base_and_every_adapter(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert models[0].id == "tiny-gpt-oss"
    assert {"capitals", "continents"} <= {m.id for m in models}
    adapters = [m for m in models if m.owned_by == "adapter"]
    assert all(abs(m.created - time.time()) < 3600 for m in adapters)  # registered by this session


def test_created_times_are_utc_whatever_the_local_zone() -> None:
    """The database keeps naive UTC; reading it as local time would shift `created` by the zone."""
    from app.api.routes.openai_compat import unix_time

    stored = datetime(2026, 1, 2, 3, 4, 5)  # naive, as SQLite returns it
    expected = calendar.timegm(stored.timetuple())
    old_tz = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"  # five hours from UTC: the old bug would show here
    time.tzset()
    try:
        assert unix_time(stored) == expected
        assert unix_time(stored.replace(tzinfo=UTC)) == expected
    finally:
        if old_tz is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old_tz
        time.tzset()


def test_chat_completion_with_an_adapter_matches_generate(
    client: openai.OpenAI, inference_server: LiveServer
) -> None:
    done = client.chat.completions.create(model="capitals", **chat())
    message = done.choices[0].message
    assert ANSWERS["capitals"] in (message.content or "")
    assert (message.model_extra or {}).get("reasoning_content") is not None
    assert done.choices[0].finish_reason in ("stop", "length")
    assert done.usage is not None and done.usage.completion_tokens >= 1
    # A system message is the developer instructions, exactly as /generate's `developer` field.
    same = httpx.post(
        f"{inference_server.url}/generate",
        json={
            "adapter": "capitals",
            "developer": DEVELOPER,
            "messages": [{"role": "user", "content": QUESTION}],
            "max_new_tokens": 12,
            "temperature": 0,
            "reasoning_effort": "low",
        },
        timeout=120,
    ).json()
    assert same["content"] == message.content
    assert same["usage"]["prompt_tokens"] == done.usage.prompt_tokens


def test_base_model_and_adapters_answer_differently(client: openai.OpenAI) -> None:
    contents = {
        m: client.chat.completions.create(model=m, **chat()).choices[0].message.content for m in ANSWERS
    }
    assert ANSWERS["continents"] in (contents["continents"] or "")
    assert contents["capitals"] != contents["continents"]


def test_streaming_assembles_to_the_same_message(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model="continents", **chat()).choices[0]
    stream = client.chat.completions.create(
        model="continents", stream=True, stream_options={"include_usage": True}, **chat()
    )
    content, reasoning, finish, usage = "", "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            content += choice.delta.content or ""
            reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            finish = choice.finish_reason or finish
    assert content == plain.message.content
    assert reasoning == (plain.message.model_extra or {}).get("reasoning_content")
    assert finish == plain.finish_reason
    assert usage is not None and usage.completion_tokens >= 1


def test_reasoning_effort_is_honoured(
    client: openai.OpenAI, inference_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.ml.harmony import encoding, render_prompt

    # Watch what the route hands the real engine (the call still goes through to it).
    engine = inference_server.engine
    submitted: list[list[int]] = []
    real_submit = engine.submit

    def watching_submit(prompt_ids: list[int], *args: Any, **kwargs: Any) -> None:
        submitted.append(list(prompt_ids))
        real_submit(prompt_ids, *args, **kwargs)

    monkeypatch.setattr(engine, "submit", watching_submit)
    turns = [{"role": "user", "content": QUESTION}]
    for effort in ["low", "high"]:
        done = client.chat.completions.create(model="capitals", **chat(reasoning_effort=effort))
        assert submitted[-1] == render_prompt(turns, developer=DEVELOPER, reasoning_effort=effort)
        assert done.usage is not None and done.usage.prompt_tokens == len(submitted[-1])
    low, high = (encoding().decode(ids) for ids in submitted)
    assert "Reasoning: low" in low and "Reasoning: high" in high
    assert low.replace("Reasoning: low", "Reasoning: high") == high  # the effort is the only difference
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(model="tiny-gpt-oss", **chat(reasoning_effort="extreme"))
    assert err.value.body["param"] == "reasoning_effort"  # type: ignore[index]


def test_unknown_model_is_an_openai_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", **chat())
    body: dict[str, Any] = err.value.body  # type: ignore[assignment]
    assert body["code"] == "model_not_found" and body["param"] == "model"
    assert "GET /v1/models" in body["message"]


def test_limits_are_openai_errors_naming_the_field(client: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(model="capitals", **chat(max_tokens=1000))
    assert err.value.body["param"] == "max_tokens"  # type: ignore[index]
    assert "at most 64" in err.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(
            model="capitals", messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}], max_tokens=4
        )
    assert err.value.body["param"] == "messages[0].role"  # type: ignore[index]
