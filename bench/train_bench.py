"""Training throughput and peak memory, three loops side by side on one config.

    python -m bench.train_bench --model /path/to/gpt-oss --out bench/results/run1 \
        [--loops service,unsloth,hf] [--batch 4 --seq 1024 --rank 16 --steps 6 --warmup 2]

- service: `app.ml.trainer.train` exactly as the worker's child process calls it (TRL SFTTrainer,
  Unsloth backend on CUDA), timed through its own `TrainHooks.on_step`.
- unsloth: a bare loop, `FastLanguageModel` + `get_peft_model` + AdamW, no trainer around it.
- unsloth-amp: the same bare loop with its forward under bf16 autocast, as the HF Trainer runs it
  (the service's step runs under `accelerate`'s autocast; the bare loop does not).
- service-gpu-gc, unsloth-gpu-gc: the service and the bare loop with standard gradient checkpointing
  (activations kept on the GPU: `offload_checkpoints=false`, Unsloth's `use_gradient_checkpointing=True`)
  instead of Unsloth's offloading "unsloth" mode.
- unsloth-8bit, unsloth-fused: the bare loop with 8-bit AdamW (bitsandbytes) or torch's fused AdamW
  whatever `--optim` says, to set two optimizers side by side in an interleaved run.
- hf: a bare loop on transformers + PEFT in bf16, experts reached via `target_parameters`.
- interleaved: the service's job and the bare loops named by `--interleave-with` (default: unsloth)
  in one process, one step of each in turn (the bare steps run from the service's per-step hook,
  each loop on its own model), so whatever slows the host at a given moment slows all of them
  alike. Tokens/s only: the models share the process, so its peak memory is theirs together (peak
  memory per loop comes from the separate runs). On a machine without CUDA the bare loops are
  transformers + PEFT (Unsloth needs CUDA).
- interleaved-gpu-gc: the same with standard checkpointing (the service's offload_checkpoints=false,
  bare loop unsloth-gpu-gc). Unsloth's checkpointing mode is process-wide (it replaces
  torch.utils.checkpoint's function), so the two modes cannot share one process.

Each loop but the interleaved ones runs in its own process (Unsloth patches transformers on import, and
peak memory must be per loop). All train the same rows rendered by the project's harmony code, all
exactly `--seq` tokens long, in the same batches and order (the service's job runs with
shuffle=false), so step n of one loop and step n of another do the same work and can be compared
step by step.
Tokens/s = batch x seq / step time, mean over `--steps` steps after `--warmup` steps; peak memory is
`torch.cuda.max_memory_allocated` over the timed steps and over the whole process (load included).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import PrintingHooks, peak_gib, read_json, reset_peak, run_header, summarize, write_json

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
BARE = ("unsloth", "unsloth-amp", "unsloth-gpu-gc", "unsloth-8bit", "unsloth-fused")
# Bare loops that pin their optimizer whatever --optim says (to compare optimizers in one process).
OPTIM_OF_LOOP = {"unsloth-8bit": "adamw8bit", "unsloth-fused": "adamw-fused"}
# --optim -> the service's TrainConfig.optim (8-bit needs CUDA + bitsandbytes).
SERVICE_OPTIM = {"adamw8bit": "adamw_8bit", "adamw": "adamw_torch", "adamw-fused": "adamw_torch_fused"}
INTERLEAVABLE = tuple(loop for loop in BARE if loop != "unsloth-gpu-gc")
LOOPS = ("service", *BARE, "service-gpu-gc", "hf", "interleaved", "interleaved-gpu-gc")
# The service's defaults (TrainConfig), used by all three loops.
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (or 'tiny-gpt-oss')")
    p.add_argument("--models-dir", type=Path, default=Path("data/models"), help="offline tokenizer + tiny")
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON results")
    p.add_argument("--loops", default="service,unsloth,hf")
    p.add_argument("--one", choices=LOOPS, help=argparse.SUPPRESS)  # internal: run one loop here
    p.add_argument(
        "--interleave-with",
        default="unsloth",
        help=f"bare loops stepping after each service step in `interleaved` (of {', '.join(INTERLEAVABLE)})",
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="after the timed steps, this many more under torch.profiler -> <out>/profile_<loop>.txt",
    )
    p.add_argument(
        "--profile-stacks",
        action="store_true",
        help="record Python stacks in the profiled steps and list where host->device copies are made",
    )
    p.add_argument("--four-bit", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--optim",
        choices=tuple(SERVICE_OPTIM),
        default="adamw8bit",
        help="every loop's optimizer but unsloth-8bit/-fused; the service's CUDA default is 8-bit",
    )
    return p.parse_args(argv)


# --- timing shared by the three loops ---------------------------------------------------------------


class StepClock:
    """Records the wall time at the end of every optimizer step; resets the peak after the warm-up.
    With ``profile_steps``, the steps after the timed ones run under ``torch.profiler`` (they never
    count in tokens/s) and the busiest operators are written to ``profile_path``."""

    def __init__(
        self,
        warmup: int,
        steps: int,
        profile_steps: int = 0,
        profile_path: Path | None = None,
        stacks: bool = False,
    ) -> None:
        self.stacks = stacks
        self.warmup = warmup
        self.steps = steps
        self.profile_steps = profile_steps
        self.profile_path = profile_path
        self.stamps: list[float] = []
        self.peak_before_gib: float | None = None  # load + warm-up steps
        self.train_peak_gib: float | None = None
        self._profiler: Any = None
        self.profiled: dict[str, float] | None = None  # wall and GPU-kernel seconds of the profiled steps
        self._host_start: dict[str, float] | None = None
        self.host: dict[str, Any] | None = None  # what the host did over the timed steps
        self._counters_start: dict[str, float] = {}
        self.unsloth_per_step: dict[str, float] | None = None  # unsloth_zoo's MoE counters

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps + self.profile_steps

    def tick(self) -> None:
        from bench.common import cuda_sync

        cuda_sync()
        self.stamps.append(time.perf_counter())
        done = len(self.stamps)
        if done == self.warmup:
            self.peak_before_gib = peak_gib()
            reset_peak()  # the timed steps' own peak, without load-time spikes
            self._host_start = host_mark()
            self._counters_start = unsloth_counters()
            self.stamps[-1] = time.perf_counter()  # the probes' time is not a timed step's
        if done == self.warmup + self.steps:
            self.train_peak_gib = peak_gib()
            self.unsloth_per_step = counter_delta(self._counters_start, unsloth_counters(), self.steps)
            if self._host_start is not None:
                self.host = host_span(self._host_start, self.steps)
            if self.profile_steps:
                self._start_profiler()
        if self._profiler is not None and done == self.total_steps:
            self._stop_profiler()

    def _start_profiler(self) -> None:
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        # verbose=True: without it this torch records no Python frames for with_stack
        config = torch._C._profiler._ExperimentalConfig(verbose=True) if self.stacks else None
        self._profiler = torch.profiler.profile(
            activities=activities, with_stack=self.stacks, experimental_config=config
        )
        self._profiler.start()

    def _stop_profiler(self) -> None:
        import torch

        self._profiler.stop()
        wall_s = self.stamps[-1] - self.stamps[-1 - self.profile_steps]
        averages = self._profiler.key_averages()
        sorts = ["self_cpu_time_total", "cpu_time_total"]
        if torch.cuda.is_available():
            sorts.insert(0, "self_cuda_time_total")
        # As the table's "Self CUDA time total": device-side events only (an operator's row repeats
        # its kernels' time). Copies on the side stream overlap compute, so this can pass 100 %.
        busy_s = (
            sum(
                e.self_device_time_total
                for e in averages
                if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation
            )
            / 1e6
        )
        self.profiled = {"steps": self.profile_steps, "wall_s": wall_s, "gpu_kernel_s": busy_s}
        text = [
            f"{self.profile_steps} profiled steps after the timed ones; operators sorted by each column",
            f"wall {wall_s:.3f} s; GPU kernels {busy_s:.3f} s = {busy_s / max(wall_s, 1e-9):.1%} of wall "
            "(kernels on overlapping streams add up, so this can pass 100 %)",
        ]
        for key in sorts:
            text += [f"\n== by {key}", averages.table(sort_by=key, row_limit=30, max_name_column_width=60)]
        if self.stacks:
            text += ["\n== call sites of copies and syncs (by count)"]
            watched = ("cudaMemcpyAsync", "aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize")
            by_stack = [e for e in self._profiler.key_averages(group_by_stack_n=12) if e.key in watched]
            for e in sorted(by_stack, key=lambda e: -e.count)[:12]:
                text += [f"{e.key} x{e.count} (self CPU {e.self_cpu_time_total / 1e3:.1f} ms)"]
                text += [f"    {frame}" for frame in e.stack]
        if self.profile_path is not None:
            self.profile_path.parent.mkdir(parents=True, exist_ok=True)
            self.profile_path.write_text("\n".join(text))
        self._profiler = None

    def result(self, tokens_per_step: int) -> dict[str, Any]:
        timed = self.stamps[max(self.warmup - 1, 0) : self.warmup + self.steps]
        step_s = [b - a for a, b in zip(timed, timed[1:], strict=False)]
        stats = summarize(step_s)
        mean = stats.get("mean")
        train_peak = self.train_peak_gib if self.train_peak_gib is not None else peak_gib()
        return {
            "steps_timed": len(step_s),
            "step_s": stats,
            "step_s_each": step_s,
            "tokens_per_step": tokens_per_step,
            "tokens_per_s": tokens_per_step / mean if mean else None,
            "peak_gib_train": train_peak,
            "peak_gib_process": max(self.peak_before_gib or 0, train_peak or 0) or None,
            "profiled": self.profiled,
            "host": self.host,
            "unsloth_counters_per_step": self.unsloth_per_step,
            "unsloth_counter_modules": unsloth_counter_modules(),
        }


def host_counters() -> dict[str, float]:
    """This process's CPU seconds and involuntary context switches, and the machine's CPU time
    split (/proc/stat, in clock ticks) where Linux has it: 'steal' is time the hypervisor gave this
    guest's CPUs to someone else, the usual reason a host-bound loop slows down from run to run."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    counters = {
        "process_cpu_s": usage.ru_utime + usage.ru_stime,
        "involuntary_switches": float(usage.ru_nivcsw),
        "wall_s": time.perf_counter(),
    }
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return counters
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    counters.update({f"ticks_{n}": float(v) for n, v in zip(names, fields, strict=False)})
    return counters


# unsloth_zoo's own counters of its MoE paths (module, table): readiness checks, which grouped-expert
# forward ran, selective dequantisation; read only where those modules are already imported.
UNSLOTH_COUNTERS = (
    ("unsloth_zoo.temporary_patches.moe_ready_epoch", "COUNTS"),
    ("unsloth_zoo.temporary_patches.gpt_oss_grouped_qlora", "CALLS"),
    ("unsloth_zoo.temporary_patches.moe_utils", "SELECTIVE_DEQUANT_STATS"),
    ("unsloth_zoo.temporary_patches.moe_utils", "_EXPERT_COUNT_CALLS"),
    ("unsloth_zoo.temporary_patches.moe_utils", "TRITON_MOE_COMPUTE_DTYPE_STATS"),
    ("unsloth_zoo.temporary_patches.moe_grouped_fp16", "CALLS"),
    ("unsloth_zoo.temporary_patches.moe_grouped_fp16", "GENERIC_CALLS"),
)


def unsloth_counter_modules() -> list[str]:
    """Which of the counters' modules this process has imported: a counter that did not move means
    something only where its module is listed here."""
    return sorted({m.rsplit(".", 1)[-1] for m, _ in UNSLOTH_COUNTERS if m in sys.modules})


def unsloth_counters() -> dict[str, float]:
    """unsloth_zoo's MoE counters now, as ``<module tail>.<table>.<key>`` (a one-slot list counter as
    ``<module tail>.<table>``); empty where Unsloth is not loaded (never imports it)."""
    out: dict[str, float] = {}
    for module, attr in UNSLOTH_COUNTERS:
        table = getattr(sys.modules.get(module), attr, None)
        name = f"{module.rsplit('.', 1)[-1]}.{attr}"
        if isinstance(table, dict):
            out.update({f"{name}.{k}": float(v) for k, v in table.items() if isinstance(v, int | float)})
        elif isinstance(table, list) and len(table) == 1 and isinstance(table[0], int | float):
            out[name] = float(table[0])
    return out


def counter_delta(before: dict[str, float], after: dict[str, float], steps: int) -> dict[str, float]:
    """Per-step increase of each counter that moved between two ``unsloth_counters()`` readings."""
    moved = {k: v - before.get(k, 0.0) for k, v in after.items()}
    return {k: round(d / steps, 2) for k, d in moved.items() if d}


def host_speed() -> dict[str, float]:
    """Two fixed probes of the single-core speed that bounds a host-bound loop: milliseconds for a
    fixed pure-Python loop, and microseconds per tiny torch op on the CPU (the dispatcher path every
    kernel launch also takes). Best of 3, so a preemption does not count."""
    import torch

    def python_loop() -> float:
        t0 = time.perf_counter()
        acc: dict[int, int] = {}
        for i in range(100_000):
            acc[i & 1023] = acc.get(i & 1023, 0) + i
        return (time.perf_counter() - t0) * 1e3

    def torch_ops(n: int = 2000) -> float:
        x = torch.zeros(4)
        t0 = time.perf_counter()
        for _ in range(n):
            x.add_(1.0)
        return (time.perf_counter() - t0) * 1e6 / n

    return {
        "python_probe_ms": min(python_loop() for _ in range(3)),
        "torch_op_us": min(torch_ops() for _ in range(3)),
    }


def host_mark(speed: dict[str, float] | None = None) -> dict[str, float]:
    """The host record at the start of the timed steps: the speed probes first (or ``speed``, probed
    earlier), then the counters, so the probes' own CPU time is not counted."""
    return {**(speed if speed is not None else host_speed()), **host_counters()}


def host_span(start: dict[str, float], steps: int) -> dict[str, Any]:
    """``host_usage`` from ``host_mark()`` to now: the counters first, then the probes."""
    return host_usage(start, {**host_counters(), **host_speed()}, steps)


def host_usage(start: dict[str, float], end: dict[str, float], steps: int) -> dict[str, Any]:
    """Per timed step: process CPU seconds and involuntary switches; over the span: the machine's
    steal share of all CPU ticks."""
    wall = end["wall_s"] - start["wall_s"]
    out: dict[str, Any] = {
        "process_cpu_s_per_step": round((end["process_cpu_s"] - start["process_cpu_s"]) / steps, 4),
        "involuntary_switches_per_step": round(
            (end["involuntary_switches"] - start["involuntary_switches"]) / steps, 1
        ),
        "wall_s": round(wall, 3),
    }
    for probe in ("python_probe_ms", "torch_op_us"):
        if probe in start and probe in end:  # the host's single-core speed before and after
            out[probe] = [round(start[probe], 3), round(end[probe], 3)]
    ticks = {k: end[k] - start[k] for k in end if k.startswith("ticks_") and k in start}
    total = sum(ticks.values())
    if total > 0:
        out["machine_steal_share"] = round(ticks["ticks_steal"] / total, 4)
        out["machine_busy_share"] = round(1 - (ticks["ticks_idle"] + ticks.get("ticks_iowait", 0)) / total, 4)
    return out


def make_clock(args: argparse.Namespace) -> StepClock:
    path = args.out / f"profile_{args.one}.txt" if args.profile_steps else None
    return StepClock(args.warmup, args.steps, args.profile_steps, path, stacks=args.profile_stacks)


# --- the bare loops ---------------------------------------------------------------------------------


def _batches(rows: list[tuple[list[int], list[int]]], batch: int, count: int) -> list[tuple[Any, Any]]:
    import torch

    out = []
    for step in range(count):
        chunk = [rows[(step * batch + i) % len(rows)] for i in range(batch)]
        ids = torch.tensor([c[0] for c in chunk])
        mask = torch.tensor([c[1] for c in chunk])
        labels = ids.masked_fill(mask == 0, -100)  # completion-only loss, as the service trains
        out.append((ids, labels))
    return out


def bare_steps(
    model: Any, args: argparse.Namespace, batches: list[tuple[Any, Any]], loop: str
) -> Iterator[None]:
    """The bare loop, one optimizer step per ``next()`` (under bf16 autocast for unsloth-amp)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, args, loop)
    device = next(p.device for p in params)
    model.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=loop == "unsloth-amp")
    for ids, labels in batches:
        with autocast:
            out = model(input_ids=ids.to(device), labels=labels.to(device))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        yield


def bare_loop(model: Any, args: argparse.Namespace, rows: list[tuple[list[int], list[int]]]) -> StepClock:
    clock = make_clock(args)
    for _ in bare_steps(model, args, _batches(rows, args.batch, clock.total_steps), args.one):
        clock.tick()
    return clock


def make_optimizer(params: list[Any], args: argparse.Namespace, loop: str | None = None) -> Any:
    """The loop's optimizer: 8-bit AdamW (CUDA only, else plain AdamW, as the service's 'auto'),
    torch's AdamW, or torch's fused AdamW (all parameters in a few kernels a step)."""
    import torch

    name = OPTIM_OF_LOOP.get(loop or "", args.optim)
    if name == "adamw8bit" and torch.cuda.is_available():
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=args.lr, weight_decay=WEIGHT_DECAY)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=WEIGHT_DECAY, fused=name == "adamw-fused")


def load_unsloth(args: argparse.Namespace, path: str, loop: str) -> Any:
    from unsloth import FastLanguageModel

    from app.ml.modeling import UNSLOTH_EXPERT_MODULES, unsloth_checkpointing

    checkpointing = unsloth_checkpointing(True, offload=loop != "unsloth-gpu-gc")
    model, _tok = FastLanguageModel.from_pretrained(
        model_name=path,
        max_seq_length=args.seq,
        load_in_4bit=args.four_bit,
        dtype=None,
        use_gradient_checkpointing=checkpointing,
    )
    # Unsloth maps these MoE names onto the 3-D expert parameters (as the service's apply_lora does).
    return FastLanguageModel.get_peft_model(
        model,
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=0.0,
        target_modules=[*ATTN, *UNSLOTH_EXPERT_MODULES],
        use_gradient_checkpointing=checkpointing,
    )


def load_hf(args: argparse.Namespace, path: str) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # as the service's hf backend on CPU
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    cfg = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=0.0,
        target_modules=ATTN,
        target_parameters=EXPERTS,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


# --- the service's own job ---------------------------------------------------------------------------


def run_service(args: argparse.Namespace, rows_jsonl: Path, work: Path) -> StepClock:
    """`app.ml.trainer.train` with the same batch, length, rank, targets and step count."""
    from app.ml.trainer import TrainConfig, train

    clock = make_clock(args)

    class Hooks(PrintingHooks):
        def on_step(self, metrics: dict[str, Any]) -> None:
            clock.tick()

    cfg = TrainConfig(**service_config(args, rows_jsonl))
    train(cfg, work_dir=work / "job", output_dir=work / "adapter", hooks=Hooks(), models_dir=args.models_dir)
    return clock


def interleaved_loops(args: argparse.Namespace) -> list[str]:
    """The bare loops of this interleaved run, in the order each round steps them."""
    if args.one == "interleaved-gpu-gc":
        return ["unsloth-gpu-gc"]
    loops = args.interleave_with.split(",")
    wrong = [loop for loop in loops if loop not in INTERLEAVABLE]
    if wrong:
        raise SystemExit(f"--interleave-with: {wrong} not among {INTERLEAVABLE}")
    return loops


def run_interleaved(
    args: argparse.Namespace, rows: list[tuple[list[int], list[int]]], rows_jsonl: Path, work: Path, path: str
) -> dict[str, dict[str, Any]]:
    """The service's job with the bare loops stepping from its per-step hook: service step n, then
    step n of each bare loop, then service step n + 1, ... A service step counts from the end of the
    round's last bare step (or the start of training) to the service's hook; a bare step from the
    end of the step before it, each after a device sync."""
    from app.ml.trainer import TrainConfig, train
    from bench.common import cuda_sync

    bare_names = interleaved_loops(args)
    total = args.warmup + args.steps
    steppers = {}
    for loop in bare_names:
        model = load_unsloth(args, path, loop) if _cuda() else load_hf(args, path)
        steppers[loop] = bare_steps(model, args, _batches(rows, args.batch, total), loop)
    step_s: dict[str, list[float]] = {loop: [] for loop in ["service", *bare_names]}
    # unsloth_zoo's MoE counters are process-wide: each loop gets the increase over its own timed steps
    counted: dict[str, dict[str, float]] = {loop: {} for loop in step_s}
    marks: dict[str, Any] = {}

    def count(loop: str, before: dict[str, float]) -> dict[str, float]:
        after = unsloth_counters()
        if len(step_s[loop]) > args.warmup:
            for key, delta in counter_delta(before, after, 1).items():
                counted[loop][key] = counted[loop].get(key, 0.0) + delta
        return after

    def now() -> float:
        cuda_sync()
        return time.perf_counter()

    class Hooks(PrintingHooks):
        def on_start(self, total_steps: int) -> None:
            marks["last"] = now()
            marks["counters"] = unsloth_counters()

        def on_step(self, metrics: dict[str, Any]) -> None:
            if len(step_s["service"]) + 1 == args.warmup:  # probe inside the last warm-up step
                marks["speed"] = host_speed()
            end = now()
            step_s["service"].append(end - marks["last"])
            if len(step_s["service"]) == args.warmup:
                reset_peak()
                marks["host"] = host_mark(marks["speed"])
            counters = count("service", marks["counters"])
            for loop, stepper in steppers.items():
                next(stepper)
                start, end = end, now()
                step_s[loop].append(end - start)
                counters = count(loop, counters)
            marks["last"], marks["counters"] = end, counters
            if len(step_s["service"]) == total and "host" in marks:  # (no warm-up: no host record)
                marks["host"] = host_span(marks["host"], len(step_s) * args.steps)

    service = {**service_config(args, rows_jsonl), "max_steps": total}
    if args.one == "interleaved-gpu-gc":
        service["offload_checkpoints"] = False
    train(
        TrainConfig(**service),
        work_dir=work / "job",
        output_dir=work / "adapter",
        hooks=Hooks(),
        models_dir=args.models_dir,
    )
    tokens_per_step = args.batch * args.seq
    out = {}
    for loop, each in step_s.items():
        timed = each[args.warmup :]
        stats = summarize(timed)
        out[loop] = {
            "steps_timed": len(timed),
            "step_s": stats,
            "step_s_each": timed,
            "tokens_per_step": tokens_per_step,
            "tokens_per_s": tokens_per_step / stats["mean"] if timed else None,
            "unsloth_counters_per_step": counter_delta({}, counted[loop], len(timed)) if timed else None,
            "unsloth_counter_modules": unsloth_counter_modules(),
        }
    out["all"] = {"peak_gib_train_all_models": peak_gib(), "host": marks.get("host")}
    return out


def service_config(args: argparse.Namespace, rows_jsonl: Path) -> dict[str, Any]:
    return {
        "base_model": args.model,
        "dataset": str(rows_jsonl),
        "backend": "unsloth" if _cuda() else "hf",
        "load_in_4bit": args.four_bit,
        "max_seq_length": args.seq,
        "per_device_train_batch_size": args.batch,
        "gradient_accumulation_steps": 1,
        "max_steps": args.warmup + args.steps + args.profile_steps,
        "lora_r": args.rank,
        "lora_alpha": args.alpha,
        "lora_dropout": 0.0,
        "learning_rate": args.lr,
        "weight_decay": WEIGHT_DECAY,
        "max_grad_norm": MAX_GRAD_NORM,
        "optim": "adamw_torch" if args.optim == "adamw8bit" and not _cuda() else SERVICE_OPTIM[args.optim],
        "gradient_checkpointing": True,
        "offload_checkpoints": args.one != "service-gpu-gc",
        "packing": False,
        "shuffle": False,  # the bare loops' batches, in their order
        "save_steps": 100_000,  # no checkpoint inside the timed steps
        "logging_steps": 1,
    }


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


# --- one loop per process ----------------------------------------------------------------------------


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    from app.ml.modeling import resolve_model_path
    from bench.data import fixed_length_rows, render_all, write_jsonl

    n_rows = args.batch * (args.warmup + args.steps + args.profile_steps)
    rows = fixed_length_rows(n_rows, args.seq)
    rendered = render_all(rows)
    lengths = sorted({len(ids) for ids, _ in rendered})
    assert len(lengths) == 1, f"rows must all be {args.seq} tokens, got {lengths}"
    path = resolve_model_path(args.model, args.models_dir)
    reset_peak()
    t0 = time.perf_counter()
    if args.one.startswith("interleaved"):
        work = args.out / "service-work"
        shutil.rmtree(work, ignore_errors=True)
        group = run_interleaved(args, rendered, write_jsonl(rows, work / "rows.jsonl"), work, path)
        return {"loop": args.one, "group": group, "total_s": time.perf_counter() - t0}
    if args.one in ("service", "service-gpu-gc"):
        work = args.out / "service-work"
        shutil.rmtree(work, ignore_errors=True)  # a rerun must train, not resume the last run's checkpoint
        clock = run_service(args, write_jsonl(rows, work / "rows.jsonl"), work)
        load_s = None  # inside train(); the first warm-up step absorbs it
    else:
        model = load_hf(args, path) if args.one == "hf" else load_unsloth(args, path, args.one)
        load_s = time.perf_counter() - t0
        clock = bare_loop(model, args, rendered)
    result = clock.result(args.batch * lengths[0])
    result.update(loop=args.one, load_s=load_s, total_s=time.perf_counter() - t0)
    return result


def drive(args: argparse.Namespace) -> dict[str, Any]:
    """Run each loop in a fresh process, then put the ratios the goals are stated in. A loop named
    twice in ``--loops`` (e.g. ``service,unsloth,service,unsloth``) runs twice, interleaved, so an
    order effect shows; its tokens/s and peak are then the means of its runs."""
    runs: list[dict[str, Any]] = []
    for i, loop in enumerate(args.loops.split(",")):
        out = args.out / f"train_{loop}.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "bench.train_bench", *sys.argv[1:], "--one", loop]
        print(f"== run {i + 1}: {loop}: {' '.join(cmd)}", flush=True)
        rc = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False).returncode
        result = read_json(out) if out.exists() and rc == 0 else {"loop": loop, "error": f"exit {rc}"}
        if "group" in result:  # one record per loop of the group, named <interleaved loop>:<loop>
            group = result["group"]
            shared = group.pop("all", {})
            runs += [{**r, **shared, "loop": f"{loop}:{name}", "run": i + 1} for name, r in group.items()]
        else:
            runs.append({**result, "run": i + 1})
        if out.exists():
            out.rename(args.out / f"train_{i + 1}_{loop}.json")
        profile = args.out / f"profile_{loop}.txt"
        if profile.exists():
            profile.rename(args.out / f"profile_{i + 1}_{loop}.txt")
    results = {
        loop: combine([r for r in runs if r["loop"] == loop])
        for loop in dict.fromkeys(r["loop"] for r in runs)
    }
    summary = {
        **run_header(),
        "config": _config(args),
        "order": args.loops.split(","),
        "runs": [
            {k: r.get(k) for k in ("run", "loop", "tokens_per_s", "peak_gib_process", "host", "error")}
            for r in runs
        ],
        "loops": results,
        "ratios": ratios(results),
    }
    write_json(args.out / "train_bench.json", summary)
    print_table(summary)
    return summary


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One loop's runs -> the first run's record with tokens/s and peaks averaged over the runs that
    finished (``tokens_per_s_runs`` keeps each)."""
    ok = [r for r in runs if "error" not in r and r.get("tokens_per_s")]
    if not ok:
        return runs[0]
    merged = dict(ok[0])
    for key in ("tokens_per_s", "peak_gib_train", "peak_gib_process"):
        values = [float(r[key]) for r in ok if r.get(key)]
        merged[key] = sum(values) / len(values) if values else None
        merged[f"{key}_runs"] = values
    merged["step_s"] = {**ok[0]["step_s"], "mean": sum(r["step_s"]["mean"] for r in ok) / len(ok)}
    merged["step_s_each_runs"] = [r.get("step_s_each") or [] for r in ok]
    return merged


def paired_step_ratio(results: dict[str, Any], fast: str, slow: str) -> float | None:
    """Median over step indices of (fast loop's step time / slow loop's), each step's time averaged
    over that loop's runs: both loops train the same batch at the same index, so this compares like
    with like where the mean over steps mixes in which batches were slow."""
    import statistics

    def per_step(loop: str) -> list[float]:
        runs = [r for r in results.get(loop, {}).get("step_s_each_runs", []) if r]
        n = min((len(r) for r in runs), default=0)
        return [statistics.fmean(r[i] for r in runs) for i in range(n)]

    a, b = per_step(fast), per_step(slow)
    pairs = [x / y for x, y in zip(a, b, strict=False) if y > 0]
    return round(statistics.median(pairs), 4) if pairs else None


def _config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank,
        "alpha": args.alpha,
        "targets": ATTN + EXPERTS,
        "four_bit": args.four_bit,
        "steps": args.steps,
        "warmup": args.warmup,
        "profile_steps": args.profile_steps,
        "optimizer": args.optim,
        "weight_decay": WEIGHT_DECAY,
        "max_grad_norm": MAX_GRAD_NORM,
        "gradient_checkpointing": True,
    }


def ratios(results: dict[str, Any]) -> dict[str, float | None]:
    def get(loop: str, key: str) -> float | None:
        value = results.get(loop, {}).get(key)
        return float(value) if value else None

    def div(a: float | None, b: float | None) -> float | None:
        return round(a / b, 4) if a and b else None

    return {
        "service_over_unsloth_tokens": div(get("service", "tokens_per_s"), get("unsloth", "tokens_per_s")),
        "service_over_unsloth_paired_steps": paired_step_ratio(results, "unsloth", "service"),
        "service_over_unsloth_amp_tokens": div(
            get("service", "tokens_per_s"), get("unsloth-amp", "tokens_per_s")
        ),
        "service_over_hf_tokens": div(get("service", "tokens_per_s"), get("hf", "tokens_per_s")),
        "service_gpu_gc_over_unsloth_gpu_gc_tokens": div(
            get("service-gpu-gc", "tokens_per_s"), get("unsloth-gpu-gc", "tokens_per_s")
        ),
        "service_gpu_gc_over_hf_tokens": div(
            get("service-gpu-gc", "tokens_per_s"), get("hf", "tokens_per_s")
        ),
        "service_gpu_gc_over_hf_peak": div(
            get("service-gpu-gc", "peak_gib_process"), get("hf", "peak_gib_process")
        ),
        "service_over_hf_peak": div(get("service", "peak_gib_process"), get("hf", "peak_gib_process")),
        "unsloth_over_hf_tokens": div(get("unsloth", "tokens_per_s"), get("hf", "tokens_per_s")),
        **interleaved_ratios(results),
    }


def interleaved_ratios(results: dict[str, Any]) -> dict[str, float | None]:
    """For each interleaved group: the service over each bare loop that stepped beside it (mean
    tokens/s and paired by step), and the group's service over the separate hf run."""
    out: dict[str, float | None] = {}
    for name in results:
        group, _, loop = name.partition(":")
        if not loop or loop == "service":
            continue
        service = f"{group}:service"
        s_tok, b_tok = results.get(service, {}).get("tokens_per_s"), results[name].get("tokens_per_s")
        key = f"{group}_service_over_{loop}".replace("-", "_")
        out[f"{key}_tokens"] = round(s_tok / b_tok, 4) if s_tok and b_tok else None
        out[f"{key}_paired_steps"] = paired_step_ratio(results, name, service)
    for name in results:
        group, _, loop = name.partition(":")
        hf = results.get("hf", {}).get("tokens_per_s")
        s_tok = results[name].get("tokens_per_s")
        if loop == "service" and hf and s_tok:
            out[f"{group}_service_over_hf_tokens".replace("-", "_")] = round(s_tok / hf, 4)
    return out


def print_table(summary: dict[str, Any]) -> None:
    print(f"{'run':<5}{'loop':<20}{'tokens/s':>11}{'peak GiB (all)':>16}")
    for r in summary["runs"]:
        if r.get("error"):
            print(f"{r['run']:<5}{r['loop']:<20} {r['error']}")
            continue
        peak = r.get("peak_gib_process") or 0
        print(f"{r['run']:<5}{r['loop']:<20}{r['tokens_per_s']:>11.1f}{peak:>16.2f}")
    print(
        f"{'mean':<5}{'loop':<20}{'tokens/s':>11}{'step s':>9}{'peak GiB (train)':>18}{'peak GiB (all)':>16}"
    )
    for loop, r in summary["loops"].items():
        if "error" in r:
            print(f"{'':<5}{loop:<20} {r['error']}")
            continue
        print(
            f"{'':<5}{loop:<20}{r['tokens_per_s']:>11.1f}{r['step_s']['mean']:>9.3f}"
            f"{r['peak_gib_train'] or 0:>18.2f}{r['peak_gib_process'] or 0:>16.2f}"
        )
    print("ratios:", summary["ratios"])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one:
        result = {**run_header(), "config": _config(args), **run_one(args)}
        write_json(args.out / f"train_{args.one}.json", result)
        return
    drive(args)


if __name__ == "__main__":
    main()
