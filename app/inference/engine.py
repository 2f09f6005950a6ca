"""The inference engine: one shared base model, an LRU cache of LoRA adapters, one scheduler thread.

Requests are queued from any thread (the HTTP event loop) and run on the engine thread, the only
code that touches the model. PEFT's active adapter is global model state and PEFT's expert LoRA
(`target_parameters`, a ParamWrapper) refuses per-row `adapter_names` ("does not support mixed
adapter batches yet", peft 0.21), so each batch holds requests for ONE adapter (or the base): the
oldest waiting request picks the adapter, and up to `max_batch_size` requests for it run together
while the others wait. A batch runs to the end before the adapter is switched, so no request ever
sees another adapter's weights.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.config import Settings
from app.exceptions import Busy, ServiceError
from app.inference.adapters import AdapterCache, _free_memory, check_adapter_files
from app.inference.base import busy_full, busy_training
from app.inference.decoding import Row, decode_batch
from app.inference.gpu_release import GpuReleasePolicy
from app.inference.types import AdapterSpec, SamplingParams, TokenSink

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    row: Row
    adapter: AdapterSpec | None
    queued_at: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> str | None:
        return self.adapter.id if self.adapter else None


class _TrackedSink:
    """Wraps a request's sink so its slot is given back the moment the row ends (before the client
    hears of it, so a client that asks again at once is not refused), and ends are passed on once."""

    def __init__(self, sink: TokenSink, release: Callable[[], None], closing: Callable[[], bool]) -> None:
        self._sink = sink
        self._release = release
        self._closing = closing
        self._ended = False

    def put_token(self, token_id: int) -> None:
        self._sink.put_token(token_id)

    def cancelled(self) -> bool:
        return self._sink.cancelled() or self._closing()  # shutdown stops rows at their next token

    def finish(self, reason: str, completion_tokens: int) -> None:
        if self._end():
            self._sink.finish(reason, completion_tokens)

    def fail(self, error: BaseException) -> None:
        if self._end():
            self._sink.fail(error)

    def _end(self) -> bool:
        if self._ended:
            return False
        self._ended = True
        self._release()
        return True


@dataclass
class _Command:
    """Work that must run on the engine thread between batches (a load, an unload)."""

    run: Callable[[], None]
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class InferenceEngine:
    def __init__(self, settings: Settings, *, gpu_release: GpuReleasePolicy | None = None) -> None:
        self.settings = settings
        self.base_model_id = settings.resolved_base_model()
        self._gpu_release = gpu_release
        self._cond = threading.Condition()
        self._start_lock = threading.Lock()
        self._pending: list[_Pending] = []
        self._commands: list[_Command] = []
        self._in_flight = 0  # requests queued or running, against max_concurrent_generations
        self._thread: threading.Thread | None = None
        self._closing = False
        self._released = False  # model given back while a training job runs
        self._loaded: Any = None  # app.ml.modeling.LoadedBase
        # Counters for /metrics and tests: batches run, rows run, rows that shared their batch.
        self.stats = {"batches": 0, "rows": 0, "batched_rows": 0, "cancelled": 0, "releases": 0, "reloads": 0}
        self._cache: AdapterCache | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Load the base model (once) and start the engine thread. Idempotent and thread-safe."""
        with self._start_lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._closing = False
            self._load_base()
            self._thread = threading.Thread(target=self._loop, name="inference-engine", daemon=True)
            self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self._fail_pending(Busy("the server is shutting down; retry on another instance", retry_after=5))
        self._drop_model()

    def is_ready(self) -> bool:
        alive = self._thread is not None and self._thread.is_alive()
        return alive and self._loaded is not None and not self._released

    @property
    def fingerprint(self) -> str:
        self._require_loaded()
        return str(self._loaded.fingerprint)

    @property
    def model_config(self) -> Any:
        self._require_loaded()
        return self._loaded.model.config

    # --- requests ------------------------------------------------------------------------------

    def check_adapter(self, adapter: AdapterSpec) -> None:
        """NotFound (404) when its files are gone, Conflict (409) when it does not record this base
        (fingerprint and model id): now, before it is queued, rather than at load time."""
        check_adapter_files(adapter, self.fingerprint, self.base_model_id)

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        sink: TokenSink,
        adapter: AdapterSpec | None = None,
    ) -> None:
        """Queue one generation; tokens arrive at `sink` from the engine thread. Busy (503) when full."""
        row = Row(
            prompt_ids=prompt_ids,
            params=params,
            sink=_TrackedSink(sink, self._release_slot, lambda: self._closing),
        )
        with self._cond:
            self._refuse_if_unavailable()
            self._in_flight += 1
            self._pending.append(_Pending(row, adapter))
            self._cond.notify_all()

    def in_flight(self) -> int:
        """Requests queued or running (each holds a slot until its last token is handed over)."""
        with self._cond:
            return self._in_flight

    def _release_slot(self) -> None:
        with self._cond:
            self._in_flight -= 1

    def load(self, adapter: AdapterSpec) -> None:
        """Load an adapter into the cache now (the base first, if not loaded), so its first request
        does not wait for it. Raises what the check or the load raised."""
        self.start()
        self.check_adapter(adapter)
        self._between_batches(lambda: self._load_now(adapter))

    def unload(self, adapter_id: str) -> None:
        """Drop an adapter from the cache (idempotent). Waits for the batch in progress, never cuts it."""
        self._between_batches(lambda: self._unload_now(adapter_id))

    def _between_batches(self, run: Callable[[], None]) -> None:
        """Run `run` on the engine thread between two batches (here when no engine thread runs)."""
        thread = self._thread
        if thread is None or not thread.is_alive() or threading.current_thread() is thread:
            run()
            return
        command = _Command(run)
        with self._cond:
            self._commands.append(command)
            self._cond.notify_all()
        if not command.done.wait(timeout=300):
            raise Busy("the engine did not get to the adapter in 300 s; retry", retry_after=5)
        if command.error is not None:
            raise command.error

    def loaded_adapters(self) -> list[str]:
        return list(self._cache.loaded) if self._cache else []

    # --- engine thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._closing:
            try:
                self._step()
            except Exception:  # never let the one thread that serves every request die
                log.exception("inference engine step failed")
                time.sleep(0.1)

    def _step(self) -> None:
        with self._cond:
            self._cond.wait_for(self._has_work, timeout=self._probe_interval())
            if self._closing:
                return
            commands, self._commands = self._commands, []
        for command in commands:
            self._run_command(command)
        self._check_training()
        batch = self._take_batch()
        if batch:
            self._run_batch(batch)

    def _has_work(self) -> bool:
        return self._closing or bool(self._commands) or (bool(self._pending) and not self._released)

    def _take_batch(self) -> list[_Pending]:
        """The oldest request's adapter, and up to max_batch_size waiting requests for it (oldest first)."""
        self._wait_for_batch_window()
        with self._cond:
            if not self._pending or self._released:
                return []
            key = self._pending[0].key
            batch = [p for p in self._pending if p.key == key][: self.settings.max_batch_size]
            taken = {id(p) for p in batch}
            self._pending = [p for p in self._pending if id(p) not in taken]
            self._count(len(batch))
            return batch

    def _count(self, size: int) -> None:
        self.stats["batches"] += 1
        self.stats["rows"] += size
        self.stats["batched_rows"] += size if size > 1 else 0

    def _wait_for_batch_window(self) -> None:
        """Give requests that arrive together a moment to share a batch."""
        with self._cond:
            if not self._pending or len(self._pending) >= self.settings.max_batch_size:
                return
            wait = self._pending[0].queued_at + self.settings.batch_window_ms / 1000 - time.monotonic()
        if wait > 0:
            time.sleep(wait)

    def _run_batch(self, batch: list[_Pending]) -> None:
        try:
            self._generate(batch)
        except ServiceError as exc:
            self._fail(batch, exc)
        except Exception as exc:  # a model error fails this batch, never the engine
            log.exception("generation batch failed")
            self._fail(batch, exc)
        finally:
            # No request may wait forever: a row the batch did not end fails (ended rows ignore this).
            self._fail(batch, ServiceError("the generation ended without a result; retry"))

    def _generate(self, batch: list[_Pending]) -> None:
        assert self._cache is not None
        adapter = batch[0].adapter
        if adapter is not None:
            self._cache.ensure(adapter)
        with self._cache.activate(adapter.id if adapter else None) as model:
            decode_batch(model, [p.row for p in batch], pad_id=self._pad_id, stop_ids=self._stop_ids)
        self.stats["cancelled"] += sum(p.row.finish_reason == "cancelled" for p in batch)

    def _run_command(self, command: _Command) -> None:
        try:
            command.run()
        except Exception as exc:  # handed to the caller waiting for it
            command.error = exc
        finally:
            command.done.set()

    def _load_now(self, adapter: AdapterSpec) -> None:
        if self._cache is None:
            raise self._busy_training() if self._released else Busy("the model is not loaded", retry_after=5)
        self._cache.ensure(adapter)

    def _unload_now(self, adapter_id: str) -> None:
        if self._cache is not None:
            self._cache.unload(adapter_id)

    # --- model ---------------------------------------------------------------------------------

    def _load_base(self) -> None:
        if self._loaded is not None:
            return
        from app.ml.harmony import STOP_TOKEN_IDS
        from app.ml.modeling import load_base
        from app.ml.tokenizer import ensure_harmony_assets

        started = time.monotonic()
        ensure_harmony_assets(self.settings.models_path)  # render_prompt needs its vocab file, offline
        self._loaded = load_base(
            self.base_model_id,
            backend=self.settings.backend,
            load_in_4bit=self.settings.load_in_4bit,
            max_seq_length=self.settings.max_seq_length,
            models_dir=self.settings.models_path,
            for_training=False,
        )
        self._loaded.model.eval()
        capacity, pinned = self._cache_policy(self._loaded.backend)
        self._cache = AdapterCache(
            self._loaded.model,
            capacity=capacity,
            pinned=pinned,
            fingerprint=str(self._loaded.fingerprint),
            base_model=self.base_model_id,
        )
        self._stop_ids = frozenset(STOP_TOKEN_IDS)
        pad = self._loaded.tokenizer.pad_token_id
        self._pad_id = int(pad) if pad is not None else min(STOP_TOKEN_IDS)  # hidden by the mask anyway
        log.info(
            "base model loaded",
            extra={"model": self.base_model_id, "s": round(time.monotonic() - started, 2)},
        )

    def _cache_policy(self, backend: str) -> tuple[int, set[str]]:
        """Adapter cache capacity and pinned set for the loaded backend.

        Unsloth 2026.10.9 serves the expert LoRA of the adapter loaded first, whichever is active,
        unless its lookup is patched (app/ml/unsloth_fixes.py). Where the patch cannot be applied,
        or `unsloth_multi_adapter` is off, the Unsloth backend keeps one adapter resident: always
        the right answer, at the price of a load (~1.7 s for gpt-oss-20b) on every switch.
        """
        capacity, pinned = self.settings.adapter_cache_size, set(self.settings.pinned_adapters)
        if backend != "unsloth":
            return capacity, pinned
        from app.ml.unsloth_fixes import make_expert_lora_follow_active_adapter

        state = make_expert_lora_follow_active_adapter()
        if self.settings.unsloth_multi_adapter and state == "patched":
            return capacity, pinned
        if not self.settings.unsloth_multi_adapter:
            reason = "unsloth_multi_adapter is off"
        else:
            reason = "Unsloth's expert-LoRA lookup was not found to patch (another Unsloth version?)"
        log.warning(
            "unsloth backend: one adapter loaded at a time (adapter_cache_size and pinned_adapters "
            f"ignored): {reason}"
        )
        return 1, set()

    def _drop_model(self) -> None:
        self._loaded = None
        self._cache = None
        _free_memory()

    def _require_loaded(self) -> None:
        if self._released:
            raise self._busy_training()
        if self._loaded is None:
            raise Busy("the model is not loaded yet; retry shortly", retry_after=5)

    # --- giving the GPU back during training ---------------------------------------------------

    def _probe_interval(self) -> float | None:
        return self._gpu_release.poll_s if self._gpu_release is not None else None

    def _check_training(self) -> None:
        if self._gpu_release is None:
            return
        action = self._gpu_release.decide(released=self._released)
        if action == "release":
            self._release()
        elif action == "reload":
            self._reacquire()

    def _release(self) -> None:
        log.info("training job running: releasing the model's memory")
        with self._cond:
            self._released = True
        self.stats["releases"] += 1
        self._fail_pending(self._busy_training())
        self._drop_model()

    def _reacquire(self) -> None:
        log.info("no training job running: loading the model again")
        try:
            self._load_base()
        except Exception:  # e.g. the GPU is still busy; keep refusing and try again next poll
            log.exception("reloading the model failed")
            return
        with self._cond:
            self._released = False
            self._cond.notify_all()
        self.stats["reloads"] += 1

    def _busy_training(self) -> Busy:
        return busy_training(self.settings)

    # --- helpers ---------------------------------------------------------------------------------

    def _refuse_if_unavailable(self) -> None:
        """Called with the lock held."""
        if self._closing:
            raise Busy("the server is shutting down", retry_after=5)
        if self._thread is None:
            raise Busy("the model is not loaded yet (call start()); retry shortly", retry_after=5)
        if self._released:
            raise self._busy_training()
        if self._in_flight >= self.settings.max_concurrent_generations:
            raise busy_full(self.settings)

    def _fail_pending(self, error: BaseException) -> None:
        with self._cond:
            pending, self._pending = self._pending, []
        self._fail(pending, error)

    @staticmethod
    def _fail(batch: list[_Pending], error: BaseException) -> None:
        for item in batch:
            item.row.sink.fail(error)
