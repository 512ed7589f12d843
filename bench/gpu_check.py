"""One command that checks a GPU in at most 8 minutes: the smoke comparison in each precision, GPT-2 Large steps
through the core's training loop against the memory planner, eager vs compiled steps, runs sharing the GPU, and
the full profile's projected training time.

    python -m bench.gpu_check                                  # on a GPU; or: make gpu-check
    python -m bench.gpu_check --out $OUT/GPU.md --csv $OUT/gpu_check.csv   # on a lent machine: keep the report
    python -m bench.gpu_check --parts b,d,f                    # only some parts (a re-run with little time left)
    python -m bench.gpu_check --device cpu --quick             # the same parts on a CPU, tiny GPT-2, 1-2 min (CI)

Parts, each in its own process (a crash, a sticky CUDA error or a part stopped at the budget's end cannot spoil the
next), each writing one table, its notes and a status line as it goes:

  (a) the smoke profile's comparison (``experiment.run_comparison``) at each precision: bf16 (where native) and
      fp16 (the T4 path) on a GPU, fp32 and bf16 on a CPU. Per method: accuracy, eval loss, skipped steps, time.
  (b) ``--steps`` optimiser steps per method of the ``full`` profile on GPT-2 Large built from its config with
      random weights (no download), batch 16 x 128 random tokens, through ``core.loop.train_loop`` itself: the
      memory planner's plan and estimate beside the measured peak, the step time, TFLOP/s and fraction of peak.
  (c) ours vs peft step time: removed, answered on an H200 (``bench/GPU.md``); ``python -m bench.step_time
      --device cuda`` measures it.
  (d) full fine-tuning and LoRA eager, then with ``peft_utils.compilation.compile_blocks``, at 16 x 128 and at
      SST-2's own length-bucketed batches: step time, warm-up (compile) time, and per step the kernels launched
      and the host syncs (``torch.profiler``; on a CPU aten ops and host reads), TFLOP/s at 16 x 128.
  (e) 1, 2, 4 and 8 LoRA runs at once on the GPU (processes started together): steps/s per run and in all.
  (f) the ``full`` profile's runs and steps (``experiment.plan_experiment``) x the seconds per step measured in
      (d), else (b): the training time ``make run`` would take here, per method and in all.

One time budget (``--budget-s``, default 480), shared out between the parts (``PARTS``): no case of a part
(a method, a shape, a number of runs) starts with less than ``--method-reserve-s`` of its share left, and a part
still running when the whole budget is spent is stopped.
Exit status 0: every part ran and passed its checks. Data: ``--data-dir``, else ``$PEFT_LAB_DATA``,
``../shared/data`` or ``shared/data``.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import math
import multiprocessing
import os
import queue
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):  # `python bench/gpu_check.py` works as well as `python -m bench.gpu_check`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if TYPE_CHECKING:
    from peft_utils.memory_plan import MemoryPlan

REPO = Path(__file__).resolve().parents[1]
CSV_FIELDS = ("part", "case", "method", "key", "value")
STEP_METHODS = ("full", "lora", "dora", "qlora", "qdora")  # every method the full profile runs
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
WARMUP, PROFILED, PAD_MULTIPLE = 2, 2, 8  # (d): untimed steps (twice that compiled), profiled steps, widths
PARTIAL = 3  # a part's exit status when the budget made it skip some of its cases
EXIT_STATUS = {0: "ok", 1: "FAILED", PARTIAL: "partial"}
COMPUTE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
MIXED = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


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

    def add(self, row: dict[str, Any], case: str | None = None) -> None:
        """One row of the table in the report, and each of its values as a CSV row (under ``case``, if given)."""
        if self.columns is None:
            self.columns = list(row)
            self.report.write("\n| " + " | ".join(self.columns) + " |\n|" + "---|" * len(self.columns))
        self.report.write("| " + " | ".join(cell(key, row.get(key)) for key in self.columns) + " |")
        self.report.rows(self.part, case or self.case, str(row.get("method", "")), row)

    def failed(self, method: str, error: Exception) -> None:
        """One method failed: the report says so at the end, the others still run."""
        traceback.print_exc()
        self.problems.append(f"{method}: {last_line(error)}" if method else last_line(error))
        self.report.rows(self.part, self.case, method, {"error": last_line(error)})

    def each(self, args: argparse.Namespace, cases: Iterable, measure: Callable[[Any], None]) -> None:
        """``measure(case)`` for each case that starts in time (see :func:`_past`; the others are listed as skipped);
        one case's failure is reported, and the next still runs."""
        from accelerate.utils import release_memory

        for case in cases:
            if _past(args):
                self.skipped.append(f"({self.part}) {case}")
                continue
            try:
                measure(case)
            except Exception as error:  # noqa: BLE001 - one case's failure must not lose the others
                self.failed(str(case), error)
                release_memory()

    def status(self) -> str:
        if self.problems:
            line = "Status: **FAILED** — " + "; ".join(self.problems)
        elif self.skipped:
            line = "Status: **partial** — not run, its share of the time budget was spent: " + ", ".join(self.skipped)
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
    """The GPU, its memory and clocks, and the dense peak (b) and (d) compare with; read without making a CUDA
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


def _precision(args: argparse.Namespace) -> str:
    """The autocast the measured steps use: bf16 where the lab allows it (a CPU, or a GPU that ``auto`` gives
    bf16), else fp16 (a T4)."""
    import torch

    from peft_utils.devices import compute_dtype_for

    return "fp16" if compute_dtype_for(_device(args)) == torch.float16 else "bf16"


def _size(args: argparse.Namespace) -> str:
    return "tiny" if args.quick else "large"


def _past(args: argparse.Namespace) -> bool:
    """Whether the part's deadline is within ``--method-reserve-s``: too late to start another case."""
    return time.time() > args.deadline - args.method_reserve_s


def _sst2_dir(args: argparse.Namespace) -> Path:
    """The data folder holding ``sst2/``, or a one-line error saying how to give one."""
    if args.data_dir is None or not (args.data_dir / "sst2").is_dir():
        raise FileNotFoundError(f"no SST-2 data ({args.data_dir or 'no data folder found'}): pass --data-dir (the "
                                "folder holding sst2/ and gpt2-tokenizer/) or set PEFT_LAB_DATA")
    return args.data_dir


# --------------------------------------------------------------------------------------------- (a) smoke comparison


def part_smoke(args: argparse.Namespace, section: Section) -> None:
    """The smoke profile's comparison through the project's own API, at one precision (``section.case``)."""
    from peft_utils.config import make_config
    from peft_utils.experiment import run_comparison

    precision, overrides = section.case, QUICK_SMOKE if args.quick else {}
    section.note(f"`make_config('smoke', device={args.device!r}, precision={precision!r}"
                 + "".join(f", {k}={v!r}" for k, v in overrides.items()) + ", sweep=False)` then `run_comparison`")
    table = run_comparison(make_config("smoke", device=args.device, precision=precision, sweep=False,
                                       data_dir=str(_sst2_dir(args)), **overrides,
                                       results_dir=str(args.workdir / f"smoke-{precision}")))
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


def _plan(args: argparse.Namespace, method: str, folder: Path) -> MemoryPlan:
    """The lab's plan for the free GPU memory, as a run gets it; on a CPU (never re-planned) the configured batch."""
    import torch
    from transformers import AutoConfig

    from peft_utils.devices import compute_dtype_for
    from peft_utils.memory_plan import MemoryPlan, estimate_memory, plan_memory

    profile, device = _full_profile(args), _device(args)
    precision = _precision(args)
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


def random_rows(count: int, length: int) -> list[dict]:
    """Rows of random tokens (no pad / EOS id, so every row is classified from its last token)."""
    import torch

    ids = torch.randint(1000, 50000, (count, length), generator=torch.Generator().manual_seed(0)).tolist()
    return [{"input_ids": row, "label": i % 2} for i, row in enumerate(ids)]


def sst2_rows(args: argparse.Namespace, folder: Path) -> list[dict]:
    """3,200 SST-2 train rows (a seeded sample) encoded with the model's GPT-2 tokenizer as a run encodes them:
    bucketed as a run buckets them, their batches have a run's widths. With ``--quick`` and no data: random rows
    of 8-18 tokens (SST-2's mean is about 13)."""
    import torch

    from peft_utils.core.batches import encode
    from peft_utils.data import load_sst2
    from peft_utils.models import load_tokenizer

    if args.quick and args.data_dir is None:
        lengths = torch.randint(8, 19, (3200,), generator=torch.Generator().manual_seed(0)).tolist()
        return [dict(row, input_ids=row["input_ids"][:n]) for row, n in zip(random_rows(3200, 18), lengths)]
    train = load_sst2(_sst2_dir(args))["train"].sample(3200, random_state=0)
    return encode(train["sentence"].tolist(), train["label"].tolist(), load_tokenizer(folder),
                  _full_profile(args).train.max_length)


def prepared(args: argparse.Namespace, method: str, folder: Path, total_steps: int,
             checkpointing: bool = False) -> tuple:
    """``(model, optimizer, scheduler, accelerator)`` of ``method`` as a run prepares them: ``build_model``,
    checkpointing if planned, AdamW, the schedule, autocast and loss scaling."""
    from peft_utils.core.loop import enable_gradient_checkpointing, prepare_for_training, set_seed
    from peft_utils.devices import compute_dtype_for, make_accelerator, resolve_device
    from peft_utils.models import build_model

    profile, accelerator = _full_profile(args), make_accelerator(args.device, _precision(args))
    device, train = resolve_device(accelerator.device), profile.train
    set_seed(0)
    model, _ = build_model(method, folder, profile.adapter, compute_dtype_for(device, _precision(args)))
    if next(model.parameters()).device != device:  # a 4-bit model is placed by its loader
        model.to(device)
    if checkpointing:
        enable_gradient_checkpointing(model)
    return (*prepare_for_training(model, accelerator, lr=profile.lr[method], weight_decay=train.weight_decay,
                                  warmup_ratio=train.warmup_ratio, total_steps=total_steps), accelerator)


def loop_steps(args: argparse.Namespace, trained: tuple, rows: list, accumulation: int = 1,
               pad_to_multiple: int | None = None, **loader: Any) -> Iterator:
    """``core.loop.train_loop`` over ``rows`` in the profile's global batches (``loader``: ``make_loader``'s
    options), each cut into ``accumulation`` micro-batches: one ``StepMetrics`` per ``next``. No evaluation
    loader: the steps stop before the epoch's end, where the loop would evaluate."""
    from peft_utils.core.batches import StepBatches, make_loader
    from peft_utils.core.loop import train_loop

    model, optimizer, scheduler, accelerator = trained
    train, pad = _full_profile(args).train, model.config.pad_token_id
    batches = StepBatches(make_loader(rows, train.batch_size, pad, seed=0, padded=False, **loader), 1, accumulation,
                          0, pad, pad_to_multiple=pad_to_multiple)
    return train_loop(model, batches, None, optimizer, scheduler, accelerator, max_grad_norm=train.max_grad_norm)


def step_flops(args: argparse.Namespace, method: str) -> int:
    """FLOPs of a batch-size x max-length step: (6 full, 4 PEFT: no weight gradients) x N non-embedding
    parameters x tokens (attention scores left out)."""
    from bench.step_time import Spec, non_embedding_parameters

    train = _full_profile(args).train
    n_params = non_embedding_parameters(Spec(_size(args), train.batch_size, train.max_length))
    return (6 if method == "full" else 4) * n_params * train.batch_size * train.max_length


def core_steps(args: argparse.Namespace, method: str, folder: Path, plan: MemoryPlan) -> dict[str, Any]:
    """``args.steps`` optimiser steps of ``method`` through the core's loop as a run trains, with the plan's
    accumulation and checkpointing: step times, losses and memory."""
    import torch

    from bench.step_time import allocation_profile, resident_bytes, timed

    train, device = _full_profile(args).train, _device(args)
    cuda = device.type == "cuda"
    trained = prepared(args, method, folder, args.steps, plan.gradient_checkpointing)
    model, optimizer, accelerator = trained[0], trained[1], trained[3]
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device) if cuda else resident_bytes(model)
    events = loop_steps(args, trained, random_rows((args.steps + 1) * train.batch_size, train.max_length),
                        plan.grad_accum_steps, shuffle=False)
    steps = [timed(lambda: next(events), device) for _ in range(args.steps)]  # each yields one StepMetrics
    peak = (torch.cuda.max_memory_allocated(device) if cuda
            else resident_bytes(model, optimizer) + allocation_profile(lambda: next(events), "cpu"))
    losses = torch.stack([metrics.loss for metrics, _ in steps]).tolist()  # left on the device by the loop
    measured = {"start_bytes": start, "peak_bytes": peak,
                "reserved_peak_bytes": torch.cuda.max_memory_reserved(device) if cuda else None,
                "seconds": [seconds for _, seconds in steps], "losses": losses,
                "skipped": sum(metrics.skipped for metrics, _ in steps)}
    events.close()
    del model, optimizer, trained, events, steps
    accelerator.free_memory()  # its references to the model and optimiser, then the memory itself
    return measured


def part_steps(args: argparse.Namespace, section: Section) -> None:
    """(b): per method, the plan for the free memory, then ``args.steps`` steps of the core's loop."""
    from bench.step_time import saved_gpt2

    profile, folder = _full_profile(args), saved_gpt2(_size(args), args.workdir)
    train, adapter = profile.train, profile.adapter
    section.note(f"GPT-2 {_size(args)} (random weights), batch {train.batch_size} x {train.max_length} random "
                 f"tokens, {_precision(args)} autocast, rank {adapter.rank}, alpha {adapter.alpha:g}, dropout "
                 f"{adapter.dropout:g}, default targets, lr {profile.lr}, clipping {train.max_grad_norm}; "
                 f"{args.steps} steps, the first {min(3, args.steps - 1)} untimed. TFLOP/s = (6 full, 4 PEFT) x N x "
                 "tokens per step, N the non-embedding parameters. Estimate: the lab's plan for the free memory (on "
                 "a CPU: the configured batch's); peak: CUDA's allocator peak over the steps, or on a CPU the "
                 "resident tensors + the allocator's peak during one more, profiled step.")

    def measure(method: str) -> None:
        plan = _plan(args, method, folder)
        print(f"(b) {method}: {plan.reason}", flush=True)
        _steps_row(args, section, method, plan, core_steps(args, method, folder, plan))

    section.each(args, STEP_METHODS, measure)


def _steps_row(args: argparse.Namespace, section: Section, method: str, plan: MemoryPlan, measured: dict) -> None:
    """A measured method's row beside its plan, then its checks (finite losses, the peak within the budget)."""
    from bench.step_time import quartiles

    seconds, train = measured["seconds"], _full_profile(args).train
    q1, median, q3 = quartiles(seconds[min(3, len(seconds) - 1):])
    section.add({"method": method, "plan": f"{plan.per_device_batch} x {plan.grad_accum_steps}"
                 + (", checkpointing" if plan.gradient_checkpointing else ""), "estimate_bytes": plan.estimate.total,
                 "start_bytes": measured["start_bytes"], "peak_bytes": measured["peak_bytes"],
                 "peak_over_estimate": measured["peak_bytes"] / plan.estimate.total,
                 "reserved_peak_bytes": measured["reserved_peak_bytes"], "step_ms": 1e3 * median,
                 "step_ms_q1": 1e3 * q1, "step_ms_q3": 1e3 * q3, "first_step_ms": 1e3 * seconds[0],
                 "tokens_per_s": train.batch_size * train.max_length / median,
                 **rate(args, step_flops(args, method), median), "loss_first": measured["losses"][0],
                 "loss_last": measured["losses"][-1], "skipped": measured["skipped"]})
    if not all(math.isfinite(loss) for loss in measured["losses"]):
        section.problems.append(f"{method}: non-finite training loss")
    if plan.budget_bytes and measured["peak_bytes"] > plan.budget_bytes:
        section.warnings.append(f"{method}: measured peak {cell('_bytes', measured['peak_bytes'])} is over the "
                                f"planner's budget {cell('_bytes', plan.budget_bytes)}")


def rate(args: argparse.Namespace, flops: int, seconds: float) -> dict[str, float | None]:
    """Achieved TFLOP/s and its fraction of the GPU's dense peak (``None`` where the peak is unknown)."""
    tflops = flops / seconds / 1e12
    return {"tflops": tflops, "peak_fraction": tflops / args.peak[0] if args.peak[0] else None}


# --------------------------------------------------------------------------------------------- (d) compiled


def per_step_counts(step: Callable[[], Any], steps: int, cuda: bool) -> dict[str, float]:
    """What one step dispatches, from ``torch.profiler`` over ``steps`` steps: aten ops, host reads of a tensor
    (``aten::_local_scalar_dense``, behind ``.item()`` and ``.tolist()``) and, on a GPU, kernels run, kernel (or
    CUDA graph) launches, stream / device synchronisations and device-to-host copies."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            step()
    names = Counter((event.name(), event.device_type().name) for event in prof.profiler.kineto_results.events())

    def count(test: Callable[[str], bool], device: str = "CPU") -> float:
        return sum(n for (name, kind), n in names.items() if kind == device and test(name)) / steps

    counts = {"aten_ops": count(lambda name: name.startswith("aten::")),
              "host_reads": count(lambda name: name == "aten::_local_scalar_dense")}
    if cuda:
        counts |= {"kernels": count(lambda name: not name.startswith(("Memcpy", "Memset")), "CUDA"),
                   "launches": count(lambda name: "LaunchKernel" in name or name == "cudaGraphLaunch"),
                   "syncs": count(lambda name: name in ("cudaStreamSynchronize", "cudaDeviceSynchronize")),
                   "dtoh_copies": count(lambda name: "DtoH" in name, "CUDA")}
    return counts


def part_compiled(args: argparse.Namespace, section: Section) -> None:
    """(d): full fine-tuning and LoRA through the core's loop, eager then with ``compile_blocks``, at batch x
    max-length random tokens and at SST-2's own batches: step time, and what a step launches and reads back."""
    from bench.step_time import saved_gpt2

    train, folder, steps = _full_profile(args).train, saved_gpt2(_size(args), args.workdir), max(2, args.steps // 2)
    fixed = f"{train.batch_size}x{train.max_length}"
    shapes = {"sst2": sst2_rows(args, folder),  # 200 batches: enough for the warm-up, timed and profiled steps
              fixed: random_rows((2 * WARMUP + steps + PROFILED + 1) * train.batch_size, train.max_length)}
    backend = "eager" if args.quick else "inductor"  # --quick: the graphs captured and run as they are
    section.note(f"GPT-2 {_size(args)} (random weights), {_precision(args)} autocast, the full profile's settings, "
                 f"{steps} timed steps after {WARMUP} (eager) or {2 * WARMUP} (compiled) untimed; shapes: {fixed} "
                 f"random tokens, and `sst2`: {train.batch_size}-row length-bucketed batches of SST-2 train "
                 f"sentences (GPT-2 tokens). Compiled: `compile_blocks(model, backend={backend!r})`, widths padded "
                 f"to a multiple of {PAD_MULTIPLE}. Per step, from `torch.profiler` over {PROFILED} steps: aten "
                 "ops, host reads (`aten::_local_scalar_dense`), on a GPU kernels, launches, syncs and D2H copies. "
                 f"TFLOP/s at {fixed} only, as in (b). compiles_timed: graphs compiled during the timed steps (0 once "
                 "warm; more, and the step time includes compiling).")
    try:
        from peft_utils.compilation import compile_blocks
    except ImportError as error:
        compile_blocks = None
        section.note(f"Compiled timing unavailable: `{last_line(error)}`; eager only.")
    modes = {"eager": None, **({"compiled": lambda model: compile_blocks(model, backend=backend)}
                               if compile_blocks else {})}
    section.each(args, ("lora", "full"), lambda method: _compiled_method(args, section, method, folder, shapes,
                                                                         steps, modes))


def _compiled_method(args: argparse.Namespace, section: Section, method: str, folder: Path, shapes: dict,
                     steps: int, modes: dict[str, Callable | None]) -> None:
    """One method on each shape, eager, then compiled in place; a case past the part's deadline is skipped."""
    from torch._dynamo.utils import counters

    from bench.step_time import quartiles, timed

    device, trained, eager = _device(args), prepared(args, method, folder, 10_000), {}
    for mode, compile_model in modes.items():
        if compile_model:
            compile_model(trained[3].unwrap_model(trained[0]))
        for shape, rows in shapes.items():
            if _past(args):
                section.skipped.append(f"(d) {method} {mode} {shape}")
                continue
            events = loop_steps(args, trained, rows, 1, PAD_MULTIPLE if compile_model else None, shuffle=True,
                                bucket_by_length=shape == "sst2")  # padded widths: a bounded number of compiles
            started = time.perf_counter()
            for _ in range(WARMUP * (2 if compile_model else 1)):
                timed(lambda: next(events), device)
            warmup_s, graphs = time.perf_counter() - started, counters["stats"]["unique_graphs"]
            q1, median, q3 = quartiles([timed(lambda: next(events), device)[1] for _ in range(steps)])
            counts = per_step_counts(lambda: next(events), PROFILED, device.type == "cuda")
            events.close()
            if not compile_model:
                eager[shape] = median
            row = {"method": method, "mode": mode, "shape": shape, "step_ms": 1e3 * median, "step_ms_q1": 1e3 * q1,
                   "step_ms_q3": 1e3 * q3, "speedup_over_eager": eager[shape] / median if shape in eager else None,
                   "warmup_s": warmup_s, "compiles_timed": counters["stats"]["unique_graphs"] - graphs,
                   "tflops": None, "peak_fraction": None}
            if shape != "sst2":  # no padding: every token computed counts
                row |= rate(args, step_flops(args, method), median)
            section.add(row | counts, case=f"{mode}/{shape}")
            if row["compiles_timed"]:
                section.warnings.append(f"{method} {mode} {shape}: {row['compiles_timed']} graphs compiled while timed")
    trained[3].free_memory()


# --------------------------------------------------------------------------------------------- (e) runs at once


def concurrent_run(args: argparse.Namespace, folder: Path, runs: int, barrier, results) -> None:
    """One of ``runs`` runs sharing the device (a process of its own): LoRA on SST-2's batches, warmed up, then
    ``args.steps`` steps timed from the moment every run is ready; puts ``(start, end)`` on ``results``."""
    import torch

    from peft_utils.core.loop import synchronize

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // runs))
    device, trained = _device(args), prepared(args, "lora", folder, 10_000)
    events = loop_steps(args, trained, sst2_rows(args, folder), shuffle=True, bucket_by_length=True)
    for _ in range(WARMUP):
        next(events)
    synchronize(device)
    barrier.wait(timeout=max(1.0, args.end - time.time()))
    start = time.time()
    for _ in range(args.steps):
        if time.time() > args.end:
            return  # the budget is spent: no result
        next(events)
    synchronize(device)
    results.put((start, time.time()))


def part_concurrent(args: argparse.Namespace, section: Section) -> None:
    """(e): 1, 2, 4 and 8 runs started together on one device (1 and 2 with ``--quick``): steps/s per run and in
    all, and the speed-up over one run."""
    from bench.step_time import saved_gpt2

    folder, context, alone = saved_gpt2(_size(args), args.workdir), multiprocessing.get_context("spawn"), []
    section.note(f"N processes, each LoRA on GPT-2 {_size(args)} (random weights) with the full profile's settings "
                 f"on {_full_profile(args).train.batch_size}-row length-bucketed SST-2 batches: {WARMUP} untimed "
                 f"steps, then {args.steps} steps timed from a common start (a barrier). Per run: its own steps/s "
                 "(mean over runs); in all: N x steps over the time from the start to the last run's end.")

    def measure(runs: int) -> None:
        barrier, results = context.Barrier(runs), context.Queue()
        children = [context.Process(target=concurrent_run, args=(args, folder, runs, barrier, results))
                    for _ in range(runs)]
        for child in children:
            child.start()
        spans: list[tuple[float, float]] = []
        try:
            while len(spans) < runs:
                with contextlib.suppress(queue.Empty):
                    spans.append(results.get(timeout=1))
                if len(spans) < runs and (time.time() > args.end or any(c.exitcode for c in children)):
                    raise RuntimeError(f"not every run finished (exit statuses {[c.exitcode for c in children]})")
        finally:
            for child in children:
                child.join(5)
                child.kill()
        in_all = runs * args.steps / (max(end for _, end in spans) - min(start for start, _ in spans))
        alone.append(alone[0] if alone else in_all)
        section.add({"method": "lora", "runs": runs,
                     "steps_per_s_per_run": statistics.mean(args.steps / (end - start) for start, end in spans),
                     "steps_per_s_in_all": in_all, "speedup_over_1": in_all / alone[0]}, case=f"{runs} runs")

    section.each(args, (1, 2) if args.quick else (1, 2, 4, 8), measure)


# --------------------------------------------------------------------------------------------- (f) projection


def measured_step_seconds(table: Path) -> dict[str, dict[str, tuple[float, str]]]:
    """Per method, ``{mode: (seconds per step, where measured)}`` from the CSV so far: (d)'s SST-2 batches where it
    measured the method, else (b)'s eager steps."""
    with table.open(newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["key"] == "step_ms" and r["value"]]
    seconds: dict[str, dict[str, tuple[float, str]]] = {}
    for row in rows:
        mode, _, shape = row["case"].partition("/")
        if row["part"] == "d" and shape == "sst2":
            seconds.setdefault(row["method"], {})[mode] = (float(row["value"]) / 1e3, f"(d) {mode} sst2")
    for row in rows:
        if row["part"] == "b":
            seconds.setdefault(row["method"], {}).setdefault("eager", (float(row["value"]) / 1e3, "(b) eager"))
    return seconds


def best_speedup(table: Path) -> tuple[float, str]:
    """(e)'s best aggregate speed-up over one run and the runs at once that gave it; ``(1.0, "1")`` without (e)."""
    with table.open(newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["part"] == "e" and r["key"] == "speedup_over_1" and r["value"]]
    best = max(rows, key=lambda r: float(r["value"]), default=None)
    return (float(best["value"]), best["case"]) if best else (1.0, "1 run")


def part_projection(args: argparse.Namespace, section: Section) -> None:
    """(f): the ``full`` profile's plan (``experiment.plan_experiment``: its runs and their train rows) times each
    method's measured seconds per step: the training time ``make run`` would take on this device."""
    from peft_utils.config import make_config
    from peft_utils.experiment import plan_experiment, planned_steps
    from peft_utils.store import SWEEP_GROUP, TUNE_GROUP

    config = make_config("full", model="random-gpt2-tiny", device=args.device, data_dir=str(_sst2_dir(args)),
                         results_dir=str(args.workdir / "plan"))  # the model changes no run's rows or steps
    plan, seconds = plan_experiment(config), measured_step_seconds(args.csv)
    train, totals, steps, runs = config.train, Counter(), Counter(), Counter()
    minutes_in_group: Counter = Counter()  # compiled where measured, else eager
    for run in plan.runs:
        runs[run.spec.method] += 1
        run_steps = planned_steps(plan, run)
        steps[run.spec.method] += run_steps
        measured = seconds.get(run.spec.method, {})
        step_s = (measured.get("compiled") or measured.get("eager") or (0.0, ""))[0]
        minutes_in_group[run.spec.group] += run_steps * step_s / 60
    groups = ", ".join(sorted({run.spec.group for run in plan.runs}))
    section.note(f"`plan_experiment(make_config('full'))`: {len(plan.runs)} runs ({groups}), batch "
                 f"{train.batch_size}, {train.epochs} epoch(s); steps x the method's measured seconds per step "
                 "(training only: model loading and evaluation left out)"
                 + ("; GPT-2 tiny's steps (--quick): no projection for GPT-2 Large." if args.quick else "."))
    for method in runs:
        row = {"method": method, "runs": runs[method], "steps": steps[method]}
        for mode in ("eager", "compiled"):
            step_s, where = seconds.get(method, {}).get(mode, (None, "not measured"))
            row |= {f"{mode}_s_per_step": step_s, f"{mode}_from": where,
                    f"{mode}_minutes": steps[method] * step_s / 60 if step_s else None}
        totals["eager"] += row["eager_minutes"] or 0
        totals["compiled"] += row["compiled_minutes"] or row["eager_minutes"] or 0
        section.add(row, case="projection")
    speedup, runs_at_once = best_speedup(args.csv)
    shared = minutes_in_group[TUNE_GROUP] + minutes_in_group[SWEEP_GROUP]
    totals["at_once"] = sum(minutes_in_group.values()) - shared + shared / speedup
    section.note(f"Total: **{totals['eager']:,.1f} min** eager; **{totals['compiled']:,.1f} min** with compiled "
                 f"steps where (d) measured them (eager for the other methods); **{totals['at_once']:,.1f} min** "
                 f"with the tuning and grid runs ({shared:,.1f} of those minutes) {runs_at_once} at once, at (e)'s "
                 f"best speed-up {speedup:.2f}x (`--workers`, `--sweep-workers`). A method not measured counts 0.")
    section.report.rows("f", "total", "", {f"{mode}_minutes": totals[mode] for mode in totals})


# --------------------------------------------------------------------------------------------- driver

# Each part and its share of the time budget, in seconds of the default 480 (part (a) once per precision): a part
# gets its share of what is left when it starts, so the time an earlier part did not use goes to the later ones.
PARTS: dict[str, tuple[Callable[[argparse.Namespace, Section], None], float]] = {
    "a": (part_smoke, 35), "b": (part_steps, 70), "d": (part_compiled, 170), "e": (part_concurrent, 130),
    "f": (part_projection, 40)}


def jobs(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """``(part, case, title)`` of each process to run: part (a) once per precision."""
    size = _size(args)
    titles = {"b": f"(b) {args.steps} optimiser steps per method through the core's loop, GPT-2 {size}: planner "
                   "vs measured",
              "d": f"(d) eager vs compiled steps, GPT-2 {size}, fixed and SST-2 shapes: launches and host syncs",
              "e": f"(e) runs at once on one device, LoRA on GPT-2 {size}: aggregate throughput",
              "f": "(f) the full profile's projected training time on this device"}
    cuda = args.device.startswith("cuda")
    precisions = (["bf16", "fp16"] if _precision(args) == "bf16" else ["fp16"]) if cuda else ["fp32", "bf16"]
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
        PARTS[part][0](args, section)
    except Exception as error:  # noqa: BLE001 - the report says what failed; the next part still runs
        section.failed("", error)
    section.note(f"{section.status()} ({time.perf_counter() - started:.0f} s)")
    section.report.rows(part, case, "", {"status": section.status().split("**")[1],
                                         "seconds": round(time.perf_counter() - started, 1)})
    sys.exit(1 if section.problems else PARTIAL if section.skipped else 0)


def run_job(args: argparse.Namespace, report: Report, part: str, case: str, share: float) -> str:
    """Run one part in a child process until it ends or the budget's end; its status ("ok", "FAILED", ...). It
    starts no case after its ``share`` of the time left (its deadline), so the parts after it get theirs."""
    remaining = args.end - time.time()
    if remaining <= 0:
        status, why = "skipped", f"the time budget ({args.budget_s:g} s) was spent"
    else:
        own = argparse.Namespace(**{**vars(args), "deadline": time.time() + remaining * share})
        child = multiprocessing.get_context("spawn").Process(target=run_part, args=(own, part, case))
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
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated from {','.join(PARTS)}")
    parser.add_argument("--steps", type=int, help="optimiser steps per method in (b) and per run in (e), half that "
                        "in (d) (default 30; 3 with --quick)")
    parser.add_argument("--data-dir", type=Path, help="folder with sst2/ and gpt2-tokenizer/ (see above)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 with --quick)")
    parser.add_argument("--method-reserve-s", type=float,
                        help="start no case of a part with less of its share left (default 30 s on a GPU, 0 on CPU)")
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    args.out = (args.out or REPO / "bench" / ("GPU-cpu.md" if cpu else "GPU.md")).resolve()
    args.csv = (args.csv or REPO / "bench" / ("gpu_check-cpu.csv" if cpu else "gpu_check.csv")).resolve()
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := [p for p in args.parts if p not in PARTS]:
        parser.error(f"unknown part(s) {unknown}; choose from {','.join(PARTS)}")
    args.steps = args.steps or (3 if args.quick else 30)
    if not 2 <= args.steps <= 150:  # (d) and (e) step through 200 batches of SST-2 rows, warm-up included
        parser.error("--steps must be between 2 and 150")
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
    args.end = started + args.budget_s
    signal.signal(signal.SIGTERM, _terminated)
    report = Report(args.out, args.csv)
    report.start(header(args, "python -m bench.gpu_check " + shlex.join(argv)))
    statuses = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
        args.workdir = Path(workdir)
        todo = jobs(args)
        for index, (part, case, title) in enumerate(todo):
            report.write(f"\n## {title}\n")
            share = PARTS[part][1] / sum(PARTS[later][1] for later, _, _ in todo[index:])
            statuses.append((title.split(")")[0] + ")", run_job(args, report, part, case, share)))
    summary = "; ".join(f"{title} {status}" for title, status in statuses)
    report.write(f"\n---\nFinished in {time.time() - started:.0f} s of a {args.budget_s:g} s budget: {summary}. "
                 f"CSV: {args.csv.name}.")
    return 0 if all(status == "ok" for _, status in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
