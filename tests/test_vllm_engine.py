"""The vLLM engine's request/response mapping, against a fake vLLM OpenAI server over real HTTP.

A fake, because vLLM cannot run without a GPU (the real server is exercised on the H200 by
tests/test_gpu_vllm.py). The fake implements the slice of vLLM 0.26's server the engine uses, with
vLLM's status codes and error bodies: /health, /v1/load_lora_adapter, /v1/unload_lora_adapter (both
only under VLLM_ALLOW_RUNTIME_LORA_UPDATING there), /v1/completions streaming with
``return_token_ids`` (token-id deltas per chunk, ``data: [DONE]``), 404 "The model `x` does not
exist." for an unknown adapter name, /v1/models (the base, and run-time adapters with the base as
their parent), /sleep and /wake_up. It answers in harmony tokens, so the test
also checks that reasoning and the final answer come out of our parser as with the in-process engine.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from app.config import Settings
from app.exceptions import Busy, Conflict, InvalidInput, ServiceError
from app.inference.base import create_engine
from app.inference.stream import Assembler, CollectingSink, TokenStream
from app.inference.types import AdapterSpec, SamplingParams
from app.inference.vllm_engine import VllmEngine
from tests.fixtures_service import free_port

BASE = "served-base"
FINGERPRINT = "f" * 64


def _harmony(reasoning: str, answer: str) -> list[int]:
    from app.ml.harmony import encoding

    text = (
        f"<|channel|>analysis<|message|>{reasoning}<|end|><|start|>assistant"
        f"<|channel|>final<|message|>{answer}<|return|>"
    )
    return list(encoding().encode(text, allowed_special="all"))


@dataclass
class FakeVllm:
    """State of the fake server; tests read and change it."""

    loaded: dict[str, str] = field(default_factory=dict)  # lora name -> path
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    asleep: bool = False
    max_model_len: int = 64

    def answer(self, model: str) -> list[int]:
        return _harmony(f"thinking as {model}", f"answer of {model}")

    def app(self) -> FastAPI:
        app = FastAPI()

        def error(status: int, message: str, kind: str) -> JSONResponse:
            body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
            return JSONResponse(body, status_code=status)

        @app.get("/health")
        async def health() -> Response:
            self.calls.append(("health", {}))
            return Response(status_code=200)

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            base = {"id": BASE, "object": "model", "root": "/models/base", "parent": None}
            loras = [{"id": n, "object": "model", "root": p, "parent": BASE} for n, p in self.loaded.items()]
            return {"object": "list", "data": [base, *loras]}

        @app.post("/v1/load_lora_adapter")
        async def load(request: Request) -> Response:
            body = await request.json()
            self.calls.append(("load", body))
            if body["lora_name"] in self.loaded:
                return error(400, f"The lora adapter '{body['lora_name']}' has already been loaded.", "x")
            if "broken" in body["lora_path"]:
                return error(500, "While loading /x, expected target modules in [...]", "InternalServerError")
            self.loaded[body["lora_name"]] = body["lora_path"]
            return Response(f"Success: LoRA adapter '{body['lora_name']}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload(request: Request) -> Response:
            body = await request.json()
            self.calls.append(("unload", body))
            if self.loaded.pop(body["lora_name"], None) is None:
                return error(404, f"The lora adapter '{body['lora_name']}' cannot be found.", "NotFoundError")
            return Response("Success")

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            body = await request.json()
            self.calls.append(("completions", body))
            model = body["model"]
            if model != BASE and model not in self.loaded:
                return error(404, f"The model `{model}` does not exist.", "NotFoundError")
            if len(body["prompt"]) + body["max_tokens"] > self.max_model_len:
                return error(400, f"This model's maximum context length is {self.max_model_len} tokens.", "x")
            tokens = self.answer(model)[: body["max_tokens"]]

            async def events() -> Any:
                for i in range(0, len(tokens), 3):  # several tokens per chunk, as vLLM may send
                    done = i + 3 >= len(tokens)
                    reason = None
                    if done:
                        reason = "stop" if tokens[-1] in body["stop_token_ids"] else "length"
                    chunk = {"choices": [{"index": 0, "text": "", "token_ids": tokens[i : i + 3]}]}
                    chunk["choices"][0]["finish_reason"] = reason
                    yield f"data: {json.dumps(chunk)}\n\n"
                usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(tokens)}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        @app.post("/sleep")
        async def sleep(request: Request) -> Response:
            self.calls.append(("sleep", dict(request.query_params)))
            self.asleep = True
            return Response(status_code=200)

        @app.post("/wake_up")
        async def wake() -> Response:
            self.calls.append(("wake_up", {}))
            self.asleep = False
            return Response(status_code=200)

        return app

    def restart(self) -> None:
        """What a vLLM restart looks like from outside: every run-time adapter forgotten."""
        self.loaded.clear()

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.calls if k == kind)


@pytest.fixture
def fake() -> Iterator[tuple[FakeVllm, str]]:
    state = FakeVllm()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(state.app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield state, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def _engine(settings: Settings, url: str, **options: Any) -> VllmEngine:
    """The engine the settings pick (GPTOSS_VLLM_URL set, engine 'auto'), started."""
    engine = create_engine(settings.model_copy(update={"vllm_url": url, **options}))
    assert isinstance(engine, VllmEngine)
    engine.start()
    return engine


def _adapter(tmp_path: Path, name: str) -> AdapterSpec:
    path = tmp_path / "adapters" / name
    path.mkdir(parents=True)
    return AdapterSpec(id=f"ad_{name}", name=name, path=path, fingerprint=FINGERPRINT, base_model="m")


def _run(
    engine: VllmEngine, adapter: AdapterSpec | None = None, prompt: list[int] | None = None
) -> list[int]:
    sink = CollectingSink(timeout_s=30)
    engine.submit(prompt or [200006, 17360, 200008], SamplingParams(max_new_tokens=32), sink, adapter)
    tokens = sink.wait()
    assert sink.reason == "stop"
    return tokens


def test_base_generation_streams_token_ids_parsed_as_harmony(
    settings: Settings, fake: tuple[FakeVllm, str]
) -> None:
    state, url = fake
    engine = _engine(settings, url)
    try:
        assert engine.is_ready()
        assert engine.served_model == BASE  # the base /v1/models lists, as vllm_served_model was unset
        tokens = _run(engine, prompt=[200006, 17360, 200008, 3086])
        assert tokens == state.answer(BASE)[:-1]  # the stop token (<|return|>) is not handed on
        body = next(b for k, b in state.calls if k == "completions")
        assert body["prompt"] == [200006, 17360, 200008, 3086]
        assert body["model"] == BASE and body["stream"] is True and body["return_token_ids"] is True
        assert set(body["stop_token_ids"]) == {200002, 200012} and body["temperature"] == 0.0
    finally:
        engine.close()


def test_assembler_splits_reasoning_and_answer(settings: Settings, fake: tuple[FakeVllm, str]) -> None:
    """Through the same TokenStream + Assembler the routes use: reasoning vs content as in-process."""
    state, url = fake
    engine = _engine(settings, url)

    async def generate() -> Assembler:
        stream = TokenStream()
        engine.submit([200006, 17360, 200008], SamplingParams(max_new_tokens=32), stream, None)
        assembler = Assembler(stream, prompt_tokens=3)
        async for _ in assembler.deltas():
            pass
        return assembler

    try:
        done = asyncio.run(generate()).completion
        assert done is not None
        assert (done.reasoning, done.content, done.finish_reason) == (
            f"thinking as {BASE}",
            f"answer of {BASE}",
            "stop",
        )
        assert done.completion_tokens == len(state.answer(BASE))  # the stop token counts, as in-process
    finally:
        engine.close()


def test_adapter_loaded_on_first_use_then_reused(
    settings: Settings, fake: tuple[FakeVllm, str], tmp_path: Path
) -> None:
    state, url = fake
    engine = _engine(settings, url)
    adapter = _adapter(tmp_path, "capitals")
    try:
        assert _run(engine, adapter) == state.answer(adapter.id)[:-1]
        assert _run(engine, adapter) == state.answer(adapter.id)[:-1]
        assert state.count("load") == 1
        assert state.loaded == {adapter.id: str(adapter.path)}
        assert engine.loaded_adapters() == [adapter.id]
    finally:
        engine.close()


def test_load_ahead_of_first_use_and_served_model_setting(
    settings: Settings, fake: tuple[FakeVllm, str], tmp_path: Path
) -> None:
    state, url = fake
    engine = _engine(settings, url, vllm_served_model=BASE)
    adapter = _tiny_adapter(settings, tmp_path, "early", rank=8)
    try:
        engine.load(adapter)
        assert state.loaded == {adapter.id: str(adapter.path)}
        _run(engine, adapter)
        assert state.count("load") == 1  # the first answer did not load it again
        _run(engine)
        assert [b["model"] for k, b in state.calls if k == "completions"] == [adapter.id, BASE]
    finally:
        engine.close()


def test_vllm_restart_404_reloads_once_and_retries(
    settings: Settings, fake: tuple[FakeVllm, str], tmp_path: Path
) -> None:
    state, url = fake
    engine = _engine(settings, url)
    adapter = _adapter(tmp_path, "capitals")
    try:
        _run(engine, adapter)
        state.restart()
        assert _run(engine, adapter) == state.answer(adapter.id)[:-1]
        assert state.count("load") == 2 and engine.stats["reloads_after_404"] == 1
    finally:
        engine.close()


def test_least_recently_used_adapter_unloaded_past_max_resident(
    settings: Settings, fake: tuple[FakeVllm, str], tmp_path: Path
) -> None:
    state, url = fake
    engine = _engine(settings, url, vllm_max_cpu_loras=2)
    a, b, c = (_adapter(tmp_path, n) for n in ("a", "b", "c"))
    try:
        _run(engine, a)
        _run(engine, b)
        _run(engine, a)  # b is now the least recently used
        _run(engine, c)
        assert [body["lora_name"] for kind, body in state.calls if kind == "unload"] == [b.id]
        assert set(state.loaded) == {a.id, c.id} and set(engine.loaded_adapters()) == {a.id, c.id}
        engine.unload(a.id)
        engine.unload(a.id)  # idempotent: vLLM's 404 for an unknown name is fine
        assert set(state.loaded) == {c.id}
    finally:
        engine.close()


def test_errors_map_to_service_errors(settings: Settings, fake: tuple[FakeVllm, str], tmp_path: Path) -> None:
    state, url = fake
    engine = _engine(settings, url)
    try:
        sink = CollectingSink(timeout_s=30)
        engine.submit(list(range(100)), SamplingParams(max_new_tokens=8), sink, None)
        with pytest.raises(InvalidInput, match="maximum context length"):
            sink.wait()
        broken = _adapter(tmp_path, "broken")
        sink = CollectingSink(timeout_s=30)
        engine.submit([1, 2], SamplingParams(max_new_tokens=8), sink, broken)
        with pytest.raises(Conflict, match="could not be loaded by vLLM: While loading"):
            sink.wait()
    finally:
        engine.close()


def test_unreachable_server_is_busy(settings: Settings) -> None:
    engine = _engine(settings, f"http://127.0.0.1:{free_port()}")
    try:
        assert not engine.is_ready()
        sink = CollectingSink(timeout_s=30)
        engine.submit([1, 2], SamplingParams(max_new_tokens=8), sink, None)
        with pytest.raises(Busy, match="not reachable") as caught:
            sink.wait()
        assert caught.value.retry_after == 5
    finally:
        engine.close()


def test_readiness_follows_vllm_without_blocking(settings: Settings) -> None:
    """is_ready() reads what the engine's health watch last saw: false while nothing listens, true
    within a few seconds of vLLM coming up (no request needed), false again after it goes away; and
    asking never waits on vLLM (every generation asks)."""
    port, state = free_port(), FakeVllm()
    engine = _engine(settings, f"http://127.0.0.1:{port}")
    server = uvicorn.Server(uvicorn.Config(state.app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    try:
        assert not engine.is_ready()
        thread.start()
        _wait(engine.is_ready)
        asked = state.count("health")
        assert all(engine.is_ready() for _ in range(200))
        assert state.count("health") <= asked + 2  # the watch's own probes (one a second), not 200
        server.should_exit = True
        thread.join(timeout=10)
        _wait(lambda: not engine.is_ready())
    finally:
        server.should_exit = True
        engine.close()


def test_full_engine_refuses_with_busy(settings: Settings, fake: tuple[FakeVllm, str]) -> None:
    _, url = fake
    engine = _engine(settings.model_copy(update={"max_concurrent_generations": 1}), url)
    try:
        engine._in_flight = 1  # one request held in flight, as a slow generation would
        with pytest.raises(Busy, match="max_concurrent_generations"):
            engine.submit([1], SamplingParams(max_new_tokens=4), CollectingSink(), None)
    finally:
        engine._in_flight = 0
        engine.close()


def test_sleep_refuses_with_retry_after_until_woken(settings: Settings, fake: tuple[FakeVllm, str]) -> None:
    state, url = fake
    engine = _engine(settings, url)
    try:
        engine.sleep()
        assert state.asleep and ("sleep", {"level": "1"}) in state.calls
        assert not engine.is_ready()
        with pytest.raises(Busy, match="training job") as caught:
            engine.submit([1], SamplingParams(max_new_tokens=4), CollectingSink(), None)
        assert caught.value.retry_after >= 5
        engine.wake()
        assert not state.asleep and engine.is_ready()
        _run(engine)
    finally:
        engine.close()


def test_training_probe_drives_sleep_and_wake(settings: Settings, fake: tuple[FakeVllm, str]) -> None:
    state, url = fake
    training = threading.Event()
    release = {"release_gpu_during_training": True, "release_poll_s": 0.05, "release_cooldown_s": 0.2}
    engine = create_engine(
        settings.model_copy(update={**release, "vllm_url": url}), training_probe=training.is_set
    )
    assert isinstance(engine, VllmEngine)
    engine.start()
    try:
        training.set()
        _wait(lambda: state.asleep)
        with pytest.raises(Busy):
            engine.submit([1], SamplingParams(max_new_tokens=4), CollectingSink(), None)
        training.clear()
        _wait(lambda: not state.asleep and engine.is_ready())
        _run(engine)
    finally:
        engine.close()


def _tiny_adapter(settings: Settings, tmp_path: Path, name: str, *, rank: int) -> AdapterSpec:
    """A PEFT adapter on the tiny model's attention, saved as PEFT saves it, with our manifest."""
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssForCausalLM

    from app.ml.modeling import base_fingerprint
    from app.ml.tiny_model import tiny_config

    folder = tmp_path / "adapters" / name
    get_peft_model(
        GptOssForCausalLM(tiny_config()), LoraConfig(r=rank, target_modules=["q_proj"])
    ).save_pretrained(str(folder))
    fingerprint = base_fingerprint("tiny-gpt-oss", settings.models_path)
    manifest = {"base_fingerprint": fingerprint, "base_model": "tiny-gpt-oss"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return AdapterSpec(
        id=f"ad_{name}", name=name, path=folder, fingerprint=fingerprint, base_model="tiny-gpt-oss"
    )


def test_check_adapter_refuses_rank_above_server_max(settings: Settings, tmp_path: Path) -> None:
    engine = create_engine(
        settings.model_copy(update={"vllm_url": "http://127.0.0.1:9", "vllm_max_lora_rank": 16})
    )
    assert engine.fingerprint == base_fingerprint_of(settings)  # from the base's config, no vLLM asked
    engine.check_adapter(_tiny_adapter(settings, tmp_path, "small", rank=16))
    with pytest.raises(Conflict, match="rank 32 is above the server's max_lora_rank 16") as caught:
        engine.check_adapter(_tiny_adapter(settings, tmp_path, "big", rank=32))
    assert caught.value.status == 409 and isinstance(caught.value, ServiceError)


def base_fingerprint_of(settings: Settings) -> str:
    from app.inference.engine import InferenceEngine

    engine = InferenceEngine(settings)  # the in-process engine's fingerprint: the loaded model's
    engine.start()
    try:
        return engine.fingerprint
    finally:
        engine.close()


def _wait(predicate: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_api_with_engine_vllm_end_to_end(
    settings: Settings, fake: tuple[FakeVllm, str], tmp_path: Path
) -> None:
    """The whole app with GPTOSS_ENGINE=vllm: /generate and /v1/chat/completions go to the (fake) vLLM
    as token ids, come back parsed by our harmony parser into reasoning vs answer, the request's
    reasoning_effort is in the prompt vLLM gets, and a registered adapter is loaded there on its first
    use (once)."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.ml.harmony import encoding
    from app.registry import register_adapter

    state, url = fake
    state.max_model_len = 4096  # room for a whole harmony prompt (system header included)
    api_settings = settings.model_copy(update={"engine": "vllm", "vllm_url": url})
    spec = _tiny_adapter(api_settings, tmp_path / "made", "capitals", rank=8)
    folder = api_settings.adapters_dir / spec.id
    folder.parent.mkdir(parents=True)
    spec.path.rename(folder)
    with TestClient(create_app(api_settings)) as client:
        app = client.app
        assert isinstance(app.state.engine, VllmEngine)  # type: ignore[attr-defined]
        with app.state.sessionmaker() as session:  # type: ignore[attr-defined]
            register_adapter(session, adapter_id=spec.id, name="capitals", folder=folder, job_id=None)
        assert client.get("/readyz").status_code == 200
        assert state.count("load") == 0  # nothing loaded before its first request

        ask = {"messages": [{"role": "user", "content": "Capital of France?"}], "max_new_tokens": 32}
        reply = client.post("/generate", json={**ask, "adapter": "capitals", "reasoning_effort": "high"})
        assert reply.status_code == 200, reply.text
        data = reply.json()
        assert (data["reasoning"], data["content"]) == (f"thinking as {spec.id}", f"answer of {spec.id}")
        assert (data["adapter"], data["model"], data["finish_reason"]) == ("capitals", "tiny-gpt-oss", "stop")
        assert state.loaded == {spec.id: str(folder.resolve())} and state.count("load") == 1
        sent = next(b for k, b in state.calls if k == "completions")
        assert "Reasoning: high" in encoding().decode(sent["prompt"])

        chat = client.post(
            "/v1/chat/completions",
            json={
                "model": "tiny-gpt-oss",
                "messages": ask["messages"],
                "max_tokens": 32,
                "reasoning_effort": "low",
            },
        )
        assert chat.status_code == 200, chat.text
        message = chat.json()["choices"][0]["message"]
        assert (message["reasoning_content"], message["content"]) == (
            f"thinking as {BASE}",
            f"answer of {BASE}",
        )
        assert chat.json()["choices"][0]["finish_reason"] == "stop"
        last = [b for k, b in state.calls if k == "completions"][-1]
        assert last["model"] == BASE and "Reasoning: low" in encoding().decode(last["prompt"])

        again = client.post(
            "/v1/chat/completions", json={"model": "capitals", "messages": ask["messages"], "max_tokens": 32}
        )
        assert again.json()["choices"][0]["message"]["content"] == f"answer of {spec.id}"
        assert state.count("load") == 1  # loaded once, reused
        metrics = client.get("/metrics").text
        assert "gptoss_loaded_adapters 1.0" in metrics


def test_the_engine_setting_picks_the_implementation(settings: Settings) -> None:
    from pydantic import ValidationError

    from app.inference.engine import InferenceEngine

    assert isinstance(create_engine(settings), InferenceEngine)  # no vLLM server: in-process
    url = "http://vllm:8000"
    assert isinstance(create_engine(settings.model_copy(update={"vllm_url": url})), VllmEngine)  # auto
    inprocess = settings.model_copy(update={"vllm_url": url, "engine": "inprocess"})
    assert isinstance(create_engine(inprocess), InferenceEngine)
    with pytest.raises(ValidationError, match="engine 'vllm' needs vllm_url"):
        Settings(engine="vllm", data_dir=settings.data_dir)
    # In front of vLLM the API needs no GPU of its own, and 'auto' still means the real base model.
    assert Settings(base_model="auto", vllm_url=url).resolved_base_model() == "unsloth/gpt-oss-20b"


def test_tokens_arriving_together_are_handed_over_and_streamed_as_one_delta() -> None:
    """Tokens the engine thread hands over while the loop is busy reach the Assembler as one batch,
    and their text as one delta per channel: the same text as token by token, fewer events."""
    tokens = _harmony("step one, step two", "the answer")

    async def run(together: bool) -> tuple[list[tuple[str, str]], Assembler]:
        stream = TokenStream()
        assembler = Assembler(stream, prompt_tokens=3, stop=["answer"])

        def engine_thread() -> None:
            for token in tokens[:-1]:
                stream.put_token(token)
            stream.finish("stop", len(tokens))

        if together:
            engine_thread()  # everything posted before the loop looks: one wake-up, one batch
        else:
            threading.Thread(target=engine_thread).start()
        deltas = [(d.kind, d.text) async for d in assembler.deltas()]
        return deltas, assembler

    batched, assembler = asyncio.run(run(together=True))
    assert batched == [("reasoning", "step one, step two"), ("content", "the ")]
    done = assembler.completion
    assert done is not None and (done.content, done.finish_reason) == ("the ", "stop")
    # the stop string cut the content inside the batch: tokens after it are not counted
    assert done.completion_tokens < len(tokens)
    one_by_one, _ = asyncio.run(run(together=False))
    for kind in ("reasoning", "content"):
        assert "".join(t for k, t in one_by_one if k == kind) == "".join(t for k, t in batched if k == kind)


def test_sse_events_split_anywhere_and_crlf_parse_the_same() -> None:
    """vLLM's events parsed from the raw bytes: an event split across reads, CRLF line ends, and
    several events in one read (handed on together) give the same events; an error event raises."""
    from app.inference.vllm_engine import sse_events

    events = [{"choices": [{"token_ids": [i], "finish_reason": None}]} for i in range(5)]
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"

    async def parse(pieces: list[bytes]) -> list[list[dict[str, Any]]]:
        async def stream() -> Any:
            for piece in pieces:
                yield piece

        return [batch async for batch in sse_events(stream())]

    raw = body.encode()
    split = asyncio.run(parse([raw[i : i + 7] for i in range(0, len(raw), 7)]))
    crlf = asyncio.run(parse([body.replace("\n", "\r\n").encode()]))
    assert [e for batch in split for e in batch] == events
    assert crlf == [events]  # one read, one batch
    error = b'data: {"error": {"message": "boom", "code": 500}}\n\n'
    with pytest.raises(ServiceError, match="boom"):
        asyncio.run(parse([error]))
