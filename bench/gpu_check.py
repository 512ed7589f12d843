"""One command that checks a GPU in at most 8 minutes: the smoke comparison in each precision, GPT-2 Large steps
through the core's training loop against the memory planner, and ours vs peft step time.

    python -m bench.gpu_check                                  # on a GPU; or: make gpu-check
    python -m bench.gpu_check --out $OUT/GPU.md --csv $OUT/gpu_check.csv   # on a lent machine: keep the report
    python -m bench.gpu_check --parts b                        # only some parts (a re-run with little time left)
    python -m bench.gpu_check --device cpu --quick             # the same parts on a CPU, tiny GPT-2, about 1 min (CI)

Parts, each in its own process (a crash, a sticky CUDA error or a part stopped at the deadline cannot spoil the
next), each writing one table, its notes and a status line as it goes:

  (a) the smoke profile's comparison (``experiment.run_comparison``) at each precision: bf16 and fp16 (the T4 path)
      on a GPU; fp32, bf16 and fp16 on a CPU. A precision the device must refuse (fp16 on a CPU, bf16 on a GPU
      without native bf16) passes when it is refused. Per method: accuracy, eval loss, skipped steps, time, memory.
  (b) ``--steps`` optimiser steps per method (full, lora, dora, qlora) of the ``full`` profile on GPT-2 Large built
      from its config with random weights (no download), batch 16 x 128 random tokens, through
      ``core.loop.train_loop`` itself: the memory planner's plan and estimate beside the measured peak, the step
      time, and the achieved TFLOP/s as a fraction of the GPU's dense peak.
  (c) ours vs peft step time for LoRA, DoRA and QLoRA (``bench.step_time``'s benchmark, batch 16 x 64); its own CSV
      beside ``--csv`` (``<csv stem>-step_time.csv``).

One time budget (``--budget-s``, default 480): no part starts once it is spent, no method of (b) or (c) with less
than ``--method-reserve-s`` left, and a part running at the deadline is stopped. Exit status 0: every part ran and
passed its checks. Data: ``--data-dir``, else ``$PEFT_LAB_DATA``, ``../shared/data`` or ``shared/data``.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import math
import multiprocessing
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):  # `python bench/gpu_check.py` works as well as `python -m bench.gpu_check`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if TYPE_CHECKING:
    from peft_utils.memory_plan import MemoryPlan

REPO = Path(__file__).resolve().parents[1]
CSV_FIELDS = ("part", "case", "method", "key", "value")
STEP_METHODS = ("full", "lora", "dora", "qlora")
# Dense (no sparsity) peak TFLOP/s by GPU name, first match wins: bf16, except the T4 (fp16; it has no bf16).
PEAK_TFLOPS: tuple[tuple[str, float, str], ...] = (
    (r"H100.*PCIe", 756.0, "bf16"),
    (r"H100|H200", 989.0, "bf16"),  # the SXM parts; NVL variants are lower
    (r"A100", 312.0, "bf16"),
    (r"\bL4\b", 121.0, "bf16"),
    (r"A10G", 125.0, "bf16"),
    (r"\bT4\b", 65.0, "fp16"),
)
QUICK_SMOKE = {"train_size": 16, "eval_size": 16, "max_length": 24}  # 2 steps per method, as tests/test_experiment
QUICK_BATCH = {"batch_size": 4, "max_length": 32}  # bf16 is emulated on most CPUs: 16 x 128 took 0.6 s a step
PARTIAL = 3  # a part's exit status when the budget made it skip some of its methods
EXIT_STATUS = {0: "ok", 1: "FAILED", PARTIAL: "partial"}
COMPUTE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
MIXED = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
STEP_TIME_KEYS = ("step_ms", "q1_ms", "q3_ms", "ours_over_peft", "ratio_q1", "ratio_q3", "tokens_per_s", "peak_mib",
                  "step_alloc_mib", "tflops", "peak_fraction")  # (c)'s columns of a bench.step_time row


def peak_tflops(gpu_name: str) -> tuple[float | None, str]:
    """The GPU's dense peak TFLOP/s and its dtype, from :data:`PEAK_TFLOPS`; ``(None, "unknown")`` otherwise."""
    for pattern, value, dtype in PEAK_TFLOPS:
        if re.search(pattern, gpu_name):
            return value, dtype
    return None, "unknown"


# --------------------------------------------------------------------------------------------- the report


class Report:
    """Appends Markdown to the report and tidy ``part,case,method,key,value`` rows to the CSV, each flushed at once
    (a crash or a kill later still leaves everything written so far), and echoes the Markdown to stdout."""

    def __init__(self, markdown: Path, table: Path) -> None:
        self.markdown, self.table = markdown, table

    def start(self, header: str) -> None:
        for path in (self.markdown, self.table):
            path.parent.mkdir(parents=True, exist_ok=True)
        self.markdown.write_text("", encoding="utf-8")
        with self.table.open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerow(CSV_FIELDS)
        self.write(header)

    def write(self, text: str) -> None:
        with self.markdown.open("a", encoding="utf-8") as handle:
            handle.write(text if text.endswith("\n") else text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        print(text.rstrip("\n"), flush=True)

    def rows(self, part: str, case: str, method: str, values: dict[str, Any]) -> None:
        with self.table.open("a", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows((part, case, method, key, "" if value is None else value)
                                         for key, value in values.items())


def cell(key: str, value: Any) -> str:
    """A Markdown cell: bytes in GiB/MiB, large numbers with separators, a dash for a missing value."""
    from peft_utils.formatting import format_bytes

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if key.endswith("_bytes"):
        return format_bytes(value, binary=True, decimals=1)
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def last_line(error: BaseException) -> str:
    """A traceback's last line: ``ExceptionType: message`` on one line."""
    return " ".join(traceback.format_exception_only(type(error), error)[-1].split())


@dataclass
class Section:
    """One part's section: one table (its header written before its first row), notes and checks."""

    report: Report
    part: str
    case: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    columns: list[str] | None = None

    def note(self, text: str) -> None:
        self.report.write("\n" + text)

    def add(self, row: dict[str, Any]) -> None:
        """One row of the table in the report, and each of its values as a CSV row."""
        if self.columns is None:
            self.columns = list(row)
            self.report.write("\n| " + " | ".join(self.columns) + " |\n|" + "---|" * len(self.columns))
        self.report.write("| " + " | ".join(cell(key, row.get(key)) for key in self.columns) + " |")
        self.report.rows(self.part, self.case, str(row.get("method", "")), row)

    def failed(self, method: str, error: Exception) -> None:
        """One method failed: the report says so at the end, the others still run."""
        traceback.print_exc()
        self.problems.append(f"{method}: {last_line(error)}" if method else last_line(error))
        self.report.rows(self.part, self.case, method, {"error": last_line(error)})

    def status(self) -> str:
        if self.problems:
            line = "Status: **FAILED** — " + "; ".join(self.problems)
        elif self.skipped:
            line = "Status: **partial** — not run, the time budget was spent: " + ", ".join(self.skipped)
        else:
            line = "Status: **ok**"
        return line + (" (warnings: " + "; ".join(self.warnings) + ")" if self.warnings else "")


# --------------------------------------------------------------------------------------------- the machine


def _quiet_command(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _gpu_lines(args: argparse.Namespace) -> list[str]:
    """The GPU, its memory and clocks, and the dense peak (b) and (c) compare with; read without making a CUDA
    context, which would hold GPU memory for the whole check."""
    import torch

    from peft_utils.formatting import format_bytes

    index = torch.device(args.device).index or 0
    properties, (peak, dtype) = torch.cuda.get_device_properties(index), args.peak
    smi = _quiet_command(["nvidia-smi", f"--id={index}", "--query-gpu=memory.free,memory.used,driver_version,"
                          "power.limit,clocks.max.sm", "--format=csv,noheader"])
    return [f"- GPU: **{properties.name}**, compute capability {properties.major}.{properties.minor}, "
            f"{properties.multi_processor_count} SMs, {torch.cuda.device_count()} visible",
            f"- GPU memory: {format_bytes(properties.total_memory, binary=True, decimals=1)} total",
            *([f"- nvidia-smi (free, used, driver, power limit, max SM clock): {smi.splitlines()[0]}"] if smi else []),
            f"- dense peak: {f'{peak:g} TFLOP/s ({dtype})' if peak else 'unknown for this GPU'}"]


def header(args: argparse.Namespace, command: str) -> str:
    """The report's opening: when, what, on which machine, with which versions."""
    import psutil
    import torch

    from peft_utils.devices import cpu_has_native_bf16, hardware_name
    from peft_utils.formatting import format_bytes
    from peft_utils.train import installed_versions

    lines = [f"# GPU check — {args.device}{' (quick)' if args.quick else ''}", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
             f"- command: `{command}`"]
    commit = _quiet_command(["git", "rev-parse", "--short", "HEAD"])
    if commit:
        dirty = _quiet_command(["git", "status", "--porcelain", "--untracked-files=no"])
        lines.append(f"- code: commit {commit}{' with uncommitted changes' if dirty else ''}")
    if args.device.startswith("cuda"):
        lines += _gpu_lines(args)
    lines.append(f"- CPU: {hardware_name(torch.device('cpu'))}, {os.cpu_count()} logical CPUs, native bf16: "
                 f"{'yes' if cpu_has_native_bf16() else 'no'}; host memory "
                 f"{format_bytes(psutil.virtual_memory().total, binary=True, decimals=1)}")
    versions = ", ".join(f"{name} {version or 'not installed'}" for name, version in installed_versions().items())
    lines.append(f"- versions: {versions}, CUDA (torch build) {torch.version.cuda or 'none'}, "
                 f"cuDNN {torch.backends.cudnn.version() or 'none'}")
    lines.append(f"- data: {args.data_dir or 'not found'}; time budget {args.budget_s:g} s")
    return "\n".join(lines) + "\n"


def _device(args: argparse.Namespace):
    from peft_utils.devices import resolve_device

    return resolve_device(args.device)  # "cuda" with its index, as the lab names the device


def _native_bf16(args: argparse.Namespace) -> bool:
    """Whether bf16 runs here as the lab allows it: on a CPU (autocast), or on a GPU that ``auto`` gives bf16."""
    import torch

    from peft_utils.devices import compute_dtype_for

    return compute_dtype_for(_device(args)) != torch.float16


def _past(args: argparse.Namespace) -> bool:
    """Whether the deadline is within ``--method-reserve-s``: too late to start another method."""
    return time.time() > args.deadline - args.method_reserve_s


# --------------------------------------------------------------------------------------------- (a) smoke comparison


def _refused_here(args: argparse.Namespace, precision: str) -> bool:
    """fp16 on a CPU and bf16 on a GPU without native bf16 must be refused before anything trains."""
    cpu = not args.device.startswith("cuda")
    return (precision == "fp16" and cpu) or (precision == "bf16" and not cpu and not _native_bf16(args))


def part_smoke(args: argparse.Namespace, section: Section) -> None:
    """The smoke profile's comparison through the project's own API, at one precision (``section.case``)."""
    from peft_utils.config import make_config
    from peft_utils.experiment import run_comparison

    precision, overrides = section.case, QUICK_SMOKE if args.quick else {}
    if args.data_dir is None or not (args.data_dir / "sst2").is_dir():
        raise FileNotFoundError(f"no SST-2 data ({args.data_dir or 'no data folder found'}): pass --data-dir (the "
                                "folder holding sst2/ and gpt2-tokenizer/) or set PEFT_LAB_DATA")
    section.note(f"`make_config('smoke', device={args.device!r}, precision={precision!r}"
                 + "".join(f", {k}={v!r}" for k, v in overrides.items()) + ", sweep=False)` then `run_comparison`")
    try:
        table = run_comparison(make_config("smoke", device=args.device, precision=precision, sweep=False,
                                           data_dir=str(args.data_dir), **overrides,
                                           results_dir=str(args.workdir / f"smoke-{precision}")))
    except ValueError as error:
        if not _refused_here(args, precision):
            raise
        section.note(f"{precision} on this device: refused, as expected — `{last_line(error)}`")
        section.report.rows("a", precision, "", {"outcome": "refused (expected)", "message": last_line(error)})
        return
    if _refused_here(args, precision):
        section.problems.append(f"{precision} was not refused on this device")
    for record in table.to_dict("records"):
        _smoke_row(section, precision, record)


def _smoke_row(section: Section, precision: str, record: dict) -> None:
    """One method's run: its row, then its checks (a finite loss, the precision asked for)."""
    keys = ("method", "compute_dtype", "mixed_precision", "final_accuracy", "final_eval_loss", "steps",
            "skipped_steps", "train_time_s", "tokens_per_s", "peak_memory_bytes", "memory_kind")
    row = {key: record.get(key) for key in keys}
    section.add(row)
    method = row["method"]
    if not math.isfinite(float(row["final_eval_loss"])):
        section.problems.append(f"{method}: final eval loss {row['final_eval_loss']}")
    if row["compute_dtype"] != COMPUTE[precision]:
        section.problems.append(f"{method}: computed in {row['compute_dtype']}, not {COMPUTE[precision]}")
    if row["mixed_precision"] != MIXED[precision]:
        section.problems.append(f"{method}: accelerate's mixed_precision {row['mixed_precision']!r}, "
                                f"not {MIXED[precision]!r}")
    if row["steps"] and row["skipped_steps"] == row["steps"]:
        section.warnings.append(f"{method}: loss scaling skipped every step")


# --------------------------------------------------------------------------------------------- (b) the core's steps


def _full_profile(args: argparse.Namespace):
    """The ``full`` profile (GPT-2 Large on a GPU); ``--quick`` shrinks its batch to 4 x 32."""
    from peft_utils.config import PROFILES

    profile = PROFILES["full"]
    return replace(profile, train=replace(profile.train, **QUICK_BATCH)) if args.quick else profile


def _plan(args: argparse.Namespace, method: str, folder: Path, precision: str) -> MemoryPlan:
    """The lab's plan for the free GPU memory, as a run gets it; on a CPU (never re-planned) the configured batch."""
    import torch
    from transformers import AutoConfig

    from peft_utils.devices import compute_dtype_for
    from peft_utils.memory_plan import MemoryPlan, estimate_memory, plan_memory

    profile, device = _full_profile(args), _device(args)
    train, dtype = replace(profile.train, precision=precision), compute_dtype_for(device, precision)
    model_config = AutoConfig.from_pretrained(folder, num_labels=2)
    if device.type == "cuda":
        plan = plan_memory(model_config, method, train, profile.adapter, compute_dtype=dtype,
                           device_bytes=int(torch.cuda.mem_get_info(device)[0]), name=folder.name)
        if not plan.fits:
            raise ValueError(plan.reason)
        return plan
    estimate = estimate_memory(model_config, method, train.batch_size, train.max_length, dtype,
                               rank=profile.adapter.rank, targets=profile.adapter.targets, device_type=device.type)
    return MemoryPlan(train.batch_size, 1, False, estimate, 0, 0, True, "as configured (a CPU run)")


def _step_batches(batch: int, length: int, steps: int, accumulation: int, pad: int):
    """``steps`` global batches of random tokens (no pad / EOS id, so every row is classified from its last token),
    cut into the plan's micro-batches as a run's are."""
    import torch

    from peft_utils.core.batches import StepBatches, make_loader

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 50000, (steps * batch, length), generator=generator).tolist()
    rows = [{"input_ids": row, "label": i % 2} for i, row in enumerate(ids)]
    return StepBatches(make_loader(rows, batch, pad, shuffle=False, seed=0, padded=False), 1, accumulation, 0, pad)


def core_steps(args: argparse.Namespace, method: str, folder: Path, plan: MemoryPlan,
               precision: str) -> dict[str, Any]:
    """``args.steps`` optimiser steps of ``method`` through ``core.loop.train_loop`` as a run trains: ``build_model``,
    the plan's accumulation and checkpointing, AdamW, schedule, clipping, autocast and loss scaling."""
    import torch

    from bench.step_time import allocation_profile, resident_bytes, timed
    from peft_utils.core.loop import enable_gradient_checkpointing, prepare_for_training, set_seed, train_loop
    from peft_utils.devices import accelerator_device, compute_dtype_for, make_accelerator
    from peft_utils.models import build_model

    profile, accelerator = _full_profile(args), make_accelerator(args.device, precision)
    train, device = profile.train, accelerator_device(accelerator)
    set_seed(0)
    model, _ = build_model(method, folder, profile.adapter, compute_dtype_for(device, precision))
    if next(model.parameters()).device != device:  # a 4-bit model is placed by its loader
        model.to(device)
    if plan.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    batches = _step_batches(train.batch_size, train.max_length, args.steps + 1, plan.grad_accum_steps,
                            model.config.pad_token_id)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device) if cuda else resident_bytes(model)
    model, optimizer, scheduler = prepare_for_training(model, accelerator, lr=profile.lr[method],
                                                       weight_decay=train.weight_decay,
                                                       warmup_ratio=train.warmup_ratio, total_steps=args.steps)
    # No evaluation loader: the steps stop before the epoch's end, where the loop would evaluate.
    events = train_loop(model, batches, None, optimizer, scheduler, accelerator, max_grad_norm=train.max_grad_norm)
    steps = [timed(lambda: next(events), device) for _ in range(args.steps)]  # each yields one StepMetrics
    peak = (torch.cuda.max_memory_allocated(device) if cuda
            else resident_bytes(model, optimizer) + allocation_profile(lambda: next(events), "cpu"))
    measured = {"start_bytes": start, "peak_bytes": peak,
                "reserved_peak_bytes": torch.cuda.max_memory_reserved(device) if cuda else None,
                "seconds": [seconds for _, seconds in steps], "losses": [metrics.loss for metrics, _ in steps],
                "skipped": sum(metrics.skipped for metrics, _ in steps)}
    events.close()
    del model, optimizer, scheduler, events, steps
    accelerator.free_memory()  # its references to the model and optimiser, then the memory itself
    return measured


def part_steps(args: argparse.Namespace, section: Section) -> None:
    """(b): per method, the plan for the free memory, then ``args.steps`` steps of the core's loop."""
    from accelerate.utils import release_memory

    from bench.step_time import Spec, non_embedding_parameters, saved_gpt2

    profile, size = _full_profile(args), "tiny" if args.quick else "large"
    train, adapter = profile.train, profile.adapter
    precision = "bf16" if _native_bf16(args) else "fp16"  # bf16 autocast on a CPU too; fp16 on a T4
    tokens = train.batch_size * train.max_length
    n_params = non_embedding_parameters(Spec(size, train.batch_size, train.max_length))
    folder = saved_gpt2(size, args.workdir)
    section.note(f"GPT-2 {size} (random weights), batch {train.batch_size} x {train.max_length} random tokens, "
                 f"{precision} autocast, rank {adapter.rank}, alpha {adapter.alpha:g}, dropout {adapter.dropout:g}, "
                 f"default targets, lr {profile.lr}, clipping {train.max_grad_norm}; {args.steps} steps, the "
                 f"first {min(3, args.steps - 1)} untimed. TFLOP/s = (6 full, 4 PEFT) x N x tokens per step, "
                 f"N = {n_params:,} non-embedding parameters. Estimate: the lab's plan for the free memory (on a "
                 "CPU: the configured batch's); peak: CUDA's allocator peak over the steps, or on a CPU the "
                 "resident tensors + the allocator's peak during one more, profiled step.")
    for method in STEP_METHODS:
        if _past(args):
            section.skipped.append(f"(b) {method}")
            continue
        try:
            plan = _plan(args, method, folder, precision)
            print(f"(b) {method}: {plan.reason}", flush=True)
            measured = core_steps(args, method, folder, plan, precision)
            _steps_row(args, section, method, plan, measured, tokens,
                       (6 if method == "full" else 4) * n_params * tokens)
        except Exception as error:  # noqa: BLE001 - one method's failure must not lose the others
            section.failed(method, error)
            release_memory()


def _steps_row(args: argparse.Namespace, section: Section, method: str, plan: MemoryPlan, measured: dict,
               tokens: int, flops: int) -> None:
    """A measured method's row beside its plan, then its checks (finite losses, the peak within the budget)."""
    from bench.step_time import quartiles

    seconds, peak = measured["seconds"], args.peak[0]
    q1, median, q3 = quartiles(seconds[min(3, len(seconds) - 1):])
    tflops = flops / median / 1e12
    section.add({"method": method, "plan": f"{plan.per_device_batch} x {plan.grad_accum_steps}"
                 + (", checkpointing" if plan.gradient_checkpointing else ""), "estimate_bytes": plan.estimate.total,
                 "start_bytes": measured["start_bytes"], "peak_bytes": measured["peak_bytes"],
                 "peak_over_estimate": measured["peak_bytes"] / plan.estimate.total,
                 "reserved_peak_bytes": measured["reserved_peak_bytes"], "step_ms": 1e3 * median,
                 "step_ms_q1": 1e3 * q1, "step_ms_q3": 1e3 * q3, "first_step_ms": 1e3 * seconds[0],
                 "tokens_per_s": tokens / median, "tflops": tflops, "peak_fraction": tflops / peak if peak else None,
                 "loss_first": measured["losses"][0], "loss_last": measured["losses"][-1],
                 "skipped": measured["skipped"]})
    if not all(math.isfinite(loss) for loss in measured["losses"]):
        section.problems.append(f"{method}: non-finite training loss")
    if plan.budget_bytes and measured["peak_bytes"] > plan.budget_bytes:
        section.warnings.append(f"{method}: measured peak {cell('_bytes', measured['peak_bytes'])} is over the "
                                f"planner's budget {cell('_bytes', plan.budget_bytes)}")


# --------------------------------------------------------------------------------------------- (c) ours vs peft


def step_time_csv(args: argparse.Namespace) -> Path:
    return args.csv.with_name(args.csv.stem + "-step_time.csv")


def part_step_time(args: argparse.Namespace, section: Section) -> None:
    """(c): ``bench.step_time``'s interleaved ours/peft benchmark, one method at a time (the budget is checked
    between them), its CSV rewritten after each."""
    from bench import step_time as st

    size, (batch, seq) = "tiny" if args.quick else "large", (2, 32) if args.quick else (16, 64)
    steps, warmup = (3, 1) if args.quick else (args.bench_steps, 3)
    dtype = "bf16" if _native_bf16(args) else "fp32"
    spec = st.Spec(size, batch, seq, device=args.device, dtype=dtype)
    section.note(f"`bench.step_time.benchmark` on GPT-2 {size} (random weights), batch {batch} x {seq}, {dtype} "
                 f"autocast, r 8, every linear layer, {steps} timed steps after {warmup} warm-up, ours and peft "
                 f"interleaved step by step; ours/peft = median of the per-round ratios (IQR). CSV: "
                 f"{step_time_csv(args).name}.")
    rows: list = []
    for method in ("lora", "dora", "qlora"):
        if _past(args):
            section.skipped.append(f"(c) {method}")
            continue
        try:
            new = st.benchmark(spec, [method], steps, warmup, args.peak[0], args.workdir)
        except Exception as error:  # noqa: BLE001 - one method's failure must not lose the others
            section.failed(method, error)
            continue
        rows += new
        st.write_csv(rows, step_time_csv(args), st.environment(args.device) | {"command": "bench.gpu_check (c)"})
        for row in new:
            section.add({"method": f"{row['method']}/{row['impl']}"} | {key: row[key] for key in STEP_TIME_KEYS})


# --------------------------------------------------------------------------------------------- driver

PARTS = {"a": part_smoke, "b": part_steps, "c": part_step_time}


def jobs(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """``(part, case, title)`` of each process to run: part (a) once per precision."""
    titles = {"b": f"(b) {args.steps} optimiser steps per method through the core's loop, GPT-2 "
                   f"{'tiny' if args.quick else 'large'}: planner vs measured",
              "c": "(c) step time, ours vs peft (LoRA, DoRA, QLoRA)"}
    precisions = ["bf16", "fp16"] if args.device.startswith("cuda") else ["fp32", "bf16", "fp16"]
    smoke = [("a", p, f"(a) smoke comparison, {p}") for p in precisions] if "a" in args.parts else []
    return smoke + [(part, part, titles[part]) for part in args.parts if part != "a"]


def run_part(args: argparse.Namespace, part: str, case: str) -> None:
    """A part in its own process: its section closed with its status; the exit status says how it went."""
    import warnings

    warnings.filterwarnings("ignore", message=".*compute on a CPU.*")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    section, started = Section(Report(args.out, args.csv), part, case), time.perf_counter()
    try:
        PARTS[part](args, section)
    except Exception as error:  # noqa: BLE001 - the report says what failed; the next part still runs
        section.failed("", error)
    section.note(f"{section.status()} ({time.perf_counter() - started:.0f} s)")
    section.report.rows(part, case, "", {"status": section.status().split("**")[1],
                                         "seconds": round(time.perf_counter() - started, 1)})
    sys.exit(1 if section.problems else PARTIAL if section.skipped else 0)


def run_job(args: argparse.Namespace, report: Report, part: str, case: str) -> str:
    """Run one part in a child process until it ends or the deadline; its status ("ok", "FAILED", ...)."""
    remaining = args.deadline - time.time()
    if remaining <= 0:
        status, why = "skipped", f"the time budget ({args.budget_s:g} s) was spent"
    else:
        child = multiprocessing.get_context("spawn").Process(target=run_part, args=(args, part, case))
        started, late = time.time(), True
        child.start()
        try:
            child.join(remaining)
            late = child.is_alive()
        except SystemExit:  # see _terminated
            report.write(f"\nStatus: **stopped** — the check was terminated {time.time() - started:.0f} s into this "
                         "part (a signal from outside: a caller's time limit?)")
            raise
        finally:  # the deadline, or this process is being terminated: the child goes too
            if child.is_alive():
                child.terminate()
                child.join(15)
            if child.is_alive():
                child.kill()
        status = "stopped" if late else EXIT_STATUS.get(child.exitcode, "died")
        why = (f"the time budget ran out {time.time() - started:.0f} s into this part; what it wrote is kept"
               if late else f"its process died (exit status {child.exitcode})")
    if status in ("skipped", "stopped", "died"):
        report.write(f"\nStatus: **{status}** — {why}")
        report.rows(part, case, "", {"status": status})
    return status


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cuda", help="cuda[:i] (default) or cpu")
    parser.add_argument("--quick", action="store_true",
                        help="tiny GPT-2, a few steps, small smoke sizes, 1 thread: about a minute on a CPU (CI)")
    parser.add_argument("--out", type=Path, help="Markdown report (default bench/GPU.md; bench/GPU-cpu.md on a CPU)")
    parser.add_argument("--csv", type=Path,
                        help="CSV of every measurement (default bench/gpu_check.csv; bench/gpu_check-cpu.csv on a CPU)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="time budget for all parts (default 480)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated from a,b,c (default all)")
    parser.add_argument("--steps", type=int, help="optimiser steps per method in (b) (default 30; 3 with --quick)")
    parser.add_argument("--bench-steps", type=int, default=20, help="timed steps per side in (c) (default 20)")
    parser.add_argument("--data-dir", type=Path, help="folder with sst2/ and gpt2-tokenizer/ (see above)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 with --quick)")
    parser.add_argument("--method-reserve-s", type=float,
                        help="do not start a method of (b)/(c) with less time left (default 30 s on a GPU, 0 on CPU)")
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    args.out = (args.out or REPO / "bench" / ("GPU-cpu.md" if cpu else "GPU.md")).resolve()
    args.csv = (args.csv or REPO / "bench" / ("gpu_check-cpu.csv" if cpu else "gpu_check.csv")).resolve()
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := [p for p in args.parts if p not in PARTS]:
        parser.error(f"unknown part(s) {unknown}; choose from {','.join(PARTS)}")
    args.steps = args.steps or (3 if args.quick else 30)
    if args.steps < 2:
        parser.error("--steps must be at least 2")
    args.threads = args.threads or (1 if args.quick else None)
    args.method_reserve_s = (0.0 if cpu else 30.0) if args.method_reserve_s is None else args.method_reserve_s
    args.data_dir = args.data_dir.resolve() if args.data_dir else _data_dir()
    return args


def _data_dir() -> Path | None:
    """The first of ``$PEFT_LAB_DATA``, ``../shared/data``, ``shared/data`` that holds ``sst2/`` (None when none
    does: the parts that need data say so)."""
    candidates = [Path(os.environ["PEFT_LAB_DATA"])] if os.environ.get("PEFT_LAB_DATA") else []
    candidates += [REPO.parent / "shared" / "data", REPO / "shared" / "data"]
    return next((c.resolve() for c in candidates if (c / "sst2").is_dir()), None)


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)  # a caller's time limit: the running part's process is stopped on the way out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.data_dir:
        os.environ["PEFT_LAB_DATA"] = str(args.data_dir)  # the parts' processes find the tokenizer there
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("--device cuda but torch sees no CUDA device; use --device cpu --quick for the CPU check",
              file=sys.stderr)
        return 2
    args.peak = peak_tflops(torch.cuda.get_device_properties(torch.device(args.device).index or 0).name) if cuda \
        else (None, "n/a")
    started = time.time()
    args.deadline = started + args.budget_s
    signal.signal(signal.SIGTERM, _terminated)
    report = Report(args.out, args.csv)
    report.start(header(args, "python -m bench.gpu_check " + shlex.join(argv)))
    statuses = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
        args.workdir = Path(workdir)
        for part, case, title in jobs(args):
            report.write(f"\n## {title}\n")
            statuses.append((title.split(")")[0] + ")", run_job(args, report, part, case)))
    summary = "; ".join(f"{title} {status}" for title, status in statuses)
    report.write(f"\n---\nFinished in {time.time() - started:.0f} s of a {args.budget_s:g} s budget: {summary}. "
                 f"CSV: {args.csv.name}" + (f", {step_time_csv(args).name}" if "c" in args.parts else "") + ".")
    return 0 if all(status == "ok" for _, status in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
