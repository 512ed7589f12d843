"""bf16 autocast against float32 on this CPU: one training step of full fine-tuning and of LoRA, interleaved.

    python -m bench.precision --threads 1           # MiniLM + GPT-2 124M-sized, batch 16 x 64 (see the time below)
    python -m bench.precision --models minilm --budget-s 600 --steps 10   # more rounds, one model
    python -m bench.precision --quick               # smoke: tiny GPT-2, batch 2 x 32, 3 steps (no CSV unless --csv)

Why: ``--precision bf16`` works on a CPU (torch's CPU autocast), and it is only worth asking for where the CPU has
native bf16 matrix units (``avx512_bf16``, ``amx_bf16``); elsewhere oneDNN emulates them. This measures what it does
on the machine at hand, with the models of the ``cpu`` profile's size.

Each configuration (model x method) is built twice as the experiment builds it for each precision
(``peft_utils.models.build_model``): full fine-tuning keeps float32 master weights in both, computing under bf16
autocast in the bf16 copy; LoRA (the ``cpu`` profile's adapter: r 8, alpha 16, dropout 0.05, the default targets)
stores its frozen base in bf16 in the bf16 copy, its adapters in float32. Both get the core's AdamW
(``core.loop.make_optimizer``: fused) and the same random batch. A step is forward + float32 cross-entropy + backward
+ AdamW step + zero_grad. The two copies are timed step by step in ABBA order (as ``bench.step_time.interleave``), so
that drift on a shared machine hits both alike; "bf16/fp32" is the median of the per-round ratios (with their IQR).
Each step's wall time and this process's CPU time (``time.process_time``) are both recorded: on a shared machine,
and under ``nice``, the wall time also measures the scheduler (other jobs' share of the cores), while with one thread
the CPU time is the step's own cost; the tables lead with it (with several threads it sums their work: read the wall
columns then).

Time-boxed: where the CPU has no native bf16 a bf16 step is 10-30x slower than an fp32 one, so a fixed number of
steps cannot promise a run time.
``--budget-s`` (default 300) is shared by the configurations: each gets what is left divided by the configurations
still to run, and runs one warm-up round, then timed rounds until ``--steps`` rounds or its share is spent, but at
least one. Each configuration's rows are printed, and the CSV rewritten, as soon as it finishes. That floor sets the
time where bf16 is emulated: on the AVX2 EPYC of bench/precision.md a GPT-2 124M bf16 step took ~4 min of CPU, and the
default run 20 min (MiniLM alone, ``--models minilm``: 3 min).

Peak memory = the copy's resident tensors (weights, buffers, optimizer state) + the peak the CPU allocator reaches
during its warm-up step, which is profiled (``bench.step_time.allocation_profile``); AdamW's state is created before
it by a step on zero gradients, so the warm-up step sees the steady state's memory and costs no extra step.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python bench/precision.py` works as well as `python -m bench.precision`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import nn

from bench.step_time import (MIB, Spec, allocation_profile, make_inputs, quartiles, resident_bytes,
                             write_csv)

REPO = Path(__file__).resolve().parents[1]
MODELS = ("minilm", "124m", "medium", "tiny")
METHODS = ("full", "lora")
PRECISIONS = ("fp32", "bf16")


class Side:
    """One precision's copy of a configuration: its model, optimizer and batch; ``step()`` is one training step."""

    def __init__(self, precision: str, model: nn.Module, spec: Spec) -> None:
        from peft_utils.core.loop import make_optimizer

        self.precision, self.model = precision, model.train()
        self.optimizer = make_optimizer(model, lr=1e-5, weight_decay=0.01)
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.inputs = make_inputs(spec, model.config.vocab_size)
        self.times: list[float] = []  # wall seconds per timed step
        self.cpu_times: list[float] = []  # this process's CPU seconds per timed step

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self) -> None:
        with self.autocast():
            logits = self.model(input_ids=self.inputs["input_ids"], attention_mask=self.inputs["attention_mask"]).logits
        F.cross_entropy(logits.float(), self.inputs["labels"]).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed_step(self) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.step()
        self.cpu_times.append(time.process_time() - cpu)
        self.times.append(time.perf_counter() - wall)

    def warm_up(self) -> tuple[int, int]:
        """The untimed first step, profiled: (peak bytes of a step including the resident tensors, the step's own
        peak on top of them). AdamW's state is made first, by the optimiser itself on zero gradients (its update is
        then a weight decay of lr x wd = 1e-7), so that the step sees it resident, as every later step does."""
        for group in self.optimizer.param_groups:
            for parameter in group["params"]:
                parameter.grad = torch.zeros_like(parameter)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        step_peak, _ = allocation_profile(self.step, "cpu")
        return resident_bytes(self.model, self.optimizer) + step_peak, step_peak


def model_source(model: str, workdir: Path) -> str:
    """``minilm`` (the real pretrained weights of the pip package), or a random GPT-2 of that size saved once."""
    if model == "minilm":
        return "minilm"
    from peft_utils.data import find_gpt2_tokenizer
    from peft_utils.models import save_random_gpt2

    folder = workdir / f"gpt2-{model}"
    if not folder.exists():
        save_random_gpt2(folder, find_gpt2_tokenizer(), model)
    return str(folder)


def build(method: str, source: str, precision: str) -> nn.Module:
    import warnings

    from peft_utils.config import PROFILES
    from peft_utils.core.loop import set_seed
    from peft_utils.models import build_model

    set_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model, _ = build_model(method, source, PROFILES["cpu"].adapter,
                               torch.bfloat16 if precision == "bf16" else torch.float32)
    return model


@dataclass
class Row:
    model: str
    method: str
    precision: str
    batch: int
    seq: int
    weight_dtypes: str
    trainable_params: int
    steps: int
    cpu_ms: float
    cpu_q1_ms: float
    cpu_q3_ms: float
    step_ms: float
    q1_ms: float
    q3_ms: float
    bf16_over_fp32_cpu: float | None
    cpu_ratio_q1: float | None
    cpu_ratio_q3: float | None
    bf16_over_fp32: float | None
    ratio_q1: float | None
    ratio_q3: float | None
    tokens_per_s: float
    tokens_per_cpu_s: float
    peak_mib: float
    step_alloc_mib: float


def timed_rounds(sides: list[Side], steps: int, seconds: float) -> None:
    """Timed steps of both sides in ABBA order (A B, B A, ...) until ``steps`` rounds or ``seconds`` are spent (at
    least one round), with Python's GC paused: a collection inside one side's step would be charged to it alone."""
    started = time.perf_counter()
    gc.collect()
    gc.disable()
    try:
        for i in range(steps):
            if i and time.perf_counter() - started > seconds:
                break
            for side in sides if i % 2 == 0 else sides[::-1]:
                side.timed_step()
    finally:
        gc.enable()


def benchmark(model: str, method: str, spec: Spec, steps: int, seconds: float, workdir: Path,
              log=print) -> list[Row]:
    """One configuration: both precisions built, warmed up (and their memory measured), then timed in turns for
    ``steps`` rounds or about ``seconds`` in all (building included), whichever comes first."""
    started = time.perf_counter()
    source = model_source(model, workdir)
    sides = [Side(precision, build(method, source, precision), spec) for precision in PRECISIONS]
    memories = [side.warm_up() for side in sides]
    timed_rounds(sides, steps, seconds - (time.perf_counter() - started))
    fp32, bf16 = sides
    wall_ratio = quartiles([b / a for a, b in zip(fp32.times, bf16.times)])
    cpu_ratio = quartiles([b / a for a, b in zip(fp32.cpu_times, bf16.cpu_times)])
    rows = []
    for side, memory in zip(sides, memories):
        q1, median, q3 = quartiles(side.times)
        c1, cpu, c3 = quartiles(side.cpu_times)
        dtypes = "+".join(sorted({str(p.dtype).removeprefix("torch.") for p in side.model.parameters()}))
        ratios = (cpu_ratio[1], cpu_ratio[0], cpu_ratio[2], wall_ratio[1], wall_ratio[0], wall_ratio[2]) \
            if side is bf16 else (None,) * 6
        rows.append(Row(model, method, side.precision, spec.batch, spec.seq, dtypes, side.trainable,
                        len(side.times), cpu * 1e3, c1 * 1e3, c3 * 1e3, median * 1e3, q1 * 1e3, q3 * 1e3, *ratios,
                        spec.tokens / median, spec.tokens / cpu, memory[0] / MIB, memory[1] / MIB))
    log(f"  {model} {method}: bf16/fp32 {cpu_ratio[1]:.3f} in CPU time ({cpu_ratio[0]:.3f}–{cpu_ratio[2]:.3f}), "
        f"{wall_ratio[1]:.3f} in wall time, over {len(fp32.times)} round(s); {time.perf_counter() - started:.0f} s")
    del sides, fp32, bf16
    gc.collect()
    return rows


def markdown_table(rows: list[Row]) -> str:
    lines = ["| model | method | precision | weights | trainable | CPU ms/step (median, IQR) | bf16/fp32, CPU (IQR) "
             "| wall ms/step (median) | bf16/fp32, wall | tokens per CPU-s | peak MiB | step alloc MiB |",
             "|" + "---|" * 12]
    for r in rows:
        cpu_ratio = (f"**{r.bf16_over_fp32_cpu:.2f}** ({r.cpu_ratio_q1:.2f}–{r.cpu_ratio_q3:.2f})"
                     if r.bf16_over_fp32_cpu else "")
        wall_ratio = f"{r.bf16_over_fp32:.2f}" if r.bf16_over_fp32 else ""
        lines.append(f"| {r.model} | {r.method} | {r.precision} | {r.weight_dtypes} | {r.trainable_params:,} | "
                     f"{r.cpu_ms:,.0f} ({r.cpu_q1_ms:,.0f}–{r.cpu_q3_ms:,.0f}) | {cpu_ratio} | {r.step_ms:,.0f} | "
                     f"{wall_ratio} | {r.tokens_per_cpu_s:,.0f} | {r.peak_mib:,.1f} | {r.step_alloc_mib:,.1f} |")
    return "\n".join(lines)


def machine() -> dict[str, str]:
    """The CPU, its bf16 flags, torch's threads and what oneDNN says, and the versions."""
    import importlib.metadata

    cpu, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        flags = set(text.split())
        cpu = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), cpu)
    info = {"cpu": cpu, "cpu_count": str(os.cpu_count()),
            "avx512_bf16": str("avx512_bf16" in flags), "amx_bf16": str("amx_bf16" in flags),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": str(torch.get_num_threads())}
    with contextlib.suppress(Exception):
        info["onednn_bf16"] = str(bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    info["python"] = platform.python_version()
    for package in ("torch", "transformers", "peft", "accelerate"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[package] = importlib.metadata.version(package)
    return info


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help=f"comma-separated from {','.join(MODELS)} (default: minilm,124m)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated from full,lora (default both)")
    parser.add_argument("--batch", type=int, default=16, help="sequences per batch (default 16)")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence (default 64)")
    parser.add_argument("--steps", type=int, help="at most this many timed rounds (one step per side) per "
                        "configuration (default 5; 3 with --quick)")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="seconds for the whole run, shared by the configurations (default 300); each still "
                        "runs one warm-up and one timed round")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 with --quick)")
    parser.add_argument("--csv", type=Path, help="CSV output (default bench/precision.csv; none with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny GPT-2, batch 2 x 32, 3 steps, 1 thread")
    args = parser.parse_args(argv)
    if args.quick:
        args.models = args.models or "tiny"
        args.batch, args.seq = (2, 32) if (args.batch, args.seq) == (16, 64) else (args.batch, args.seq)
        args.threads = args.threads or 1
    args.steps = args.steps or (3 if args.quick else 5)
    args.models = [m.strip() for m in (args.models or "minilm,124m").split(",")]
    args.methods = [m.strip() for m in args.methods.split(",")]
    for name, given, allowed in (("model", args.models, MODELS), ("method", args.methods, METHODS)):
        unknown = [g for g in given if g not in allowed]
        if unknown:
            parser.error(f"unknown {name}(s) {unknown}; choose from {', '.join(allowed)}")
    if args.csv is None and not args.quick:
        args.csv = REPO / "bench" / "precision.csv"
    return args


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = machine()
    command = "python -m bench.precision " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"# {command}")
    print("# " + ", ".join(f"{k}={v}" for k, v in env.items()))
    rows: list[Row] = []
    started = time.perf_counter()
    configurations = [(model, method) for model in args.models for method in args.methods]
    with tempfile.TemporaryDirectory(prefix="peft-precision-") as workdir:
        for index, (model, method) in enumerate(configurations):
            share = (args.budget_s - (time.perf_counter() - started)) / (len(configurations) - index)
            new = benchmark(model, method, Spec(model, args.batch, args.seq), args.steps, share, Path(workdir))
            rows += new
            print(markdown_table(new), flush=True)
            if args.csv:
                write_csv(rows, args.csv, env | {"command": command})
    print()
    print(f"CPU, batch {args.batch} x {args.seq} tokens, one warm-up round then up to {args.steps} timed rounds per "
          f"configuration (budget {args.budget_s:g} s), fp32 and bf16 interleaved (ABBA), {env['torch_threads']} "
          f"thread(s); {time.perf_counter() - started:.0f} s")
    print(markdown_table(rows))
    if args.csv:
        print(f"\nwrote {args.csv}")
    return rows


if __name__ == "__main__":
    main()
