"""Property-based fuzz of the whole OpenAPI document (schemathesis), with API keys on and off.

Every operation gets schema-valid and schema-breaking requests generated from /openapi.json and sent
to the real app in-process (its own SQLite file, the tiny model loaded). Checked for each answer: no
5xx; the status is one the document lists for the route; the body and the Content-Type match what it
documents; data the schema forbids is refused. Generations stay short through the server's own
limits (max_new_tokens_cap, max_prompt_tokens), not by leaving the generate routes out.

The run is bounded and repeatable: FUZZ_EXAMPLES examples per operation (GPTOSS_FUZZ_EXAMPLES to
raise it locally), derandomized, so CI sees the same cases every time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app import keys
from app.config import Settings
from app.main import create_app

FUZZ_EXAMPLES = int(os.environ.get("GPTOSS_FUZZ_EXAMPLES", "25"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
]
FUZZ_SETTINGS = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def _app(root: Path, models_dir: Path, auth: str) -> Iterator[tuple[Any, dict[str, str]]]:
    config = Settings(
        data_dir=root / "data",
        models_dir=models_dir,
        base_model="tiny-gpt-oss",
        backend="hf",
        auth=auth,  # type: ignore[arg-type]
        log_json=False,
        log_level="ERROR",
        rate_limit_per_minute=0,
        max_requests_in_flight_per_client=1000,
        max_new_tokens_cap=2,
        max_prompt_tokens=64,
    )
    app = create_app(config)
    with TestClient(app):  # runs the lifespan: migrations, the inference engine with the tiny model
        headers: dict[str, str] = {}
        if auth == "keys":
            with app.state.sessionmaker() as session:
                _, secret = keys.create_api_key(session, "fuzz", ["admin"])
            headers = {"Authorization": f"Bearer {secret}"}
        yield app, headers


@pytest.fixture(scope="module")
def keys_off(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[tuple[Any, dict]]:
    yield from _app(tmp_path_factory.mktemp("fuzz-open"), models_dir, "none")


@pytest.fixture(scope="module")
def keys_on(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[tuple[Any, dict]]:
    yield from _app(tmp_path_factory.mktemp("fuzz-keys"), models_dir, "keys")


def fuzz(app: Any, headers: dict[str, str], examples: int) -> list[str]:
    """Run every operation's generated cases; returns one line per distinct failure (all of them, not
    just the first, so a run lists what is left to fix)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures: list[str] = []
    for result in schema.get_all_operations():
        if not isinstance(result, Ok):
            failures.append(f"the document has an operation schemathesis cannot read: {result.err()}")
            continue
        failures += _fuzz_operation(result.ok(), headers, examples)
    return failures


def _fuzz_operation(operation: Any, headers: dict[str, str], examples: int) -> list[str]:
    found: list[str] = []

    @settings(FUZZ_SETTINGS, max_examples=examples)
    @given(case=operation.as_strategy())
    def run(case: Any) -> None:
        try:
            case.call_and_validate(headers=headers, checks=CHECKS)
        except (Exception, BaseExceptionGroup) as err:  # a failed check: noted, and the search goes on
            summary = " ".join(str(err).split())[:400]
            if len(found) < 3 and not any(summary in line for line in found):
                found.append(f"{operation.label}: {summary}\n    {case.as_curl_command()[:300]}")

    run()
    return found


def test_every_operation_with_keys_off(keys_off: tuple[Any, dict[str, str]]) -> None:
    failures = fuzz(keys_off[0], keys_off[1], FUZZ_EXAMPLES)
    assert not failures, "\n".join(failures)


def test_every_operation_with_an_admin_key(keys_on: tuple[Any, dict[str, str]]) -> None:
    failures = fuzz(keys_on[0], keys_on[1], FUZZ_EXAMPLES)
    assert not failures, "\n".join(failures)


def test_every_operation_without_a_key(keys_on: tuple[Any, dict[str, str]]) -> None:
    """No key at all: every answer is still one the document lists (401 for the guarded routes)."""
    failures = fuzz(keys_on[0], {}, max(FUZZ_EXAMPLES // 3, 3))
    assert not failures, "\n".join(failures)
