"""Request and response shapes of POST /generate and the OpenAI-compatible routes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.ml.harmony import ReasoningEffort

MAX_STOP_STRINGS = 4
DEFAULT_MAX_NEW_TOKENS = 512  # /generate's default, lowered to the server's cap when that is smaller
MAX_SEED = 2**63 - 1  # torch's generators take a signed 64-bit seed


def _check_stop(value: str | list[str] | None) -> list[str]:
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings; got {len(stops)}")
    if any(not s for s in stops):
        raise ValueError("stop strings must not be empty")
    return stops


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant", "system", "developer"]
    content: str = Field(max_length=1_000_000)
    thinking: str | None = Field(None, description="An assistant turn's reasoning (analysis channel).")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        # The rule _one_input enforces, stated in /openapi.json too.
        json_schema_extra={
            "oneOf": [
                {
                    "required": ["messages"],
                    "properties": {"messages": {"type": "array"}, "prompt": {"type": "null"}},
                },
                {
                    "required": ["prompt"],
                    "properties": {"prompt": {"type": "string"}, "messages": {"type": "null"}},
                },
            ]
        },
    )

    adapter: str | None = Field(None, description="Adapter id or name; omitted = the plain base model.")
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=1000)
    prompt: str | None = Field(None, description="Shorthand for one user message.", max_length=1_000_000)
    developer: str | None = Field(None, description="Developer instructions (harmony developer message).")
    reasoning_effort: ReasoningEffort = "medium"
    max_new_tokens: int | None = Field(
        None,
        ge=1,
        description="At most the server's max_new_tokens_cap; "
        f"omitted: min({DEFAULT_MAX_NEW_TOKENS}, that cap).",
    )
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy (deterministic).")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Makes sampling repeatable.")
    stop: list[str] | str | None = Field(
        None, description=f"Up to {MAX_STOP_STRINGS} strings ending the content."
    )
    stream: bool = Field(False, description="Server-sent events: text deltas, then a final event.")

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        return _check_stop(value)

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("send exactly one of 'messages' or 'prompt'")
        return self

    def chat(self) -> list[dict[str, Any]]:
        if self.messages is not None:
            return [m.model_dump() for m in self.messages]
        return [{"role": "user", "content": self.prompt}]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    id: str
    model: str
    adapter: str | None = Field(description="The adapter's name, or null for the base model.")
    reasoning: str
    content: str
    finish_reason: str = Field(description="stop | length | cancelled")
    usage: Usage
    timings: dict[str, float]


# --- OpenAI-compatible ---------------------------------------------------------------------------


class OpenAIMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ... are accepted and ignored

    role: str
    content: str | list[dict[str, Any]] | None = None
    reasoning_content: str | None = None


class ChatCompletionRequest(BaseModel):
    # extra: the official client may send fields we do not use. No NaN or infinity in the floats.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str
    messages: list[OpenAIMessage] = Field(min_length=1, max_length=1000)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    reasoning_effort: ReasoningEffort = "medium"
    n: int = Field(1, ge=1, le=1, description="One choice per request.")

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        return _check_stop(value)
