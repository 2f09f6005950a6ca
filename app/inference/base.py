"""The engine seam: what the routes, metrics and health checks need from whatever generates, and the
one place that picks the implementation from the settings.

Two engines fit it: `InferenceEngine` (app.inference.engine: the base model in this process,
transformers + PEFT or Unsloth; the default without a GPU and the one the CPU tests run) and
`VllmEngine` (app.inference.vllm_engine: a vLLM OpenAI-compatible server over HTTP, on GPU hosts).
Both take token ids rendered by our harmony renderer and hand token ids to a `TokenSink`, so the
routes, auth, limits, metrics and the harmony parsing are the same whichever generates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from app.config import Settings
from app.exceptions import Busy
from app.inference.gpu_release import GpuReleasePolicy, TrainingProbe
from app.inference.types import AdapterSpec, SamplingParams, TokenSink


class Engine(Protocol):
    @property
    def base_model_id(self) -> str:
        """The base model adapters are checked against (Settings.resolved_base_model)."""
        ...

    @property
    def fingerprint(self) -> str:
        """The base's config fingerprint (app.ml.modeling.config_fingerprint); Busy until known."""
        ...

    @property
    def stats(self) -> Mapping[str, float]:
        """Counters for /metrics and tests."""
        ...

    def start(self) -> None:
        """Get ready to generate (load the base, or reach the server). Idempotent, thread-safe."""

    def close(self) -> None: ...

    def is_ready(self) -> bool: ...

    def check_adapter(self, adapter: AdapterSpec) -> None:
        """NotFound (404) when its files are gone, Conflict (409) when this engine cannot serve it
        (another base, none recorded, or a layout the server refuses), before it is queued."""

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        sink: TokenSink,
        adapter: AdapterSpec | None = None,
    ) -> None:
        """Queue one generation for `adapter` (None = the base); tokens arrive at `sink` on the
        engine's own thread. Busy (503) when full, or while the GPU is given to a training job."""

    def load(self, adapter: AdapterSpec) -> None:
        """Make the adapter resident now, so its first answer does not pay for the load."""

    def unload(self, adapter_id: str) -> None:
        """Forget the adapter (idempotent); requests already running on it finish."""

    def loaded_adapters(self) -> list[str]: ...

    def in_flight(self) -> int:
        """Requests queued or running, against max_concurrent_generations."""
        ...


def create_engine(settings: Settings, *, training_probe: TrainingProbe | None = None) -> Engine:
    """The engine for this process, chosen here only (Settings.engine: vllm where a vLLM server is
    configured, else in-process); nothing is loaded or reached until start(). With
    `release_gpu_during_training`, `training_probe` (True while a job runs) decides when the engine
    gives the GPU to the training job: the in-process engine drops its model, vLLM sleeps."""
    release = None
    if settings.release_gpu_during_training and training_probe is not None:
        release = GpuReleasePolicy(
            training_probe, poll_s=settings.release_poll_s, cooldown_s=settings.release_cooldown_s
        )
    if settings.uses_vllm:
        from app.inference.vllm_engine import VllmEngine

        return VllmEngine(settings, gpu_release=release)
    from app.inference.engine import InferenceEngine

    return InferenceEngine(settings, gpu_release=release)


def busy_training(settings: Settings) -> Busy:
    """The 503 while a training job has the GPU (release_gpu_during_training), for either engine."""
    return Busy(
        "a training job is using the GPU (release_gpu_during_training); generation resumes when it ends",
        retry_after=int(max(settings.release_poll_s, 1) * 5),
    )


def busy_full(settings: Settings) -> Busy:
    """The 503 past max_concurrent_generations requests queued or running, for either engine."""
    return Busy(
        f"{settings.max_concurrent_generations} generations are already queued or running "
        "(max_concurrent_generations); retry shortly",
        retry_after=1,
    )
