"""The engine on the real tiny model: adapters hot-loaded on one base, batching that never mixes
adapters and gives every row the tokens it gets alone, the LRU cache, refusals, the busy limit and
giving the model back while a training job runs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.exceptions import Busy, Conflict, NotFound
from app.inference.base import create_engine
from app.inference.engine import InferenceEngine
from app.inference.stream import CollectingSink, _StopFilter
from app.inference.types import AdapterSpec, SamplingParams
from app.ml.harmony import render_prompt
from tests.fixtures_inference import (
    ANSWERS,
    DEVELOPER,
    QUESTION,
    LiveServer,
    TrainedAdapter,
    completion_logprob,
    copy_adapter,
    inference_settings,
    reference_greedy,
)

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)


def spec_for(server: LiveServer, task: str) -> AdapterSpec:
    path = server.settings.adapters_dir / f"adp_{task}"
    return AdapterSpec(f"adp_{task}", task, path, server.engine.fingerprint)


def prompt(question: str = QUESTION) -> list[int]:
    return render_prompt([{"role": "user", "content": question}], developer=DEVELOPER, reasoning_effort="low")


def run(
    engine: InferenceEngine, ids: list[int], adapter: AdapterSpec | None, params: SamplingParams = GREEDY
) -> list[int]:
    sink = CollectingSink()
    engine.submit(ids, params, sink, adapter)
    return sink.wait()


def test_adapters_answer_like_their_own_training(
    inference_server: LiveServer, reference_models: dict[str | None, Any]
) -> None:
    engine = inference_server.engine
    answers = {}
    for task in [None, *ANSWERS]:
        spec = spec_for(inference_server, task) if task else None
        answers[task] = run(engine, prompt(), spec)
        # exactly what transformers' own generate gives with that adapter alone on a fresh base
        assert answers[task] == reference_greedy(reference_models[task], prompt(), GREEDY.max_new_tokens)
    assert len({tuple(a) for a in answers.values()}) == 3
    # and each adapter learnt its own task: it finds its own answer likelier than the other adapter does
    for task, other in [("capitals", "continents"), ("continents", "capitals")]:
        turns = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWERS[task]}]
        own = completion_logprob(reference_models[task], turns)
        assert own > completion_logprob(reference_models[other], turns) + 1.0
        assert own > completion_logprob(reference_models[None], turns) + 1.0


def test_switching_adapters_back_and_forth_gives_identical_answers(inference_server: LiveServer) -> None:
    engine = inference_server.engine
    order = ["capitals", "continents", None, "capitals", None, "continents", "capitals"]
    seen: dict[str | None, set[tuple[int, ...]]] = {}
    for task in order:
        spec = spec_for(inference_server, task) if task else None
        seen.setdefault(task, set()).add(tuple(run(engine, prompt(), spec)))
    assert all(len(outputs) == 1 for outputs in seen.values()), seen
    assert len({next(iter(outputs)) for outputs in seen.values()}) == 3  # three different models


def test_adapter_for_another_base_is_refused_not_applied(
    inference_server: LiveServer, task_adapters: dict[str, TrainedAdapter], tmp_path: Path
) -> None:
    engine = inference_server.engine
    foreign = AdapterSpec("adp_foreign", "foreign", task_adapters["capitals"].path, "f" * 64)
    with pytest.raises(Conflict, match="another base model"):
        engine.check_adapter(foreign)
    # The row may claim the right base, but the manifest on disk is the last word.
    folder = copy_adapter(task_adapters["capitals"], tmp_path / "lying", fingerprint="e" * 64)
    lying = AdapterSpec("adp_lying", "lying", folder, engine.fingerprint)
    with pytest.raises(Conflict, match="another base model"):
        run(engine, prompt(), lying)
    assert "adp_lying" not in engine.loaded_adapters()


def test_adapter_must_record_this_exact_base_model(
    inference_server: LiveServer, task_adapters: dict[str, TrainedAdapter], tmp_path: Path
) -> None:
    engine = inference_server.engine

    def spec(name: str, **manifest: Any) -> AdapterSpec:
        folder = copy_adapter(task_adapters["capitals"], tmp_path / name, manifest=manifest)
        return AdapterSpec(f"adp_{name}", name, folder, engine.fingerprint)

    # Same architecture fingerprint, another model id (a different checkpoint of the same shape).
    other = spec("renamed", base_model="acme/gpt-oss-20b-ft")
    with pytest.raises(Conflict) as err:
        engine.check_adapter(other)
    assert "trained for another base model: 'acme/gpt-oss-20b-ft'" in err.value.message
    assert "this server runs 'tiny-gpt-oss'" in err.value.message
    with pytest.raises(Conflict, match="acme/gpt-oss-20b-ft"):  # refused at load time too
        run(engine, prompt(), other)
    # The row alone may be the one that disagrees.
    row_says = AdapterSpec("adp_row", "row", task_adapters["capitals"].path, engine.fingerprint, "acme/x")
    with pytest.raises(Conflict, match="'acme/x'"):
        engine.check_adapter(row_says)
    # An adapter that does not say which base it was trained for is refused, not trusted.
    for missing in ["base_fingerprint", "base_model"]:
        silent = spec(f"no-{missing}", **{missing: None})
        with pytest.raises(Conflict, match=f"has no {missing}"):
            engine.check_adapter(silent)
    gone_manifest = spec("no-manifest")
    (gone_manifest.path / "manifest.json").unlink()
    with pytest.raises(Conflict, match="does not record which base model"):
        run(engine, prompt(), gone_manifest)
    assert not {"adp_renamed", "adp_no-manifest"} & set(engine.loaded_adapters())


def test_adapter_whose_files_are_gone_is_not_found(inference_server: LiveServer, tmp_path: Path) -> None:
    gone = AdapterSpec("adp_gone", "gone", tmp_path / "nothing-here", inference_server.engine.fingerprint)
    with pytest.raises(NotFound, match="no files"):
        run(inference_server.engine, prompt(), gone)


def test_broken_adapter_is_refused_and_the_engine_keeps_serving(
    inference_server: LiveServer, task_adapters: dict[str, TrainedAdapter], tmp_path: Path
) -> None:
    engine = inference_server.engine
    folder = copy_adapter(task_adapters["capitals"], tmp_path / "broken")
    (folder / "adapter_config.json").write_text("{not json")
    broken = AdapterSpec("adp_broken", "broken", folder, engine.fingerprint)
    with pytest.raises(Conflict, match="could not be loaded"):
        run(engine, prompt(), broken)
    assert "adp_broken" not in engine.loaded_adapters()
    capitals = spec_for(inference_server, "capitals")
    assert run(engine, prompt(), capitals) == run(engine, prompt(), capitals)


def test_stop_filter_holds_back_a_possible_stop_string() -> None:
    stops = _StopFilter(["END"])
    sent = [stops.feed("Paris E"), stops.feed("N"), stops.feed("D and more")]
    assert sent == ["Paris", " ", ""]  # "E", then "EN", might be the start of "END"
    assert stops.hit and stops.flush() == ""
    free = _StopFilter(["END"])
    assert free.feed("Paris E") + free.feed("x") + free.flush() == "Paris Ex"
    assert not free.hit


@pytest.fixture
def small_engine(
    tmp_path: Path, models_dir: Path, task_adapters: dict[str, TrainedAdapter]
) -> Iterator[tuple[InferenceEngine, dict[str, AdapterSpec]]]:
    """A second engine with a two-slot cache (capitals pinned) and room for two requests."""
    settings = inference_settings(
        tmp_path / "data",
        models_dir,
        adapter_cache_size=2,
        pinned_adapters=["adp_a"],
        max_concurrent_generations=2,
    )
    engine = InferenceEngine(settings)
    engine.start()
    fp = engine.fingerprint
    specs = {
        name: AdapterSpec(f"adp_{name}", name, copy_adapter(task_adapters[task], tmp_path / name), fp)
        for name, task in [("a", "capitals"), ("b", "continents"), ("c", "continents")]
    }
    yield engine, specs
    engine.close()


def test_lru_cache_evicts_least_recent_keeps_pinned_and_unloads(
    small_engine: tuple[InferenceEngine, dict[str, AdapterSpec]],
) -> None:
    engine, specs = small_engine
    first = {name: run(engine, prompt(), spec) for name, spec in specs.items()}  # a, b, c: b is evicted
    assert engine.loaded_adapters() == ["adp_a", "adp_c"]
    assert run(engine, prompt(), specs["b"]) == first["b"]  # reloaded from disk, same answer; c evicted
    assert engine.loaded_adapters() == ["adp_a", "adp_b"]
    engine.unload("adp_a")  # an explicit unload (DELETE /adapters) also drops pinned ones
    engine.unload("adp_a")  # idempotent
    assert engine.loaded_adapters() == ["adp_b"]
    engine.unload("adp_b")  # the last one: the plain base is served again
    assert engine.loaded_adapters() == []
    assert run(engine, prompt(), None) == run(engine, prompt(), None)
    assert run(engine, prompt(), specs["a"]) == first["a"]


def test_load_makes_an_adapter_resident_before_its_first_request(
    small_engine: tuple[InferenceEngine, dict[str, AdapterSpec]], tmp_path: Path
) -> None:
    engine, specs = small_engine
    engine.load(specs["b"])  # on the engine thread, between batches
    assert engine.loaded_adapters() == ["adp_b"]
    engine.load(specs["b"])  # idempotent
    answer = run(engine, prompt(), specs["b"])
    assert engine.loaded_adapters() == ["adp_b"] and answer == run(engine, prompt(), specs["b"])
    foreign = AdapterSpec("adp_f", "f", specs["c"].path, "e" * 64)
    with pytest.raises(Conflict, match="another base model"):
        engine.load(foreign)
    broken = AdapterSpec("adp_x", "x", copy_adapter_config_broken(specs["c"], tmp_path), engine.fingerprint)
    with pytest.raises(Conflict, match="could not be loaded"):  # the load's error reaches the caller
        engine.load(broken)
    assert engine.loaded_adapters() == ["adp_b"]


def copy_adapter_config_broken(spec: AdapterSpec, tmp_path: Path) -> Path:
    import shutil

    folder = tmp_path / "broken-copy"
    shutil.copytree(spec.path, folder)
    (folder / "adapter_config.json").write_text("{not json")
    return folder


def test_full_engine_answers_busy_instead_of_queueing(
    small_engine: tuple[InferenceEngine, dict[str, AdapterSpec]],
) -> None:
    engine, _ = small_engine
    long = SamplingParams(max_new_tokens=200, temperature=0.0)
    sinks = [CollectingSink(), CollectingSink()]
    for sink in sinks:
        engine.submit(prompt(), long, sink)
    with pytest.raises(Busy, match="max_concurrent_generations") as err:
        engine.submit(prompt(), long, CollectingSink())
    assert err.value.retry_after >= 1
    for sink in sinks:
        sink.wait()
        assert sink.reason in ("length", "stop")
    assert run(engine, prompt(), None)  # room again once they finished


def test_model_is_released_while_a_training_job_runs(tmp_path: Path, models_dir: Path) -> None:
    from sqlalchemy import update

    from app import queue
    from app.db import make_engine, make_sessionmaker, upgrade_to_head
    from app.models import Job

    settings = inference_settings(
        tmp_path / "data",
        models_dir,
        release_gpu_during_training=True,
        release_poll_s=0.05,
        release_cooldown_s=2.0,
    )
    upgrade_to_head(settings)
    sessions = make_sessionmaker(make_engine(settings))
    with sessions() as session:
        for job_id, status in [("ftjob_1", "running"), ("ftjob_2", "queued")]:
            session.add(
                Job(id=job_id, status=status, base_model="tiny-gpt-oss", dataset="sample:capitals", config={})
            )
        session.commit()

    def set_status(job_id: str, status: str) -> None:
        with sessions() as session:
            session.execute(update(Job).where(Job.id == job_id).values(status=status))
            session.commit()

    def job_running() -> bool:  # what app.main wires in: the job table, read through app.queue
        with sessions() as session:
            return queue.any_job_running(session)

    engine = create_engine(settings, training_probe=job_running)
    assert isinstance(engine, InferenceEngine)  # the default: no vLLM server configured
    engine.start()
    try:
        _wait_for(lambda: not engine.is_ready())
        with pytest.raises(Busy, match="training job"):
            engine.submit(prompt(), GREEDY, CollectingSink())
        # The worker finishes one job and claims the next queued one a moment later: many polls see
        # no running job, but within the cool-down, so the model is not reloaded only to be dropped.
        set_status("ftjob_1", "succeeded")
        time.sleep(0.5)
        set_status("ftjob_2", "running")
        time.sleep(0.2)
        assert not engine.is_ready() and engine.stats["reloads"] == 0
        set_status("ftjob_2", "succeeded")
        _wait_for(engine.is_ready)
        assert engine.stats["releases"] == 1 and engine.stats["reloads"] == 1
        assert run(engine, prompt(), None)
    finally:
        engine.close()


def _wait_for(condition, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.05)


def test_one_slot_cache_as_on_unsloth_swaps_adapters_without_mixing(
    tmp_path: Path, models_dir: Path, task_adapters: dict[str, TrainedAdapter], inference_server: LiveServer
) -> None:
    """The Unsloth backend keeps one adapter resident (two were seen to mix on the H200): every switch
    unloads to the plain base and loads the next adapter. Each answer must still equal what the
    multi-slot engine gives, and the base must come back clean between adapters."""
    settings = inference_settings(
        tmp_path / "data", models_dir, adapter_cache_size=4, pinned_adapters=["adp_capitals"]
    )
    engine = InferenceEngine(settings)
    assert engine._cache_policy("unsloth") == (1, set())  # size and pins are overridden there
    assert engine._cache_policy("hf") == (4, {"adp_capitals"})
    engine.settings = inference_settings(tmp_path / "data", models_dir, adapter_cache_size=1)
    engine.start()
    try:
        fp = engine.fingerprint
        specs = {
            task: AdapterSpec(f"adp_{task}", task, copy_adapter(task_adapters[task], tmp_path / task), fp)
            for task in ANSWERS
        }
        expected = {
            task: run(inference_server.engine, prompt(), spec_for(inference_server, task) if task else None)
            for task in [None, *ANSWERS]
        }
        for task in ["capitals", "continents", None, "capitals", "continents"]:
            assert run(engine, prompt(), specs[task] if task else None) == expected[task]
            assert len(engine.loaded_adapters()) <= 1
    finally:
        engine.close()
