"""One command that checks a GPU in at most 8 minutes: the smoke comparison in bf16 and fp16, GPT-2 Large steps
against the memory planner, ours vs peft step time, and full fine-tuning's fraction of the GPU's peak.

    python -m bench.gpu_check                                  # on a GPU; or: make gpu-check
    python -m bench.gpu_check --out $OUT/GPU.md --csv $OUT/gpu_check.csv   # on a lent machine: keep the report
    python -m bench.gpu_check --parts b,d                      # only some parts (a re-run with little time left)
    python -m bench.gpu_check --device cpu --quick             # the same parts on a CPU, tiny GPT-2, 1-1.5 min (CI)

Parts (each in its own Python process, so that a crash, a sticky CUDA error or accelerate's one-precision-per-process
state cannot spoil the next part; each appends its Markdown section and CSV rows as it goes):

  (a) the smoke profile's comparison (``peft_utils.experiment.run_comparison``) under bf16, then under fp16 (the T4
      path, forced on a newer GPU): per method, final accuracy, final eval loss, skipped steps, train time, peak memory.
      On a CPU: fp32 (the CPU default), then bf16, and fp16's refusal recorded as the expected outcome.
  (b) 30 optimiser steps per method (full, lora, dora, qlora) at the ``full`` profile's settings on GPT-2 Large built
      from its config with random weights (no download): batch 16 x 128 random tokens, bf16 autocast, the core's
      AdamW / schedule / clipping through accelerate. Per method: the memory planner's estimate and plan (for the free
      GPU memory) beside the measured ``torch.cuda.max_memory_allocated``, and the step time.
  (c) ours vs peft step time for LoRA, DoRA and QLoRA on GPT-2 Large in bf16 (``bench/step_time.py``'s benchmark,
      batch 16 x 64 as in its GPU mode); its own CSV beside ``--csv`` (``<csv stem>-step_time.csv``).
  (d) full fine-tuning's tokens/s (from (b), else measured here) and its fraction of the GPU's dense peak
      (6·N·tokens FLOPs per step, N = non-embedding parameters, as bench/step_time.py counts).

A global budget (``--budget-s``, default 480) is shared by the parts: a part is not started once it is spent (but (d)
still runs when it is arithmetic on (b)'s rows), (b) and (c) start no further method with less than
``--method-reserve-s`` left, and a part still running when it runs out is stopped (the report says which). The exit
status is 0 when every part ran and passed its checks, 1 otherwise.

The report (``--out``) and CSV (``--csv``) default to bench/GPU.md and bench/gpu_check.csv, and to bench/GPU-cpu.md
and bench/gpu_check-cpu.csv with ``--device cpu`` (a CPU check never overwrites a GPU report); each run starts them
afresh. On a lent machine whose files come back only from one folder, point both there.

The data folder (``sst2/`` and ``gpt2-tokenizer/``) is ``--data-dir``, else the first of ``$PEFT_LAB_DATA``,
``../shared/data`` and ``shared/data`` (beside the code) that exists: 5.5 MB, it can travel with a working tree as an
untracked ``shared/data`` inside the repository. On a GPU without native bf16 (T4, V100) (a)'s bf16 refusal is the
expected outcome, and (b) runs in fp16 with loss scaling.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import importlib.metadata
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/gpu_check.py` works as well as `python -m bench.gpu_check`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
PARTS = ("a", "b", "c", "d")
VERSIONED = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
CSV_FIELDS = ("part", "case", "method", "key", "value")
# Dense (no sparsity) peak TFLOP/s by GPU name, first match wins: bf16, except the T4 (fp16; it has no bf16).
PEAK_TFLOPS: tuple[tuple[str, float, str], ...] = (
    (r"H100.*PCIe", 756.0, "bf16"),
    (r"H100|H200", 989.0, "bf16"),  # the SXM parts; NVL variants are lower
    (r"A100", 312.0, "bf16"),
    (r"\bL4\b", 121.0, "bf16"),
    (r"A10G", 125.0, "bf16"),
    (r"\bT4\b", 65.0, "fp16"),
)
QUICK_BATCH = {"batch_size": 4, "max_length": 32}
PARTIAL = 3  # a child's exit status when the budget made it skip some of its methods
QUICK_SMOKE = {"train_size": 16, "eval_size": 16, "max_length": 24}  # 2 steps per method, as tests/test_experiment


def peak_tflops(gpu_name: str) -> tuple[float | None, str]:
    """The GPU's dense peak TFLOP/s and its dtype, from :data:`PEAK_TFLOPS`; ``(None, "unknown")`` otherwise."""
    for pattern, value, dtype in PEAK_TFLOPS:
        if re.search(pattern, gpu_name):
            return value, dtype
    return None, "unknown"


# --------------------------------------------------------------------------------------------- the report


class Report:
    """Appends Markdown to the report and tidy ``part,case,method,key,value`` rows to the CSV, flushed at once (a
    crash or a kill later still leaves everything written so far), and echoes the Markdown to stdout."""

    def __init__(self, markdown: Path, table: Path, echo: bool = True) -> None:
        self.markdown, self.table, self.echo = markdown, table, echo

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
        if self.echo:
            print(text.rstrip("\n"), flush=True)

    def rows(self, part: str, case: str, method: str, values: dict) -> None:
        with self.table.open("a", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            for key, value in values.items():
                writer.writerow((part, case, method, key, "" if value is None else value))
            handle.flush()

    def read_rows(self) -> list[dict[str, str]]:
        with self.table.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))


@dataclass
class Section:
    """One part's section: its table, notes and checks; ``status()`` is the line that closes it."""

    report: Report
    part: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def table(self, columns: list[str]) -> None:
        self.report.write("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))

    def row(self, cells: list) -> None:
        self.report.write("| " + " | ".join(str(c) for c in cells) + " |")

    def note(self, text: str) -> None:
        self.report.write("\n" + text)

    def status(self) -> str:
        if self.problems:
            line = "Status: **FAILED** — " + "; ".join(self.problems)
        elif self.skipped:
            line = "Status: **partial** — not run, the time budget was spent: " + ", ".join(self.skipped)
        else:
            line = "Status: **ok**"
        if self.warnings:
            line += " (warnings: " + "; ".join(self.warnings) + ")"
        return line


def last_line(error: BaseException) -> str:
    """A traceback's last line: ``ExceptionType: message`` on one line."""
    return " ".join(traceback.format_exception_only(type(error), error)[-1].split())


# --------------------------------------------------------------------------------------------- the machine


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_bf16_flags() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    found = [flag for flag in ("avx512_bf16", "amx_bf16") if flag in flags]
    return ", ".join(found) if found else "neither avx512_bf16 nor amx_bf16"


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB"


def _quiet_command(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def header(args: argparse.Namespace, command: str) -> str:
    """The report's opening: when, what, on which machine, with which versions."""
    import torch

    lines = [f"# GPU check — {args.device}{' (quick)' if args.quick else ''}", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
             f"- command: `{command}`"]
    commit = _quiet_command(["git", "rev-parse", "--short", "HEAD"])
    if commit:
        dirty = _quiet_command(["git", "status", "--porcelain", "--untracked-files=no"])
        lines.append(f"- code: commit {commit}{' with uncommitted changes' if dirty else ''}")
    if args.device.startswith("cuda"):
        # No CUDA context here (no allocation, no mem_get_info): it would hold GPU memory for the whole check.
        index = torch.device(args.device).index or 0
        properties = torch.cuda.get_device_properties(index)
        lines.append(f"- GPU: **{properties.name}**, compute capability {properties.major}.{properties.minor}, "
                     f"{properties.multi_processor_count} SMs, {torch.cuda.device_count()} visible")
        lines.append(f"- GPU memory: {_gib(properties.total_memory)} total")
        smi = _quiet_command(["nvidia-smi", f"--id={index}", "--query-gpu=memory.free,memory.used,driver_version,"
                              "power.limit,clocks.max.sm", "--format=csv,noheader"])
        if smi:
            lines.append(f"- nvidia-smi (free, used, driver, power limit, max SM clock): {smi.splitlines()[0]}")
        peak, dtype = peak_tflops(properties.name)
        lines.append(f"- dense peak used in (d): {f'{peak:g} TFLOP/s ({dtype})' if peak else 'unknown for this GPU'}")
    lines.append(f"- CPU: {cpu_model()}, {os.cpu_count()} logical CPUs, bf16 flags: {cpu_bf16_flags()}")
    try:
        import psutil

        lines.append(f"- host memory: {_gib(psutil.virtual_memory().total)}")
    except ImportError:
        pass
    versions = ", ".join(f"{name} {version(name)}" for name in VERSIONED)
    lines.append(f"- versions: Python {platform.python_version()}, {versions}, CUDA (torch build) "
                 f"{torch.version.cuda or 'none'}, cuDNN {torch.backends.cudnn.version() or 'none'}")
    lines.append(f"- data: {args.data_dir or 'not found'}; time budget {args.budget_s:g} s")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- helpers for parts


def _device(args: argparse.Namespace):
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _native_bf16(device) -> bool:
    import torch

    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)


def _bytes(n_bytes: float | None) -> str:
    from peft_utils.formatting import format_bytes

    return "—" if n_bytes is None else format_bytes(n_bytes, binary=True, decimals=1)


def _gpt2_size(args: argparse.Namespace) -> str:
    return "tiny" if args.quick else "large"


def _model_folder(args: argparse.Namespace) -> Path:
    """The random GPT-2 saved once for (b) and (d); (c)'s 4-bit side (``bench.step_time.quantized_model``) loads the
    same ``<workdir>/gpt2-<size>``, or writes it there itself."""
    from peft_utils.data import find_gpt2_tokenizer
    from peft_utils.models import save_random_gpt2

    size = _gpt2_size(args)
    folder = Path(args.workdir) / f"gpt2-{size}"
    if not (folder / "model.safetensors").is_file():
        started = time.perf_counter()
        staging = folder.with_name(folder.name + ".partial")
        save_random_gpt2(staging, find_gpt2_tokenizer(args.data_dir), size)
        staging.rename(folder)
        print(f"saved a random GPT-2 {size} to {folder} in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


def _past(args: argparse.Namespace, reserve: float = 0.0) -> bool:
    """Whether the global deadline is (within ``reserve`` seconds of being) reached."""
    return time.time() > args.deadline - reserve


# --------------------------------------------------------------------------------------------- (a) smoke comparison


def _smoke_precisions(args: argparse.Namespace) -> list[str]:
    """GPU: bf16, then fp16 (the T4 path). CPU: fp32 (its default), then bf16 (fp16 is refused on a CPU)."""
    return ["bf16", "fp16"] if args.device.startswith("cuda") else ["fp32", "bf16"]


def _smoke_title(args: argparse.Namespace, precision: str) -> str:
    if precision == "fp16":
        return "(a) smoke comparison, fp16 — the T4 path (loss scaling), forced"
    if args.device.startswith("cuda"):
        return f"(a) smoke comparison, {precision}"
    if precision == "bf16":
        return "(a) smoke comparison, bf16 — forced on the CPU (fp16 is refused here)"
    return f"(a) smoke comparison, {precision} — the CPU default"


_COMPUTE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_MIXED = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def _fmt(value, spec: str) -> str:
    """``value`` formatted, or a dash when it is missing (None / NaN)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "—"
    return "—" if math.isnan(number) else format(number, spec)


def _require_sst2(args: argparse.Namespace) -> None:
    """Fail at once, saying how to fix it, when there is no SST-2 data for the smoke comparison."""
    if args.data_dir is None or not (args.data_dir / "sst2").is_dir():
        raise FileNotFoundError(f"no SST-2 data ({args.data_dir or 'no data folder found'}): pass --data-dir (the "
                                "folder holding sst2/ and gpt2-tokenizer/) or set PEFT_LAB_DATA")


def _smoke_config(args: argparse.Namespace, precision: str):
    """The smoke profile at ``precision`` (``--quick``: smaller), its results in a folder of its own."""
    from peft_utils.config import make_config

    overrides = QUICK_SMOKE if args.quick else {}
    return make_config("smoke", device=args.device, precision=precision, data_dir=str(args.data_dir),
                       results_dir=str(Path(args.workdir) / f"smoke-{precision}"), sweep=False, **overrides)


def part_smoke(args: argparse.Namespace, section: Section, precision: str) -> None:
    """The smoke profile's comparison through the project's own API, at one precision."""
    from peft_utils.experiment import run_comparison

    device = _device(args)
    overrides = QUICK_SMOKE if args.quick else {}
    case = f"smoke-{precision}"
    _require_sst2(args)
    if precision == "bf16" and not _native_bf16(device):
        _bf16_refused_without_native(args, section, case)
        return
    section.note(f"`make_config('smoke', device={args.device!r}, precision={precision!r}"
                 + "".join(f", {k}={v!r}" for k, v in overrides.items()) + ", sweep=False)` then `run_comparison`")
    started = time.perf_counter()
    table = run_comparison(_smoke_config(args, precision))
    elapsed = time.perf_counter() - started
    section.table(["method", "compute dtype", "mixed precision", "final accuracy", "final eval loss", "finite",
                   "skipped / steps", "train s", "tokens/s", "peak memory"])
    for record in table.to_dict("records"):
        _smoke_record(section, case, precision, record)
    section.note(f"{len(table)} runs in {elapsed:.1f} s (model building, training, evaluation and saving).")
    if device.type == "cpu" and precision == "bf16":
        _fp16_refused_on_cpu(args, section)
    del table
    _free_memory(device)


def _bf16_refused_without_native(args: argparse.Namespace, section: Section, case: str) -> None:
    """On a GPU without native bf16 (T4, V100) the bf16 comparison must be refused: that is the expected outcome."""
    from peft_utils.experiment import run_comparison

    try:
        run_comparison(_smoke_config(args, "bf16"))
    except ValueError as error:
        section.note(f"bf16 refused on this GPU, as expected without native bf16: `{last_line(error)}`")
        section.report.rows("a", case, "", {"outcome": "refused (expected)", "message": last_line(error)})
        return
    section.problems.append("bf16 was not refused on a GPU without native bf16")


def _smoke_record(section: Section, case: str, precision: str, record: dict) -> None:
    """One method's run of the comparison: its table row, its CSV rows, then its checks."""
    loss = float(record["final_eval_loss"])
    finite = math.isfinite(loss)
    steps, skipped = int(record.get("steps", 0)), int(record.get("skipped_steps", 0) or 0)
    method = record["method"]
    section.row([method, record.get("compute_dtype"), record.get("mixed_precision"),
                 f"{record['final_accuracy']:.4f}", f"{loss:.4f}", "yes" if finite else "**no**",
                 f"{skipped} / {steps}", _fmt(record["train_time_s"], ".2f"), _fmt(record["tokens_per_s"], ",.0f"),
                 f"{_bytes(record['peak_memory_bytes'])} ({record['memory_kind']})"])
    section.report.rows("a", case, method, {
        "precision": record.get("precision"), "compute_dtype": record.get("compute_dtype"),
        "mixed_precision": record.get("mixed_precision"), "final_accuracy": record["final_accuracy"],
        "final_eval_loss": loss, "steps": steps, "skipped_steps": skipped,
        "train_time_s": record["train_time_s"], "tokens_per_s": record["tokens_per_s"],
        "peak_memory_bytes": record["peak_memory_bytes"], "memory_kind": record["memory_kind"]})
    _check_smoke_record(section, precision, record, loss, steps, skipped)


def _check_smoke_record(section: Section, precision: str, record: dict, loss: float, steps: int,
                        skipped: int) -> None:
    """A finite loss, the requested compute dtype and accelerate precision; a warning if every step was skipped."""
    method = record["method"]
    if not math.isfinite(loss):
        section.problems.append(f"{method}: final eval loss {loss}")
    if record.get("compute_dtype") != _COMPUTE[precision]:
        section.problems.append(f"{method}: computed in {record.get('compute_dtype')}, not {_COMPUTE[precision]}")
    if record.get("mixed_precision") != _MIXED[precision]:
        section.problems.append(f"{method}: accelerate's mixed_precision {record.get('mixed_precision')!r}, "
                                f"not {_MIXED[precision]!r}")
    if steps and skipped == steps:
        section.warnings.append(f"{method}: loss scaling skipped every step")


def _fp16_refused_on_cpu(args: argparse.Namespace, section: Section) -> None:
    """fp16 on a CPU is refused before anything trains: that refusal is this part's expected outcome."""
    from peft_utils.experiment import run_comparison

    try:
        run_comparison(_smoke_config(args, "fp16"))
    except ValueError as error:
        section.note(f"fp16 on the CPU: refused, as expected — `{last_line(error)}`")
        section.report.rows("a", "smoke-fp16", "", {"outcome": "refused (expected)", "message": last_line(error)})
        return
    section.problems.append("fp16 was not refused on the CPU")


# --------------------------------------------------------------------------------------------- (b) planner vs measured


def _full_settings(args: argparse.Namespace):
    """The ``full`` profile (GPT-2 Large on a GPU); ``--quick`` shrinks its batch to 4 x 32 (bf16 is emulated on
    most CPUs: the tiny model at 16 x 128 took 0.6 s a step)."""
    from dataclasses import replace

    from peft_utils.config import PROFILES

    profile = PROFILES["full"]
    return replace(profile, train=replace(profile.train, **QUICK_BATCH)) if args.quick else profile


def _precision_for_steps(device) -> str:
    """bf16 where the GPU (or CPU autocast) has it; fp16 with loss scaling on a GPU without native bf16 (T4)."""
    return "bf16" if _native_bf16(device) else "fp16"


def _random_batch(batch: int, length: int, vocab_size: int, device, seed: int = 0) -> dict:
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, min(vocab_size, 50000), (batch, length), generator=generator)  # no pad/EOS id
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": torch.randint(0, 2, (batch,), generator=generator).to(device)}


@dataclass
class Measured:
    step_seconds: list[float]
    warmup: int
    start_bytes: int  # allocated when training starts (the weights), CUDA; resident tensors on CPU
    peak_bytes: int  # CUDA: max_memory_allocated over the steps; CPU: resident + one profiled step's peak
    reserved_bytes: int | None
    losses: list[float]
    skipped: int

    @property
    def timed(self) -> list[float]:
        return self.step_seconds[self.warmup:] or self.step_seconds

    @property
    def median(self) -> float:
        return statistics.median(self.timed)

    @property
    def iqr(self) -> tuple[float, float]:
        timed = self.timed
        if len(timed) < 2:
            return timed[0], timed[0]
        q1, _, q3 = statistics.quantiles(timed, n=4, method="inclusive")
        return q1, q3


Step = Callable[[], tuple[float, bool]]  # one optimiser step: (its loss, whether loss scaling skipped it)


def _model_for_steps(method: str, folder: Path, profile, precision: str, device, plan):
    """``build_model`` as the experiment calls it, on ``device``, with the plan's gradient checkpointing."""
    from peft_utils.core.loop import enable_gradient_checkpointing, set_seed
    from peft_utils.devices import compute_dtype_for
    from peft_utils.models import build_model

    set_seed(0)
    model, _ = build_model(method, folder, profile.adapter, compute_dtype_for(device, precision))
    if next(model.parameters()).device != device:  # a 4-bit model is placed by its loader
        model.to(device)
    if plan.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def _micro_batches(batch: dict, rows: int, micro: int) -> list[tuple[dict, float]]:
    """The batch's ``rows`` cut into the plan's micro-batches, each with its share of the loss."""
    return [({k: v[i:i + micro] for k, v in batch.items()}, micro / rows) for i in range(0, rows, micro)]


def _start_bytes(model, device) -> int:
    """Memory held when training starts (the weights): CUDA's allocated bytes, after a peak reset; resident on CPU."""
    import torch

    from bench.step_time import resident_bytes

    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return resident_bytes(model)


def _optimizer_step(model, micro_batches: list[tuple[dict, float]], accelerator, optimizer, scheduler,
                    max_grad_norm: float | None) -> Step:
    """One optimiser step over the micro-batches, as a function returning ``(loss, skipped by loss scaling)``."""
    import torch
    import torch.nn.functional as F

    trainable = [p for group in optimizer.param_groups for p in group["params"]]

    def step() -> tuple[float, bool]:
        losses = []
        for inputs, weight in micro_batches:
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            loss = F.cross_entropy(logits.float(), inputs["labels"])
            accelerator.backward(loss * weight)
            losses.append(loss.detach() * weight)
        if max_grad_norm is not None:
            accelerator.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()
        skipped = bool(optimizer.step_was_skipped)
        if not skipped:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return float(torch.stack(losses).sum()), skipped

    return step


def _timed_steps(step: Step, steps: int, device) -> tuple[list[float], list[float], int]:
    """Run ``steps`` steps, each timed between device synchronisations: ``(seconds, losses, skipped steps)``."""
    times, losses, skipped = [], [], 0
    for _ in range(steps):
        _synchronize(device)
        started = time.perf_counter()
        loss, was_skipped = step()  # its float() waits for the device; the clock is read after a synchronize
        _synchronize(device)
        times.append(time.perf_counter() - started)
        losses.append(loss)
        skipped += was_skipped
    return times, losses, skipped


def _peak_bytes(step: Step, model, optimizer, device) -> tuple[int, int | None]:
    """``(peak, reserved peak)``: CUDA's counters over the steps; on a CPU, the allocator's peak during one more
    (profiled, untimed) step on top of the resident tensors, and no reserved figure."""
    import torch

    from bench.step_time import allocation_profile, resident_bytes

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    step_peak, _ = allocation_profile(step, "cpu")
    return resident_bytes(model, optimizer) + step_peak, None


def train_steps(args: argparse.Namespace, method: str, folder: Path, plan, steps: int, precision: str,
                accelerator) -> Measured:
    """``steps`` optimiser steps of ``method`` as the experiment trains it: ``build_model``, the plan's micro-batches
    and checkpointing, then the core's AdamW, schedule and clipping through accelerate (autocast, loss scaling)."""
    from peft_utils.core.loop import prepare_for_training
    from peft_utils.devices import accelerator_device

    profile = _full_settings(args)
    settings = profile.train
    device = accelerator_device(accelerator)
    model = _model_for_steps(method, folder, profile, precision, device, plan)
    batch = _random_batch(settings.batch_size, settings.max_length, model.config.vocab_size, device)
    micro_batches = _micro_batches(batch, settings.batch_size, plan.per_device_batch)
    start_bytes = _start_bytes(model, device)
    model, optimizer, scheduler = prepare_for_training(model, accelerator, lr=profile.lr[method],
                                                       weight_decay=settings.weight_decay,
                                                       warmup_ratio=settings.warmup_ratio, total_steps=steps)
    model.train()
    step = _optimizer_step(model, micro_batches, accelerator, optimizer, scheduler, settings.max_grad_norm)
    times, losses, skipped = _timed_steps(step, steps, device)
    peak, reserved = _peak_bytes(step, model, optimizer, device)
    accelerator.free_memory()  # its references to the model and optimiser; the rest goes when this returns
    return Measured(times, min(3, steps - 1), start_bytes, peak, reserved, losses, skipped)


PLANNER_METHODS = ("full", "lora", "dora", "qlora")


@dataclass
class PlannerSetup:
    """What (b)'s methods share: the device and precision, the ``full`` profile, the model and the accelerator."""

    device: Any
    precision: str
    dtype: Any
    profile: Any
    size: str
    folder: Path
    model_config: Any
    accelerator: Any
    n_params: int

    @property
    def tokens_per_step(self) -> int:
        return self.profile.train.batch_size * self.profile.train.max_length


def _planner_setup(args: argparse.Namespace) -> PlannerSetup:
    """The random GPT-2 saved once, its config, the accelerator and the non-embedding parameter count for (b)."""
    from transformers import AutoConfig

    from bench.step_time import Spec, non_embedding_parameters
    from peft_utils.devices import compute_dtype_for, make_accelerator

    device = _device(args)
    precision = _precision_for_steps(device)
    dtype = compute_dtype_for(device, precision)
    profile = _full_settings(args)
    size = _gpt2_size(args)
    folder = _model_folder(args)
    model_config = AutoConfig.from_pretrained(folder, num_labels=2)
    accelerator = make_accelerator(args.device, precision)
    n_params = non_embedding_parameters(Spec(size, profile.train.batch_size, profile.train.max_length))
    return PlannerSetup(device, precision, dtype, profile, size, folder, model_config, accelerator, n_params)


def _planner_intro(args: argparse.Namespace, section: Section, setup: PlannerSetup) -> None:
    """(b)'s opening note (what runs, how it is measured) and its table's header."""
    settings, adapter, cuda = setup.profile.train, setup.profile.adapter, setup.device.type == "cuda"
    section.note(f"GPT-2 {setup.size} (random weights, {setup.folder.name}), batch {settings.batch_size} x "
                 f"{settings.max_length} random tokens, {setup.precision} autocast "
                 f"({setup.accelerator.mixed_precision}), "
                 f"rank {adapter.rank}, alpha {adapter.alpha:g}, dropout {adapter.dropout:g}, default targets, "
                 f"lr {setup.profile.lr}, clipping {settings.max_grad_norm}; {args.steps} steps, the first "
                 f"{min(3, args.steps - 1)} untimed. Estimate = `plan_memory` for the free memory "
                 f"({'CUDA `mem_get_info`' if cuda else 'host available memory'}) before each "
                 "model is built; measured peak = " + ("`torch.cuda.max_memory_allocated` over the steps "
                 "(reset after the model is built)." if cuda else
                 "resident tensors + the CPU allocator's peak during one profiled step (bench/step_time.py)."))
    section.table(["method", "plan", "estimate: weights / optimizer / step peak / total", "measured at start",
                   "measured peak", "peak / estimate", "reserved peak", "step ms (median, IQR)", "first step ms",
                   "tokens/s", "loss first → last", "skipped"])


def part_planner(args: argparse.Namespace, section: Section) -> None:
    """(b): for each method, the planner's estimate and plan for the free memory, then ``args.steps`` real steps."""
    setup = _planner_setup(args)
    _planner_intro(args, section, setup)
    for method in PLANNER_METHODS:
        if _past(args, reserve=args.method_reserve_s):
            section.skipped.append(f"(b) {method}")
            continue
        try:
            _planner_method(args, section, setup, method)
        except Exception as error:  # noqa: BLE001 - one method's failure must not lose the others
            traceback.print_exc()
            section.row([method, f"**failed**: {last_line(error)}"] + [""] * 10)
            section.report.rows("b", "planner", method, {"error": last_line(error)})
            section.problems.append(f"{method}: {last_line(error)}")
            _free_memory(setup.device)


def _plan(setup: PlannerSetup, method: str) -> tuple[Any, dict]:
    """The planner's plan for the memory free now, and its CSV values (with the configured batch's estimate)."""
    from peft_utils.memory_plan import estimate_memory, plan_memory

    settings, adapter, device = setup.profile.train, setup.profile.adapter, setup.device
    free = _free_bytes(device)
    plan = plan_memory(setup.model_config, method, settings, adapter, compute_dtype=setup.dtype, device_bytes=free,
                       device_type=device.type, name=f"gpt2-{setup.size}")
    configured = estimate_memory(setup.model_config, method, settings.batch_size, settings.max_length, setup.dtype,
                                 rank=adapter.rank, targets=adapter.targets, device_type=device.type)
    estimate = plan.estimate
    values = {"precision": setup.precision, "device_free_bytes": free, "plan": plan.reason,
              "plan_fits": plan.fits, "per_device_batch": plan.per_device_batch,
              "grad_accum_steps": plan.grad_accum_steps,
              "gradient_checkpointing": plan.gradient_checkpointing,
              "estimate_configured_bytes": configured.total, "estimate_weights_bytes": estimate.weights,
              "estimate_optimizer_bytes": estimate.optimizer_state,
              "estimate_step_peak_bytes": estimate.step_peak, "estimate_total_bytes": estimate.total}
    return plan, values


def _planner_method(args: argparse.Namespace, section: Section, setup: PlannerSetup, method: str) -> None:
    """One method of (b): plan it for the free memory, then train ``args.steps`` steps if the plan fits."""
    _free_memory(setup.device)
    plan, values = _plan(setup, method)
    if not plan.fits:
        section.row([method, "does not fit", _estimate_text(plan.estimate), "—", "—", "—", "—", "—", "—", "—",
                     "—", "—"])
        section.report.rows("b", "planner", method, values)
        section.warnings.append(f"{method}: the planner says it does not fit ({plan.reason})")
        return
    print(f"(b) {method}: {plan.reason}", flush=True)
    measured = train_steps(args, method, setup.folder, plan, args.steps, setup.precision, setup.accelerator)
    _free_memory(setup.device)  # the model and optimiser are gone with train_steps' frame: give the memory back
    _planner_measured(section, setup, method, plan, values, measured)


def _planner_measured(section: Section, setup: PlannerSetup, method: str, plan, values: dict,
                      measured: Measured) -> None:
    """A measured method's table row and CSV rows beside the plan, then its checks."""
    q1, q3 = measured.iqr
    tokens_per_s = setup.tokens_per_step / measured.median
    ratio = measured.peak_bytes / plan.estimate.total
    plan_text = (f"{plan.per_device_batch} x {plan.grad_accum_steps}"
                 f"{', checkpointing' if plan.gradient_checkpointing else ''}")
    section.row([method, plan_text, _estimate_text(plan.estimate), _bytes(measured.start_bytes),
                 _bytes(measured.peak_bytes), f"{ratio:.2f}", _bytes(measured.reserved_bytes),
                 f"{1e3 * measured.median:.1f} ({1e3 * q1:.1f}–{1e3 * q3:.1f})",
                 f"{1e3 * measured.step_seconds[0]:.0f}", f"{tokens_per_s:,.0f}",
                 f"{measured.losses[0]:.3f} → {measured.losses[-1]:.3f}", measured.skipped])
    section.report.rows("b", "planner", method, values | {
        "steps": len(measured.step_seconds), "timed_steps": len(measured.timed),
        "step_s_median": measured.median, "step_s_q1": q1, "step_s_q3": q3,
        "first_step_s": measured.step_seconds[0], "tokens_per_step": setup.tokens_per_step,
        "tokens_per_s": tokens_per_s, "measured_start_bytes": measured.start_bytes,
        "measured_peak_bytes": measured.peak_bytes, "measured_reserved_peak_bytes": measured.reserved_bytes,
        "peak_over_estimate": ratio, "loss_first": measured.losses[0], "loss_last": measured.losses[-1],
        "skipped_steps": measured.skipped, "non_embedding_params": setup.n_params})
    if not all(math.isfinite(loss) for loss in measured.losses):
        section.problems.append(f"{method}: non-finite training loss")
    if setup.device.type == "cuda" and measured.peak_bytes > plan.budget_bytes:
        section.warnings.append(f"{method}: measured peak {_bytes(measured.peak_bytes)} is over the "
                                f"planner's budget {_bytes(plan.budget_bytes)}")


def _estimate_text(estimate) -> str:
    return " / ".join(_bytes(n) for n in (estimate.weights, estimate.optimizer_state, estimate.step_peak,
                                          estimate.total))


# --------------------------------------------------------------------------------------------- (c) ours vs peft


def step_time_csv(args: argparse.Namespace) -> Path:
    return args.csv.with_name(args.csv.stem + "-step_time.csv")


def part_step_time(args: argparse.Namespace, section: Section) -> None:
    """(c): ``bench/step_time.py``'s interleaved ours/peft benchmark, one method at a time (the budget is checked
    between them), its CSV rewritten after each."""
    from bench import step_time as st

    device = _device(args)
    cuda = device.type == "cuda"
    size = _gpt2_size(args)
    batch, seq = (2, 32) if args.quick else (16, 64)  # bench/step_time.py's --quick and GPU shapes
    steps, warmup = (3, 1) if args.quick else (args.bench_steps, 3)
    dtype = "bf16" if _native_bf16(device) else "fp32"
    peak, _ = peak_tflops(_gpu_name(device)) if cuda else (None, "")
    spec = st.Spec(size, batch, seq, device=args.device, dtype=dtype)
    env = st.environment(args.device)
    out = step_time_csv(args)
    section.note(f"`bench.step_time.benchmark` on GPT-2 {size} (random weights), batch {batch} x {seq}, {dtype} "
                 f"autocast, r 8, every linear layer, {steps} timed steps after {warmup} warm-up, ours and peft "
                 f"interleaved step by step; ours/peft = median of the per-round ratios (IQR). CSV: {out.name}.")
    rows: list = []
    lines_written = False
    for method in ("lora", "dora", "qlora"):
        if _past(args, reserve=args.method_reserve_s):
            section.skipped.append(f"(c) {method}")
            continue
        try:
            new = st.benchmark(spec, [method], steps, warmup, peak, Path(args.workdir))
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            section.note(f"{method}: **failed** — {last_line(error)}")
            section.report.rows("c", "step_time", method, {"error": last_line(error)})
            section.problems.append(f"{method}: {last_line(error)}")
            _free_memory(device)
            continue
        if not new:
            section.problems.append(f"{method}: not run (4-bit unavailable?)")
            continue
        rows += new
        table = st.markdown_table(new).splitlines()
        if not lines_written:
            section.report.write("\n" + "\n".join(table[:2]))
            lines_written = True
        section.report.write("\n".join(table[2:]))
        st.write_csv(rows, out, env | {"command": "bench.gpu_check part (c)"})
        for row in new:
            section.report.rows("c", "step_time", f"{row.method}/{row.impl}", {
                "model": row.model, "dtype": row.dtype, "batch": row.batch, "seq": row.seq,
                "step_ms": row.step_ms, "q1_ms": row.q1_ms, "q3_ms": row.q3_ms,
                "ours_over_peft": row.ours_over_peft, "ratio_q1": row.ratio_q1, "ratio_q3": row.ratio_q3,
                "tokens_per_s": row.tokens_per_s, "peak_mib": row.peak_mib, "step_alloc_mib": row.step_alloc_mib,
                "tflops": row.tflops, "peak_fraction": row.peak_fraction})
    ours = [r for r in rows if r.impl == "ours" and r.ours_over_peft is not None]
    if ours:
        section.note("ours/peft: " + ", ".join(
            f"{r.method} **{r.ours_over_peft:.3f}** ({r.ratio_q1:.3f}–{r.ratio_q3:.3f})" for r in ours))


def _gpu_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


# --------------------------------------------------------------------------------------------- (d) fraction of peak


def part_peak(args: argparse.Namespace, section: Section) -> None:
    """(d): full fine-tuning's tokens/s from (b)'s measurement (else measured here), and 6·N·tokens per step as a
    fraction of the GPU's dense peak."""
    device = _device(args)
    size = _gpt2_size(args)
    settings = _full_settings(args).train
    found = {r["key"]: r["value"] for r in section.report.read_rows()
             if r["part"] == "b" and r["method"] == "full"}
    if _b_measured_full(section.report):
        step_s, tokens, source = float(found["step_s_median"]), int(found["tokens_per_step"]), "part (b)'s steps"
        precision = found.get("precision", "")
    else:
        from peft_utils.devices import make_accelerator
        from peft_utils.memory_plan import plan_memory
        from transformers import AutoConfig

        folder = _model_folder(args)
        precision = _precision_for_steps(device)
        from peft_utils.devices import compute_dtype_for

        plan = plan_memory(AutoConfig.from_pretrained(folder, num_labels=2), "full", settings,
                           compute_dtype=compute_dtype_for(device, precision),
                           device_bytes=_free_bytes(device), device_type=device.type)
        steps = 3 if args.quick else 10
        measured = train_steps(args, "full", folder, plan, steps, precision, make_accelerator(args.device, precision))
        step_s, tokens = measured.median, settings.batch_size * settings.max_length
        source = f"{steps} steps measured here ((b) has no full fine-tuning row)"
    if "non_embedding_params" in found:
        n_params = int(found["non_embedding_params"])
    else:
        from bench import step_time as st

        n_params = st.non_embedding_parameters(st.Spec(size, settings.batch_size, settings.max_length))
    tflops = 6 * n_params * tokens / step_s / 1e12
    name = _gpu_name(device)
    peak, peak_dtype = peak_tflops(name) if device.type == "cuda" else (None, "n/a (CPU)")
    fraction = tflops / peak if peak else None
    section.note(f"From {source}: GPT-2 {size}, batch {settings.batch_size} x {settings.max_length}, {precision} "
                 f"autocast. FLOPs per step = 6 x N x tokens, N = {n_params:,} non-embedding parameters "
                 "(attention scores left out).")
    section.table(["hardware", "step ms", "tokens/s", "achieved TFLOP/s", "dense peak TFLOP/s", "fraction of peak"])
    section.row([name, f"{1e3 * step_s:.1f}", f"{tokens / step_s:,.0f}", f"{tflops:.2f}",
                 f"{peak:g} ({peak_dtype})" if peak else peak_dtype,
                 f"{100 * fraction:.1f} %" if fraction is not None else "—"])
    section.report.rows("d", "full", "full", {"hardware": name, "step_s": step_s, "tokens_per_s": tokens / step_s,
                                              "non_embedding_params": n_params, "tflops": tflops,
                                              "peak_tflops": peak, "peak_dtype": peak_dtype,
                                              "peak_fraction": fraction, "source": source})


def _b_measured_full(report: Report) -> bool:
    """Whether (b) measured full fine-tuning: then (d) is arithmetic on its rows, run without a child process."""
    found = {r["key"] for r in report.read_rows() if r["part"] == "b" and r["method"] == "full"}
    return {"step_s_median", "non_embedding_params"} <= found


def _free_bytes(device) -> int:
    import psutil
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available)


# --------------------------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class Job:
    """One child process: a part (``a`` once per precision) and its section's title."""

    part: str
    case: str
    title: str


def jobs(args: argparse.Namespace) -> list[Job]:
    steps = (f"{args.steps} optimiser steps per method, GPT-2 {_gpt2_size(args)} (random weights), full profile "
             "settings" + (" at batch 4 x 32" if args.quick else ""))
    titles = {"b": f"(b) {steps}: memory planner vs measured",
              "c": "(c) step time, ours vs peft (LoRA, DoRA, QLoRA)",
              "d": "(d) full fine-tuning throughput and fraction of peak"}
    selected: list[Job] = []
    for part in args.parts:
        if part == "a":
            selected += [Job("a", p, _smoke_title(args, p)) for p in _smoke_precisions(args)]
        else:
            selected.append(Job(part, part, titles[part]))
    return selected


def run_job(args: argparse.Namespace, job: Job) -> int:
    """Run one part (in its child process), close its section with its status: 0 when it passed, 1 when it failed,
    :data:`PARTIAL` when the budget made it skip some of its methods."""
    import warnings

    warnings.filterwarnings("ignore", message=".*bfloat16 compute on a CPU.*")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    report = Report(args.out, args.csv)
    section = Section(report, job.part)
    started = time.perf_counter()
    try:
        if job.part == "a":
            part_smoke(args, section, job.case)
        elif job.part == "b":
            part_planner(args, section)
        elif job.part == "c":
            part_step_time(args, section)
        else:
            part_peak(args, section)
    except Exception as error:  # noqa: BLE001 - the report says what failed; the next part still runs
        traceback.print_exc()
        section.problems.append(last_line(error))
    report.write(f"\n{section.status()} ({time.perf_counter() - started:.0f} s)")
    report.rows(job.part, job.case, "", {"status": section.status().split("**")[1],
                                         "seconds": round(time.perf_counter() - started, 1)})
    return 1 if section.problems else PARTIAL if section.skipped else 0


def _relay(stream, sink, tail: deque) -> None:
    """Copy a child's stderr to ours as it comes, keeping its last lines for the report."""
    buffer = ""
    for chunk in iter(lambda: os.read(stream.fileno(), 4096), b""):
        text = chunk.decode("utf-8", "replace")
        sink.write(text)
        sink.flush()
        buffer = (buffer + text)[-20000:]
    tail.extend(line for line in re.split(r"[\r\n]+", buffer) if line.strip())


def spawn(args: argparse.Namespace, job: Job, argv: list[str], timeout: float) -> tuple[int | None, str]:
    """Run ``job`` in a child; ``(exit status or None when stopped at the deadline, last stderr line)``."""
    paths = ["--out", str(args.out), "--csv", str(args.csv)] + (["--data-dir", str(args.data_dir)] if args.data_dir
                                                                 else [])  # resolved: the child runs in REPO
    command = [sys.executable, "-m", "bench.gpu_check", *argv, *paths, "--job", job.case,
               "--workdir", str(args.workdir), "--deadline", repr(args.deadline)]
    child = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, env=os.environ.copy())
    tail: deque = deque(maxlen=5)
    relay = threading.Thread(target=_relay, args=(child.stderr, sys.stderr, tail), daemon=True)
    relay.start()
    try:
        status = child.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        status = None
    finally:  # stopped at the deadline, or this process is being terminated: the child goes too
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    relay.join(timeout=5)
    return status, (tail[-1] if tail else "")


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
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated from a,b,c,d (default all)")
    parser.add_argument("--steps", type=int, help="optimiser steps per method in (b) (default 30; 3 with --quick)")
    parser.add_argument("--bench-steps", type=int, default=20, help="timed steps per side in (c) (default 20)")
    parser.add_argument("--data-dir", type=Path, help="folder with sst2/ and gpt2-tokenizer/ (see above)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 with --quick)")
    parser.add_argument("--method-reserve-s", type=float,
                        help="do not start a method of (b)/(c) with less time left (default 30 s on a GPU, 0 on CPU)")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # internal: the part a child process runs
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    args.out = args.out or REPO / "bench" / ("GPU-cpu.md" if cpu else "GPU.md")
    args.csv = args.csv or REPO / "bench" / ("gpu_check-cpu.csv" if cpu else "gpu_check.csv")
    args.out, args.csv = args.out.resolve(), args.csv.resolve()
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {','.join(PARTS)}")
    args.steps = args.steps or (3 if args.quick else 30)
    if args.steps < 2:
        parser.error("--steps must be at least 2")
    if args.quick and args.threads is None:
        args.threads = 1
    if args.method_reserve_s is None:
        args.method_reserve_s = 0.0 if cpu else 30.0
    args.data_dir = _data_dir(args.data_dir)
    return args


def _data_dir(given: Path | None) -> Path | None:
    """``--data-dir`` as given; else the first of ``$PEFT_LAB_DATA``, ``../shared/data``, ``shared/data`` that holds
    ``sst2/`` (None when none does: the parts that need data say so)."""
    if given is not None:
        return given.resolve()
    candidates = [Path(os.environ["PEFT_LAB_DATA"])] if os.environ.get("PEFT_LAB_DATA") else []
    candidates += [REPO.parent / "shared" / "data", REPO / "shared" / "data"]
    return next((c.resolve() for c in candidates if (c / "sst2").is_dir()), None)


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.data_dir:
        os.environ["PEFT_LAB_DATA"] = str(args.data_dir)  # for bench/step_time.py's tokenizer lookup
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.job:
        return run_job(args, next(j for j in jobs(args) if j.case == args.job))
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda but torch sees no CUDA device; use --device cpu --quick for the CPU check",
              file=sys.stderr)
        return 2
    started = time.time()
    args.deadline = started + args.budget_s
    signal.signal(signal.SIGTERM, _terminated)  # a timeout's SIGTERM: stop the running part, clean up, exit
    report = Report(args.out, args.csv)
    command = "python -m bench.gpu_check " + shlex.join(argv)
    report.start(header(args, command))
    statuses: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
        args.workdir = Path(workdir)
        for job in jobs(args):
            remaining = args.deadline - time.time()
            report.write(f"\n## {job.title}\n")
            derived = job.part == "d" and _b_measured_full(report)  # seconds of arithmetic: run even past the budget
            if remaining <= 0 and not derived:
                report.write(f"Status: **skipped** — the time budget ({args.budget_s:g} s) was spent "
                             f"({time.time() - started:.0f} s elapsed)")
                report.rows(job.part, job.case, "", {"status": "skipped"})
                statuses.append((job.title, "skipped"))
                continue
            part_started = time.time()
            try:
                if derived:
                    status, last = run_job(args, job), ""  # arithmetic on (b)'s rows: no process needed
                else:
                    status, last = spawn(args, job, argv, remaining)
            except SystemExit:
                report.write(f"\nStatus: **stopped** — the check was terminated {time.time() - part_started:.0f} s "
                             "into this part (a signal from outside: a caller's time limit?)")
                raise
            if status is None:
                line = (f"Status: **stopped** — the time budget ({args.budget_s:g} s) ran out "
                        f"{time.time() - part_started:.0f} s into this part; what it wrote above is kept")
                report.write("\n" + line)
                report.rows(job.part, job.case, "", {"status": "stopped"})
            elif status not in (0, 1, PARTIAL):
                line = f"Status: **FAILED** — the part's process died (exit status {status}): {last}"
                report.write("\n" + line)
                report.rows(job.part, job.case, "", {"status": "FAILED", "error": last})
            statuses.append((job.title, {0: "ok", 1: "FAILED", PARTIAL: "partial", None: "stopped"}.get(
                status, "FAILED")))
    passed = all(s == "ok" for _, s in statuses) and len(statuses) == len(jobs(args))
    summary = "; ".join(f"{title.split(')')[0]})" + f" {s}" for title, s in statuses)
    report.write(f"\n---\nFinished in {time.time() - started:.0f} s of a {args.budget_s:g} s budget: {summary}. "
                 f"CSV: {args.csv.name}" + (f", {step_time_csv(args).name}" if "c" in args.parts else "") + ".")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
