"""Hostile or careless input (issue 16): each of these was a 500, or was accepted and wrong. Each is a
4xx now whose error names the field. The real app on a real SQLite file (svc_client)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.fixtures_ml import train_sample_adapter
from tests.fixtures_service import SMALL_TRAINING

JSON = {"Content-Type": "application/json"}


def error_of(response: Any, status: int = 422) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


def test_an_upload_that_is_not_utf8_names_its_row(svc_client: TestClient) -> None:
    good = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    bad = b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}\n'
    error = error_of(svc_client.post("/files", files={"file": ("d.jsonl", good + bad)}))
    assert error["field"] == "file" and error["row"] == 2
    assert "not UTF-8" in error["message"] and "0xff" in error["message"]


def test_an_upload_nested_100000_levels_deep_is_refused(svc_client: TestClient) -> None:
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    error = error_of(svc_client.post("/files", files={"file": ("d.jsonl", deep)}))
    assert error["field"] == "file" and error["row"] == 1 and "nested too deeply" in error["message"]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_generate_refuses_non_finite_floats(svc_client: TestClient, value: str) -> None:
    body = f'{{"prompt": "hi", "temperature": {value}, "max_new_tokens": 2}}'
    error = error_of(svc_client.post("/generate", content=body, headers=JSON))
    assert error["field"] == "temperature" and "finite number" in error["message"]
    body = f'{{"prompt": "hi", "top_p": {value}}}'
    assert error_of(svc_client.post("/generate", content=body, headers=JSON))["field"] == "top_p"


def test_openai_chat_refuses_non_finite_temperature(svc_client: TestClient) -> None:
    body = '{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
    error = error_of(svc_client.post("/v1/chat/completions", content=body, headers=JSON))
    assert error["param"] == "temperature" and "finite number" in error["message"]


def test_a_seed_beyond_64_bits_is_refused_on_both_generate_routes(svc_client: TestClient) -> None:
    error = error_of(svc_client.post("/generate", json={"prompt": "hi", "seed": 2**70}))
    assert error["field"] == "seed" and str(2**63 - 1) in error["message"]
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": 2**64}
    error = error_of(svc_client.post("/v1/chat/completions", json=chat))
    assert error["param"] == "seed"


def test_an_events_cursor_beyond_64_bits_is_refused(svc_client: TestClient) -> None:
    job = svc_client.post("/jobs", json={"dataset": "sample:capitals", "hyperparameters": SMALL_TRAINING})
    url = f"/jobs/{job.json()['id']}/events?after=99999999999999999999999"
    error = error_of(svc_client.get(url))
    assert error["field"] == "after"


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_steps", True), ("lora_r", "8"), ("packing", 1), ("save_steps", 2.0)],
)
def test_hyperparameters_take_no_bool_for_an_int_nor_a_string_for_a_number(
    svc_client: TestClient, field: str, value: Any
) -> None:
    body = {"dataset": "sample:capitals", "hyperparameters": {**SMALL_TRAINING, field: value}}
    error = error_of(svc_client.post("/jobs", json=body))
    assert error["field"] == f"hyperparameters.{field}"


def test_a_float_hyperparameter_still_takes_an_int(svc_client: TestClient) -> None:
    body = {"dataset": "sample:capitals", "hyperparameters": {**SMALL_TRAINING, "eval_fraction": 0}}
    assert svc_client.post("/jobs", json=body).status_code == 201


def test_a_nan_learning_rate_is_called_not_finite(svc_client: TestClient) -> None:
    body = '{"dataset": "sample:capitals", "hyperparameters": {"learning_rate": NaN}}'
    error = error_of(svc_client.post("/jobs", content=body, headers=JSON))
    assert error["field"] == "hyperparameters.learning_rate"
    assert error["message"] == "hyperparameters.learning_rate: Input should be a finite number"


def test_a_target_module_that_matches_nothing_fails_training_naming_it(
    models_dir: Path, tmp_path: Path
) -> None:
    """PEFT refuses only a list that matches nothing; here a good name sits beside a misspelt one."""
    with pytest.raises(
        ValueError, match=r"target_modules: 'no_such_module' matches no module of tiny-gpt-oss"
    ):
        train_sample_adapter(
            models_dir, tmp_path, "sample:capitals", target_modules=["q_proj", "no_such_module"]
        )
    assert not (tmp_path / "adapter").exists()
