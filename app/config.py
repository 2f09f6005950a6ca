"""One Settings object for the API, the worker, the command line and migrations/env.py.

Every field is read from the environment with the prefix ``GPTOSS_`` (``GPTOSS_DATA_DIR``,
``GPTOSS_BASE_MODEL``, ...) or from a ``.env`` file in the working directory.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The embedded default: a tiny random-init GPT-OSS-architecture model the project generates itself.
TINY_MODEL_ID = "tiny-gpt-oss"
# The real model, used where a CUDA GPU is present and base_model is "auto".
GPU_DEFAULT_MODEL_ID = "unsloth/gpt-oss-20b"


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return bool(torch.cuda.is_available())


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GPTOSS_", env_file=".env", extra="ignore")

    # --- storage -------------------------------------------------------------------------------
    data_dir: Path = Field(Path("data"), description="Database, uploads, checkpoints, adapters, tokenizer.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite:///<data_dir>/service.db"
    )
    models_dir: Path | None = Field(
        None,
        description="Generated models (the tiny default), offline tokenizer; default <data_dir>/models",
    )
    db_pool_size: int = Field(
        10, ge=1, le=1000, description="PostgreSQL: connections each process keeps open (ignored on SQLite)."
    )
    db_max_overflow: int = Field(
        30,
        ge=0,
        le=1000,
        description="PostgreSQL: extra connections a process may open under load (with db_pool_size, "
        "40: one for each thread of the API's threadpool).",
    )

    # --- model ---------------------------------------------------------------------------------
    base_model: str = Field(
        "auto",
        description=f"'auto' = {GPU_DEFAULT_MODEL_ID} with a CUDA GPU or a vLLM server (vllm_url), else the "
        f"embedded '{TINY_MODEL_ID}'. Also a hub id or a local folder. Adapters are checked against it.",
    )
    backend: Literal["auto", "unsloth", "hf"] = Field(
        "auto", description="'auto' = unsloth where CUDA and Unsloth are present, else transformers+PEFT"
    )
    load_in_4bit: bool = Field(True, description="Load the base in 4-bit on CUDA (ignored on CPU).")
    max_seq_length: int = Field(2048, ge=64, le=131072, description="Longest training sequence, tokens.")

    # --- auth ------------------------------------------------------------------------------------
    auth: Literal["keys", "none"] = Field(
        "keys", description="'keys': Bearer API keys on every route but health. 'none': local use only."
    )
    host: str = Field("127.0.0.1", description="Address the API binds to.")
    port: int = Field(8000, ge=1, le=65535, description="Port the API listens on.")

    # --- limits ------------------------------------------------------------------------------------
    max_upload_bytes: int = Field(100 * 1024 * 1024, ge=1, description="Largest dataset upload.")
    max_request_bytes: int = Field(2 * 1024 * 1024, ge=1, description="Largest JSON request body.")
    max_dataset_rows: int = Field(100_000, ge=1, description="Most rows in one dataset.")
    max_new_tokens_cap: int = Field(4096, ge=1, description="Largest max_new_tokens a request may ask.")
    max_prompt_tokens: int = Field(8192, ge=16, description="Longest prompt /generate accepts.")
    max_concurrent_generations: int = Field(64, ge=1, description="Queued+running generations before 503.")
    max_batch_size: int = Field(16, ge=1, description="Most rows the engine decodes together.")
    rate_limit_per_minute: int = Field(600, ge=0, description="Requests per API key per minute; 0 = off.")
    api_threads: int = Field(
        40,
        ge=1,
        le=1000,
        description="Threads that run the API's blocking route code; each holds at most one database "
        "connection, and the SQLite connection pool is sized to match.",
    )
    max_requests_in_flight: int = Field(
        64,
        ge=1,
        description="Requests the API works on at once (probes and /metrics aside); more wait up to "
        "request_queue_s for a turn, then get 503 + Retry-After.",
    )
    max_requests_in_flight_per_client: int = Field(
        16,
        ge=1,
        description="Requests one API key (or, with keys off, one client address) may have in progress; "
        "more are answered 429 + Retry-After at once.",
    )
    request_queue_s: float = Field(
        5.0,
        ge=0,
        le=60,
        description="How long a request waits for a turn when max_requests_in_flight are being served.",
    )

    # --- inference -----------------------------------------------------------------------------------
    adapter_cache_size: int = Field(8, ge=1, description="Adapters kept loaded (LRU; pinned ones stay).")
    pinned_adapters: list[str] = Field(default_factory=list, description="Adapter ids never evicted.")
    unsloth_multi_adapter: bool = Field(
        True,
        description="Let the Unsloth backend keep several adapters loaded (its expert-LoRA lookup is "
        "patched to follow the active adapter; app/ml/unsloth_fixes.py). Off, or where that patch "
        "cannot be applied: one adapter at a time, reloaded on every switch.",
    )
    release_gpu_during_training: bool = Field(
        False,
        description="One-GPU hosts: the API frees its model while a training job runs, and loads it "
        "again only once no job has run for release_cooldown_s (so it does not reload between queued jobs).",
    )
    load_model_on_start: bool = Field(True, description="Load the base model when the API starts.")
    batch_window_ms: float = Field(
        5.0,
        ge=0,
        le=1000,
        description="How long the engine waits for requests arriving together to share a batch.",
    )
    release_poll_s: float = Field(
        2.0,
        gt=0,
        description="With release_gpu_during_training: how often the engine looks for running jobs.",
    )
    release_cooldown_s: float = Field(
        15.0,
        ge=0,
        description="With release_gpu_during_training: how long no job must be running before the model is "
        "loaded again. Longer than the worker's gap between finishing one job and claiming the next "
        "(worker_poll_s), so a queue of jobs keeps the GPU and the model is not reloaded between them.",
    )

    # --- engine: who generates --------------------------------------------------------------------
    engine: Literal["auto", "inprocess", "vllm"] = Field(
        "auto",
        description="'inprocess': this process loads the base and generates (transformers + PEFT, or "
        "Unsloth). 'vllm': a vLLM OpenAI-compatible server at vllm_url generates; the API keeps routes, "
        "auth, limits and the harmony handling. 'auto' = vllm when vllm_url is set, else inprocess.",
    )
    vllm_url: str | None = Field(
        None, description="The vLLM server's base URL (e.g. http://vllm:8000); unset: no vLLM server."
    )
    vllm_served_model: str | None = Field(
        None,
        description="vLLM's name for the base model (its --served-model-name); unset: the base model "
        "that vLLM's /v1/models lists.",
    )
    vllm_api_key: str | None = Field(None, description="vLLM's --api-key, when the vLLM server has one.")
    vllm_max_lora_rank: int = Field(
        16,
        ge=1,
        description="The vLLM server's --max-lora-rank: an adapter of a higher rank is refused (409) "
        "before it is sent.",
    )
    vllm_max_cpu_loras: int = Field(
        8,
        ge=1,
        description="Adapters kept registered in vLLM (its --max-cpu-loras); past it the least recently "
        "used one without requests running is unloaded.",
    )
    vllm_timeout_s: float = Field(
        600.0, gt=0, description="Longest wait for one vLLM answer (a whole streamed generation)."
    )
    vllm_connect_timeout_s: float = Field(
        5.0, gt=0, description="Longest wait to connect to vLLM; past it a request gets 503 + Retry-After."
    )

    # --- worker --------------------------------------------------------------------------------------
    worker_poll_s: float = Field(1.0, gt=0, description="How often an idle worker looks for a job.")
    heartbeat_s: float = Field(5.0, gt=0, description="Worker heartbeat interval.")
    lease_s: float = Field(60.0, gt=0, description="A job whose heartbeat is older than this is requeued.")
    max_attempts: int = Field(
        3,
        ge=1,
        description="Attempts per job that may fail by themselves (a training error, a crash of the training "
        "process) before the job is failed; each retry resumes from the last checkpoint. A bad dataset or "
        "config fails at once; lost attempts count against max_lost_attempts instead.",
    )
    max_lost_attempts: int = Field(
        30,
        ge=1,
        description="Attempts a job may lose to crashes that are not its doing (its worker killed or "
        "gone past its lease, its training child killed, e.g. by the out-of-memory killer) before it "
        "fails as worker_lost; each lost attempt resumes from the last checkpoint. Counted apart from "
        "max_attempts, so a crash loop ends without a flaky host failing sound jobs.",
    )
    worker_gpu: int | None = Field(
        None,
        ge=0,
        description="Pin the worker and its training processes to this CUDA device (one worker per GPU); "
        "unset: they see every GPU of the host.",
    )

    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR.")
    log_json: bool = Field(True, description="One JSON object per log line.")

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        if self.engine == "vllm" and not self.vllm_url:
            raise ValueError("engine 'vllm' needs vllm_url (GPTOSS_VLLM_URL), the vLLM server's base URL")
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.data_dir.resolve() / 'service.db'}"
        if self.models_dir is None:
            self.models_dir = self.data_dir / "models"
        return self

    # --- derived paths ------------------------------------------------------------------------------
    @property
    def db_url(self) -> str:
        assert self.database_url is not None
        return self.database_url

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def jobs_dir(self) -> Path:
        """Per-job working folders: checkpoints, logs."""
        return self.data_dir / "jobs"

    @property
    def models_path(self) -> Path:
        assert self.models_dir is not None
        return self.models_dir

    @property
    def uses_vllm(self) -> bool:
        """Generation by the vLLM server (engine 'vllm', or 'auto' with vllm_url set)."""
        return self.engine == "vllm" or (self.engine == "auto" and bool(self.vllm_url))

    def resolved_base_model(self) -> str:
        if self.base_model != "auto":
            return self.base_model
        # An API in front of vLLM needs no GPU of its own, but vLLM serves the real model.
        return GPU_DEFAULT_MODEL_ID if self.uses_vllm or cuda_available() else TINY_MODEL_ID


@lru_cache
def get_settings() -> Settings:
    return Settings()
