"""The vLLM engine: generation by a vLLM OpenAI-compatible server, reached over HTTP.

It keeps the in-process engine's contract (``submit(prompt_ids, SamplingParams, sink, adapter)``, a
``TokenSink`` fed from the engine's own thread, ``Busy`` when full or asleep), so prompts are still
rendered by our harmony renderer and the completion tokens parsed by our harmony parser: reasoning vs
final answer and ``reasoning_effort`` mean the same under both engines. vLLM sees token ids only
(``/v1/completions`` with a token-id prompt and ``return_token_ids``).

Adapters: our registry is the source of truth and vLLM a cache of it. An adapter is loaded
(``/v1/load_lora_adapter``, its registry id as the LoRA name) on its first request or when its job
succeeds (``load``); at most ``max_resident`` stay registered, the least recently used one without
requests in flight is unloaded to make room. A vLLM restart forgets every adapter: its 404 for a
model name we believe loaded triggers one reload and one retry.

One GPU shared with training: with ``release_gpu_during_training`` the GpuReleasePolicy (a probe of
the job table) puts vLLM to sleep (``/sleep?level=1``: weights offloaded to CPU memory, KV cache freed;
the server needs ``--enable-sleep-mode`` and ``VLLM_SERVER_DEV_MODE=1``) while a job runs, answering
503 + Retry-After meanwhile, and wakes it once no job has run for ``release_cooldown_s``.

Settings: ``vllm_url``, ``vllm_served_model`` (else the base that vLLM's /v1/models lists),
``vllm_max_lora_rank``, ``vllm_max_cpu_loras``, ``vllm_api_key``, ``vllm_timeout_s``,
``vllm_connect_timeout_s``. The base's fingerprint, which adapters are checked against, comes from the
base model's config (``base_model``), as the in-process engine's comes from the loaded model's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp

from app.config import Settings
from app.exceptions import Busy, Conflict, InvalidInput, NotFound, ServiceError
from app.inference.base import busy_full, busy_training
from app.inference.gpu_release import GpuReleasePolicy
from app.inference.types import AdapterSpec, SamplingParams, TokenSink

log = logging.getLogger(__name__)

T = TypeVar("T")
# Level 1 keeps the weights in CPU memory, so waking is a copy back (seconds), not a reload from disk.
SLEEP_LEVEL = 1
# /health is asked in the background this often (and not while completions keep arriving: each is
# proof of health); a positive answer counts for HEALTHY_FOR_S, so is_ready() never waits on vLLM.
HEALTH_POLL_S = 1.0
HEALTHY_FOR_S = 2.5


class _NotLoaded(Exception):
    """vLLM answered 404 for the adapter's model name: it does not know it (restarted?)."""


@dataclass
class _Resident:
    spec: AdapterSpec
    in_flight: int = 0


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    sink: TokenSink
    adapter: AdapterSpec | None
    queued_at: float = field(default_factory=time.monotonic)


class VllmEngine:
    """The engine seam (app.inference.base.Engine) over a vLLM OpenAI-compatible server."""

    def __init__(
        self,
        settings: Settings,
        *,
        gpu_release: GpuReleasePolicy | None = None,
    ) -> None:
        if not settings.vllm_url:
            raise ValueError("VllmEngine needs settings.vllm_url (GPTOSS_VLLM_URL)")
        self.settings = settings
        self.url = settings.vllm_url.rstrip("/")
        self.base_model_id = settings.resolved_base_model()
        self.served_model = settings.vllm_served_model  # None: asked of vLLM once it answers
        self._fingerprint: str | None = None
        self._gpu_release = gpu_release
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: aiohttp.ClientSession | None = None
        self._watches: list[asyncio.Task[None]] = []  # health, and training when the GPU is shared
        self._start_lock = threading.Lock()
        self._lock = threading.Lock()  # in-flight count, resident table, sleep state
        self._in_flight = 0
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # least recently used first
        self._load_locks: dict[str, asyncio.Lock] = {}
        self._servable: dict[str, tuple[str, float]] = {}  # adapter id -> (path, weights mtime) checked
        self._asleep = False
        self._closing = False
        self._healthy_until = 0.0
        self.stats: dict[str, float] = {
            "requests": 0,
            "tokens": 0,
            "loads": 0,
            "unloads": 0,
            "reloads_after_404": 0,
            "errors": 0,
            "sleeps": 0,
            "wakes": 0,
            "last_load_s": 0.0,
        }

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread (its own event loop and HTTP client). Idempotent. Does not wait
        for vLLM: is_ready() says when it answers."""
        with self._start_lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._closing = False
            started = threading.Event()
            self._thread = threading.Thread(
                target=self._run_loop, args=(started,), name="vllm-engine", daemon=True
            )
            self._thread.start()
            started.wait(10)
        self._call(self._refresh_health())
        try:
            self._base_fingerprint()  # read now rather than on the first request
        except Busy as exc:
            log.warning(str(exc))

    def close(self) -> None:
        self._closing = True
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._thread = None

    def is_ready(self) -> bool:
        """vLLM answered (/health or a completion) within the last few seconds and is awake. Reads
        what the engine loop's health watch last saw: every request asks, and none waits on vLLM."""
        if self._thread is None or not self._thread.is_alive() or self._asleep:
            return False
        return time.monotonic() < self._healthy_until

    @property
    def fingerprint(self) -> str:
        return self._base_fingerprint()

    def _base_fingerprint(self) -> str:
        """From the base model's config (a local folder, or the hub's cache), read once."""
        if self._fingerprint is None:
            from app.ml.modeling import base_fingerprint

            try:
                self._fingerprint = base_fingerprint(self.base_model_id, self.settings.models_path)
            except Exception as exc:  # offline without the config cached, a typo in base_model
                raise Busy(
                    f"cannot read the config of the base model '{self.base_model_id}' to check adapters "
                    f"against it ({type(exc).__name__}: {exc}); retry shortly",
                    retry_after=5,
                ) from exc
        return self._fingerprint

    # --- requests --------------------------------------------------------------------------------

    def check_adapter(self, adapter: AdapterSpec) -> None:
        """NotFound / Conflict as the in-process engine (files, base), and Conflict when vLLM cannot
        serve the adapter as saved (rank above the server's, modules it does not support)."""
        from app.inference.adapters import check_adapter_files
        from app.ml.lora_layout import AdapterLayoutError, check_servable

        check_adapter_files(adapter, self.fingerprint, self.base_model_id)
        seen = self._weights_stamp(adapter)
        if self._servable.get(adapter.id) == seen:  # read the weights once, not on every request
            return
        try:
            check_servable(adapter.path, max_lora_rank=self.settings.vllm_max_lora_rank)
        except AdapterLayoutError as exc:
            raise Conflict(f"adapter '{adapter.name}': {exc}", field="adapter") from exc
        self._servable[adapter.id] = seen

    @staticmethod
    def _weights_stamp(adapter: AdapterSpec) -> tuple[str, float]:
        from app.ml.lora_layout import WEIGHTS_FILE

        try:
            return str(adapter.path), (adapter.path / WEIGHTS_FILE).stat().st_mtime
        except OSError:
            return str(adapter.path), -1.0

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        sink: TokenSink,
        adapter: AdapterSpec | None = None,
    ) -> None:
        """Send one generation to vLLM; tokens arrive at `sink` from the engine thread. Busy (503)
        when max_concurrent_generations are in flight, while asleep for training, or not started."""
        loop = self._loop
        with self._lock:
            if loop is None or self._closing:
                raise Busy("the vLLM engine is not started; retry shortly", retry_after=5)
            if self._asleep:
                raise self._busy_training()
            if self._in_flight >= self.settings.max_concurrent_generations:
                raise busy_full(self.settings)
            self._in_flight += 1
        request = _Request(prompt_ids, params, sink, adapter)
        asyncio.run_coroutine_threadsafe(self._serve(request), loop)

    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def load(self, adapter: AdapterSpec) -> None:
        """Register the adapter with vLLM now, so its first answer does not pay for the load (about
        0.5 s for a rank-16 gpt-oss-20b adapter). Raises what the check or the load raised."""
        self.check_adapter(adapter)
        self._call(self._ensure_loaded(adapter, pin=False))

    def unload(self, adapter_id: str) -> None:
        """Forget the adapter in vLLM (idempotent). Requests already running finish on it."""
        if self._loop is None:
            return
        self._call(self._unload(adapter_id))

    def loaded_adapters(self) -> list[str]:
        with self._lock:
            return list(self._resident)

    def sleep(self) -> None:
        """Free the GPU for training: vLLM /sleep; /generate answers 503 until wake()."""
        self._call(self._sleep())

    def wake(self) -> None:
        self._call(self._wake())

    # --- engine thread ---------------------------------------------------------------------------

    def _run_loop(self, started: threading.Event) -> None:
        loop = _new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        self._client = loop.run_until_complete(self._open_client())
        self._watches = [loop.create_task(self._watch_health())]
        if self._gpu_release is not None:
            self._watches.append(loop.create_task(self._watch_training()))
        started.set()
        try:
            loop.run_forever()
        finally:
            loop.close()
            self._loop = None

    async def _shutdown(self) -> None:
        for watch in self._watches:
            watch.cancel()
        await asyncio.gather(*self._watches, return_exceptions=True)
        if self._client is not None:
            await self._client.close()

    async def _open_client(self) -> aiohttp.ClientSession:
        """aiohttp, not httpx: at one token per SSE chunk the client's cost per chunk read is most of
        the API's CPU, and httpx's (h11 events, anyio cancel scopes and timeouts per read) was about
        three times aiohttp's (bench/vllm_overhead.py). No connection limit: every stream holds one."""
        key = self.settings.vllm_api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        settings = self.settings
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.vllm_connect_timeout_s, sock_read=settings.vllm_timeout_s
        )
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        return aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the engine loop from another thread and return its result."""
        loop = self._loop
        if loop is None:
            self.start()
            loop = self._loop
        assert loop is not None
        if threading.current_thread() is self._thread:
            raise RuntimeError("VllmEngine._call from the engine thread would deadlock")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(timeout=timeout)
        except TimeoutError:
            future.cancel()
            raise Busy("the vLLM server did not answer in time; retry shortly", retry_after=5) from None

    async def _serve(self, request: _Request) -> None:
        try:
            await self._generate(request)
        except ServiceError as exc:
            self.stats["errors"] += 1
            request.sink.fail(exc)
        except Exception as exc:  # never leave a request waiting
            log.exception("vLLM generation failed")
            self.stats["errors"] += 1
            request.sink.fail(ServiceError(f"the generation failed: {exc}; retry"))
        finally:
            with self._lock:
                self._in_flight -= 1

    async def _generate(self, request: _Request) -> None:
        self.stats["requests"] += 1
        adapter = request.adapter
        if adapter is None:
            await self._stream(request, await self._base_name())
            return
        await self._ensure_loaded(adapter, pin=True)
        try:
            try:
                await self._stream(request, adapter.id)
            except _NotLoaded:  # vLLM restarted and forgot it: load again, once
                self.stats["reloads_after_404"] += 1
                await self._reload(adapter)
                await self._stream(request, adapter.id)
        finally:
            self._unpin(adapter.id)

    async def _stream(self, request: _Request, model: str) -> None:
        from app.ml.harmony import STOP_TOKEN_IDS

        stops = set(STOP_TOKEN_IDS)
        body = completion_body(request.prompt_ids, request.params, model, STOP_TOKEN_IDS)
        assert self._client is not None
        received, reason = 0, "length"
        try:
            async with self._client.post(self.url + "/v1/completions", json=body) as response:
                if response.status != 200:
                    raise _error_from_answer(await _Answer.read(response), model)
                # An answered completion is proof of health: the health watch need not ask.
                self._healthy_until = time.monotonic() + HEALTHY_FOR_S
                async for chunks in sse_events(response.content.iter_any()):
                    for chunk in chunks:
                        choice = (chunk.get("choices") or [{}])[0]
                        for token in choice.get("token_ids") or ():
                            received += 1
                            if token in stops:
                                reason = "stop"
                                break
                            request.sink.put_token(int(token))
                        if choice.get("finish_reason"):
                            reason = _finish_reason(choice["finish_reason"], reason)
                    if request.sink.cancelled():  # closing the stream makes vLLM abort the request
                        request.sink.finish("cancelled", received)
                        return
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _unreachable(self.url, exc) from exc
        self.stats["tokens"] += received
        request.sink.finish(reason, received)

    async def _ensure_loaded(self, adapter: AdapterSpec, *, pin: bool) -> None:
        """Make the adapter registered in vLLM and most recently used (pinned while a request uses it,
        so eviction never takes it from under a running request)."""
        lock = self._load_locks.setdefault(adapter.id, asyncio.Lock())
        async with lock:
            with self._lock:
                entry = self._resident.get(adapter.id)
                if entry is not None:
                    self._resident.move_to_end(adapter.id)
                    entry.in_flight += pin
                    return
            await self._make_room()
            started = time.monotonic()
            await self._post_load(adapter)
            self.stats["loads"] += 1
            self.stats["last_load_s"] = round(time.monotonic() - started, 3)
            with self._lock:
                self._resident[adapter.id] = _Resident(adapter, in_flight=int(pin))
        log.info("adapter loaded in vLLM", extra={"adapter_id": adapter.id, "s": self.stats["last_load_s"]})

    async def _reload(self, adapter: AdapterSpec) -> None:
        """Register the adapter in vLLM again, keeping our entry and its pins: several requests that
        met the same 404 each reload (vLLM answers the later ones 'already loaded'), and none of them
        may drop the pins of the others, or eviction could take it from under them."""
        async with self._load_locks.setdefault(adapter.id, asyncio.Lock()):
            await self._post_load(adapter)
            with self._lock:
                if adapter.id not in self._resident:  # unloaded meanwhile (DELETE /adapters): ours again
                    self._resident[adapter.id] = _Resident(adapter, in_flight=1)
                self._resident.move_to_end(adapter.id)

    async def _post_load(self, adapter: AdapterSpec) -> None:
        # vLLM reads the folder itself: it mounts the data volume at the same path (docker-compose.yml).
        body = {"lora_name": adapter.id, "lora_path": str(adapter.path)}
        answer = await self._ask("POST", "/v1/load_lora_adapter", body=body)
        if answer.status == 200:
            return
        message = answer.message()
        if answer.status == 400 and "already been loaded" in message:
            return  # loaded by an earlier life of this process; vLLM's copy is the same files
        if answer.status == 503:
            raise Busy(f"vLLM cannot load adapters right now: {message}", retry_after=5)
        if answer.status == 404:
            raise NotFound(
                f"adapter '{adapter.name}': vLLM cannot read its files at {body['lora_path']} ({message}); "
                "check that the vLLM service mounts the data volume at the same path",
                field="adapter",
            )
        raise Conflict(f"adapter '{adapter.name}' could not be loaded by vLLM: {message}", field="adapter")

    async def _make_room(self) -> None:
        while True:
            with self._lock:
                if len(self._resident) < self.settings.vllm_max_cpu_loras:
                    return
                victim = next((k for k, v in self._resident.items() if v.in_flight == 0), None)
            if victim is None:
                log.warning(
                    "every adapter registered in vLLM has requests running; growing past vllm_max_cpu_loras"
                )
                return
            await self._unload(victim)

    async def _unload(self, adapter_id: str) -> None:
        self._forget(adapter_id)
        answer = await self._ask("POST", "/v1/unload_lora_adapter", body={"lora_name": adapter_id})
        if answer.status not in (200, 404):  # 404: not loaded there, which is what we wanted
            raise ServiceError(f"vLLM could not unload adapter {adapter_id}: {answer.message()}")
        self.stats["unloads"] += 1

    def _forget(self, adapter_id: str) -> None:
        with self._lock:
            self._resident.pop(adapter_id, None)

    def _unpin(self, adapter_id: str) -> None:
        with self._lock:
            entry = self._resident.get(adapter_id)
            if entry is not None and entry.in_flight > 0:
                entry.in_flight -= 1

    async def _refresh_health(self) -> bool:
        try:
            answer = await self._ask("GET", "/health", timeout_s=self.settings.vllm_connect_timeout_s)
            ok = answer.status == 200 and bool(await self._base_name())
        except ServiceError:  # Busy (unreachable) included
            ok = False
        self._healthy_until = time.monotonic() + HEALTHY_FOR_S if ok else 0.0
        return ok

    async def _watch_health(self) -> None:
        while not self._closing:
            await asyncio.sleep(HEALTH_POLL_S)
            if time.monotonic() + HEALTH_POLL_S >= self._healthy_until:  # no completion lately
                await self._refresh_health()

    async def _base_name(self) -> str:
        """vLLM's name for the base: the setting, else the model /v1/models lists without a parent
        (run-time LoRA adapters are listed with the base as their parent)."""
        if self.served_model:
            return self.served_model
        answer = await self._ask("GET", "/v1/models")
        if answer.status != 200:
            raise ServiceError(f"vLLM /v1/models failed: {answer.message()}")
        bases = [m["id"] for m in answer.json().get("data", []) if not m.get("parent")]
        if len(bases) != 1:
            raise ServiceError(
                f"vLLM serves {len(bases)} base models ({bases}); set vllm_served_model to the one to use"
            )
        self.served_model = bases[0]
        return self.served_model

    # --- sleeping while a job trains --------------------------------------------------------------

    async def _sleep(self) -> None:
        with self._lock:
            self._asleep = True  # refuse new requests from now on
        await self._drain()
        answer = await self._ask("POST", "/sleep", params={"level": str(SLEEP_LEVEL)})
        if answer.status != 200:
            raise ServiceError(
                f"vLLM /sleep failed: {answer.message()} "
                "(does the server run with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1?)"
            )
        self.stats["sleeps"] += 1
        log.info("training job running: vLLM put to sleep")

    async def _drain(self, timeout_s: float = 60.0) -> None:
        """Let the generations already running finish before vLLM frees its memory under them."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def _wake(self) -> None:
        answer = await self._ask("POST", "/wake_up")
        if answer.status != 200:
            raise ServiceError(f"vLLM /wake_up failed: {answer.message()}")
        with self._lock:
            self._asleep = False
        self.stats["wakes"] += 1
        log.info("no training job running: vLLM woken up")

    async def _watch_training(self) -> None:
        """Ask the GpuReleasePolicy every poll (its probe reads the job table: off this loop)."""
        policy = self._gpu_release
        assert policy is not None
        while not self._closing:
            await asyncio.sleep(policy.poll_s)
            try:
                action = await asyncio.to_thread(policy.decide, released=self._asleep)
                if action == "release":
                    await self._sleep()
                elif action == "reload":
                    await self._wake()
            except Exception:  # vLLM hiccup: the policy asks again at the next poll
                log.exception("could not follow the training state")

    def _busy_training(self) -> Busy:
        return busy_training(self.settings)

    async def _ask(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> _Answer:
        """One call that is not a generation, read whole; unreachable = Busy (503, retry)."""
        assert self._client is not None
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s else None
        try:
            async with self._client.request(
                method, self.url + path, json=body, params=params, timeout=timeout
            ) as response:
                return await _Answer.read(response)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _unreachable(self.url, exc) from exc


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed (as uvicorn's own loop is): this loop reads every streamed chunk."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


# --- request / response mapping --------------------------------------------------------------------


def completion_body(
    prompt_ids: list[int], params: SamplingParams, model: str, stop_ids: tuple[int, ...]
) -> dict[str, Any]:
    """The /v1/completions request for one generation: token ids in, token ids out, harmony's stop
    tokens as stop ids (the harmony text is parsed by us, so vLLM need not detokenize it for us)."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(prompt_ids),
        "max_tokens": params.max_new_tokens,
        "temperature": 0.0 if params.greedy else params.temperature,
        "top_p": 1.0 if params.greedy else params.top_p,
        "stop_token_ids": list(stop_ids),
        "skip_special_tokens": False,
        "return_token_ids": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if params.seed is not None:
        body["seed"] = params.seed
    return body


@dataclass
class _Answer:
    """A vLLM answer read whole: its status, body and Retry-After."""

    status: int
    text: str
    retry_after: str | None = None

    @classmethod
    async def read(cls, response: aiohttp.ClientResponse) -> _Answer:
        text = await response.text(errors="replace")
        return cls(response.status, text, response.headers.get("Retry-After"))

    def json(self) -> Any:
        return json.loads(self.text)

    def message(self) -> str:
        try:
            return _message_of(self.json())
        except ValueError:
            return self.text[:500] or f"HTTP {self.status}"


async def sse_events(pieces: AsyncIterable[bytes]) -> AsyncIterator[list[dict[str, Any]]]:
    """The JSON objects of a server-sent event stream up to ``data: [DONE]``, a list per piece the
    connection handed over (``iter_any``: one wake-up per network read, not per line; the bytes split
    by hand); an error event raises."""
    buffer = b""
    async for raw in pieces:
        buffer += raw
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        *complete, buffer = buffer.split(b"\n\n")
        events: list[dict[str, Any]] = []
        for block in complete:
            for line in block.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    if events:
                        yield events
                    return
                event = json.loads(data)
                if "error" in event:
                    raise ServiceError(f"vLLM failed the generation: {_message_of(event)}; retry")
                events.append(event)
        if events:
            yield events


def _finish_reason(vllm_reason: str, seen: str) -> str:
    if seen == "stop" or vllm_reason == "stop":
        return "stop"
    if vllm_reason == "length":
        return "length"
    return "cancelled" if vllm_reason == "abort" else vllm_reason


def _message_of(data: Any) -> str:
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            return str(error.get("message") or error)
        return str(error)
    return str(data)


def _error_from_answer(answer: _Answer, model: str) -> Exception:
    """vLLM's error answer as our errors: 404 for the model = not loaded (reload), 400 = the
    request (the prompt's length, mostly), 429/503 = Busy, else a 500 that says vLLM failed."""
    message = answer.message()
    status = answer.status
    if status == 404 and "does not exist" in message:
        return _NotLoaded(model)
    if status == 400:
        return InvalidInput("messages", f"vLLM refused the request: {message}")
    if status in (429, 503):
        retry = answer.retry_after or "1"
        return Busy(
            f"vLLM is busy: {message}; retry shortly", retry_after=int(retry) if retry.isdigit() else 1
        )
    return ServiceError(f"vLLM failed the generation (HTTP {status}): {message}; retry")


def _unreachable(url: str, exc: Exception) -> Busy:
    return Busy(
        f"the vLLM server at {url} is not reachable ({type(exc).__name__}); retry shortly", retry_after=5
    )
