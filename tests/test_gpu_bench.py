"""CPU checks of the benchmark helpers the GPU runs rely on (bench/): the datasets really have the
lengths the figures assume, the bandwidth ceiling and the packing rate add up, and the training
benchmark and the plain-`generate` baseline run end to end on the tiny model (about 40 s). The
benchmarks themselves run on the GPU machine (bench/README.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.roofline import Arch, ceiling_tokens_per_s, distinct_experts, step_bytes


def test_fixed_length_rows_render_to_exactly_the_asked_length(models_dir: Path) -> None:
    from bench.data import fixed_length_rows, render_all

    rendered = render_all(fixed_length_rows(6, 300, seed=3))
    assert {len(ids) for ids, _ in rendered} == {300}  # tokens/step = batch x 300, no padding
    assert all(0 < sum(mask) < len(mask) for _, mask in rendered)  # a prompt part and a trained part


def test_uneven_rows_spread_between_the_bounds(models_dir: Path) -> None:
    from bench.data import render_all, uneven_rows

    lengths = [len(ids) for ids, _ in render_all(uneven_rows(40, 64, 512, seed=1))]
    assert max(lengths) <= 512  # the trainer refuses longer rows
    assert min(lengths) < 128 and max(lengths) > 256  # uneven enough for padding to cost


def test_routed_experts_grow_from_top_k_towards_all() -> None:
    arch = Arch()
    assert distinct_experts(arch, 1) == pytest.approx(arch.top_k)
    assert distinct_experts(arch, 8) < distinct_experts(arch, 32) < arch.experts
    # reading every expert can only cost more than reading the routed ones
    for batch in (1, 8, 32):
        routed = sum(step_bytes(arch, batch).values())
        assert sum(step_bytes(arch, batch, experts="all").values()) >= routed


def test_bandwidth_ceiling_scales_with_bandwidth_and_batch() -> None:
    arch = Arch()
    one = ceiling_tokens_per_s(arch, 1, 4000)
    assert ceiling_tokens_per_s(arch, 1, 8000) == pytest.approx(2 * one)
    assert ceiling_tokens_per_s(arch, 32, 4000) > ceiling_tokens_per_s(arch, 8, 4000) > one


def test_packing_rate_counts_tokens_of_the_timed_steps_only() -> None:
    from bench.packing_bench import RateHooks

    hooks = RateHooks()
    hooks.stamps, hooks.rates = [0.0, 5.0, 6.0, 8.0], [0.0, 10.0, 100.0, 50.0]
    rate = hooks.real_rate(warmup=1)  # the 5 s first step (compilation) is left out
    assert rate["steps"] == 2
    assert rate["real_tokens"] == 100 * 1 + 50 * 2
    assert rate["tokens_per_s"] == pytest.approx(200 / 3)


def _bench(module: str, *args: str) -> None:
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", module, *args], check=True, capture_output=True, timeout=600)


@pytest.mark.slow
def test_train_bench_repeats_a_loop_and_profiles_after_the_timed_steps(
    models_dir: Path, tmp_path: Path
) -> None:
    """The training benchmark as the GPU runs it, on the tiny model (the service loop only: the bare
    Unsloth loop needs CUDA): a loop named twice runs twice, its mean is over both runs, and the
    profiled steps come after the timed ones."""
    import json

    _bench(
        "bench.train_bench",
        *("--model", "tiny-gpt-oss", "--models-dir", str(models_dir), "--out", str(tmp_path)),
        *("--loops", "service,service", "--batch", "2", "--seq", "128", "--steps", "2", "--warmup", "1"),
        *("--profile-steps", "1"),
    )
    summary = json.loads((tmp_path / "train_bench.json").read_text())
    assert [(r["run"], r["loop"]) for r in summary["runs"]] == [(1, "service"), (2, "service")]
    service = summary["loops"]["service"]
    rates = service["tokens_per_s_runs"]
    assert len(rates) == 2 and all(r > 0 for r in rates)
    assert service["tokens_per_s"] == pytest.approx(sum(rates) / 2)
    for run in (1, 2):
        one = json.loads((tmp_path / f"train_{run}_service.json").read_text())
        assert one["steps_timed"] == len(one["step_s_each"]) == 2  # warm-up and profiled steps excluded
        profile = (tmp_path / f"profile_{run}_service.txt").read_text()
        assert "aten::" in profile and "of wall" in profile
    assert service["step_s_each_runs"] == [
        json.loads((tmp_path / f"train_{run}_service.json").read_text())["step_s_each"] for run in (1, 2)
    ]


@pytest.mark.slow
def test_train_bench_interleaves_the_service_job_with_the_bare_loop(models_dir: Path, tmp_path: Path) -> None:
    """`interleaved` runs the service's job and the bare loops in one process, a step of each in turn
    (on CPU the bare loops are transformers + PEFT: Unsloth needs CUDA). Each loop gets its own timed
    steps, and the ratios are taken from them."""
    import json

    _bench(
        "bench.train_bench",
        *("--model", "tiny-gpt-oss", "--models-dir", str(models_dir), "--out", str(tmp_path)),
        *("--loops", "interleaved", "--batch", "2", "--seq", "128", "--steps", "3", "--warmup", "1"),
        *("--interleave-with", "unsloth,unsloth-amp,unsloth-fused"),
    )
    summary = json.loads((tmp_path / "train_bench.json").read_text())
    assert [(r["run"], r["loop"]) for r in summary["runs"]] == [
        (1, "interleaved:service"),
        (1, "interleaved:unsloth"),
        (1, "interleaved:unsloth-amp"),
        (1, "interleaved:unsloth-fused"),
    ]
    loops = summary["loops"]
    service = loops["interleaved:service"]
    for bare_loop in ("unsloth", "unsloth_amp", "unsloth_fused"):
        bare = loops[f"interleaved:{bare_loop.replace('_', '-')}"]
        assert service["steps_timed"] == bare["steps_timed"] == 3
        assert all(s > 0 for s in service["step_s_each"] + bare["step_s_each"])
        assert summary["ratios"][f"interleaved_service_over_{bare_loop}_tokens"] == pytest.approx(
            service["tokens_per_s"] / bare["tokens_per_s"], rel=1e-3
        )
        assert summary["ratios"][f"interleaved_service_over_{bare_loop}_paired_steps"] > 0
    host = summary["runs"][0]["host"]
    assert host["process_cpu_s_per_step"] > 0 and 0 <= host["machine_steal_share"] <= 1
    # unsloth_zoo's MoE counters per loop: none move without Unsloth (CPU), so the records are empty
    for loop in ("service", "unsloth"):
        assert loops[f"interleaved:{loop}"]["unsloth_counters_per_step"] == {}
    # the host's single-core speed, probed before and after the timed steps
    assert len(host["python_probe_ms"]) == len(host["torch_op_us"]) == 2 and min(host["torch_op_us"]) > 0
    # the service's job really trained in that process: its adapter is there
    assert (tmp_path / "service-work" / "adapter" / "adapter_config.json").exists()


def test_host_usage_reports_cpu_per_step_and_the_steal_share() -> None:
    from bench.train_bench import host_usage

    start = {"process_cpu_s": 10.0, "involuntary_switches": 5.0, "wall_s": 100.0}
    start |= {"ticks_user": 1000.0, "ticks_idle": 500.0, "ticks_iowait": 0.0, "ticks_steal": 0.0}
    end = {"process_cpu_s": 14.0, "involuntary_switches": 25.0, "wall_s": 104.0}
    end |= {"ticks_user": 1300.0, "ticks_idle": 550.0, "ticks_iowait": 0.0, "ticks_steal": 50.0}
    usage = host_usage(start, end, steps=4)
    assert usage["process_cpu_s_per_step"] == 1.0 and usage["involuntary_switches_per_step"] == 5.0
    assert usage["machine_steal_share"] == pytest.approx(50 / 400)
    assert usage["machine_busy_share"] == pytest.approx(1 - 50 / 400)


def test_each_loop_gets_the_optimizer_it_names() -> None:
    """--optim sets every loop's optimizer; unsloth-8bit and unsloth-fused pin theirs, so two
    optimizers can step side by side in one interleaved process. Without CUDA, 8-bit falls back to
    plain AdamW as the service's 'auto' does, and the service's job is asked for the same."""
    import torch

    from bench.train_bench import interleaved_loops, make_optimizer, parse_args, service_config

    params = [torch.nn.Parameter(torch.zeros(2))]
    args = parse_args(["--model", "m", "--out", "o", "--optim", "adamw-fused"])
    for loop, fused in (("hf", True), ("unsloth", True), ("unsloth-8bit", False), ("unsloth-fused", True)):
        opt = make_optimizer(params, args, loop)
        assert type(opt) is torch.optim.AdamW and bool(opt.defaults["fused"]) is fused, loop
    assert service_config(args, Path("rows.jsonl"))["optim"] == "adamw_torch_fused"
    eight = parse_args(["--model", "m", "--out", "o"])
    assert not make_optimizer(params, eight, "hf").defaults["fused"]
    assert service_config(eight, Path("rows.jsonl"))["optim"] == "adamw_torch"  # no CUDA here
    with pytest.raises(SystemExit, match="unsloth-gpu-gc"):
        interleaved_loops(parse_args(["--model", "m", "--out", "o", "--interleave-with", "unsloth-gpu-gc"]))


def test_unsloth_counters_are_read_from_unsloth_zoo_and_reported_per_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bench reads unsloth_zoo's own MoE counter dicts where Unsloth is loaded and never imports
    it. Unsloth cannot load here (CUDA only), so a module object with the same name and a counter
    dict of the same shape stands in for it."""
    import sys
    import types

    from bench.train_bench import counter_delta, unsloth_counter_modules, unsloth_counters

    assert unsloth_counters() == {}  # not loaded: nothing, and no import attempted
    assert unsloth_counter_modules() == []
    assert "unsloth_zoo.temporary_patches.moe_ready_epoch" not in sys.modules
    fake = types.ModuleType("unsloth_zoo.temporary_patches.moe_ready_epoch")
    fake.COUNTS = {"full": 0, "lean": 0, "cheap": 0}  # type: ignore[attr-defined]
    utils = types.ModuleType("unsloth_zoo.temporary_patches.moe_utils")
    utils._EXPERT_COUNT_CALLS = [0]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setitem(sys.modules, utils.__name__, utils)
    assert unsloth_counter_modules() == ["moe_ready_epoch", "moe_utils"]
    before = unsloth_counters()
    assert before == {
        "moe_ready_epoch.COUNTS.full": 0.0,
        "moe_ready_epoch.COUNTS.lean": 0.0,
        "moe_ready_epoch.COUNTS.cheap": 0.0,
        "moe_utils._EXPERT_COUNT_CALLS": 0.0,
    }
    fake.COUNTS["full"] += 48  # type: ignore[attr-defined]
    fake.COUNTS["cheap"] += 6  # type: ignore[attr-defined]
    utils._EXPERT_COUNT_CALLS[0] += 96  # type: ignore[attr-defined]
    assert counter_delta(before, unsloth_counters(), steps=2) == {
        "moe_ready_epoch.COUNTS.full": 24.0,
        "moe_ready_epoch.COUNTS.cheap": 3.0,
        "moe_utils._EXPERT_COUNT_CALLS": 48.0,
    }


def test_paired_step_ratio_compares_the_same_steps() -> None:
    """Step i of both loops trains the same batch: the ratio is the median of per-step ratios (each
    step averaged over a loop's runs), so one slow batch does not move it the way it moves a mean."""
    from bench.train_bench import paired_step_ratio

    results = {
        "unsloth": {"step_s_each_runs": [[0.40, 0.50, 0.40, 0.90], [0.40, 0.50, 0.40, 0.90]]},
        "service": {"step_s_each_runs": [[0.50, 0.50, 0.50, 1.00], [0.30, 0.50, 0.30, 1.00]]},
    }
    # per step: 0.4/0.4, 0.5/0.5, 0.4/0.4, 0.9/1.0 -> median 1.0
    assert paired_step_ratio(results, "unsloth", "service") == 1.0
    assert paired_step_ratio(results, "unsloth", "missing") is None


@pytest.mark.slow
def test_gen_baseline_times_plain_generate(models_dir: Path, tmp_path: Path) -> None:
    import json

    _bench(
        "bench.gen_baseline",
        *("--model", "tiny-gpt-oss", "--models-dir", str(models_dir), "--out", str(tmp_path)),
        *("--new-tokens", "4", "--rounds", "2", "--prompt-words", "20"),
    )
    result = json.loads((tmp_path / "gen_baseline.json").read_text())
    assert [r["new_tokens"] for r in result["runs"]] == [4, 4]  # min_new_tokens: every run to the limit
    assert result["tokens_per_s"]["n"] == 2 and result["aggregate_tokens_per_s"] > 0
