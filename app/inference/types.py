"""Plain data passed between the HTTP routes and the engine thread."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class AdapterSpec:
    """What the engine needs to load one adapter: the registry row, reduced to plain values."""

    id: str
    name: str
    path: Path
    fingerprint: str | None
    base_model: str | None = None  # the row's base model id; None = only the manifest on disk is checked


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5


class TokenSink(Protocol):
    """Receives one request's tokens. Called on the engine thread, so implementations must not block."""

    def put_token(self, token_id: int) -> None: ...

    def finish(self, reason: str, completion_tokens: int) -> None: ...

    def fail(self, error: BaseException) -> None: ...

    def cancelled(self) -> bool: ...
