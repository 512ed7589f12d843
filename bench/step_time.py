"""Step time, tokens/s, TFLOP/s and peak memory: full fine-tuning vs our LoRA / DoRA / QLoRA vs peft's.

    python -m bench.step_time                        # CPU: GPT-2 124M-sized (random weights), batch 4 x 64 tokens
    python -m bench.step_time --models 124m,minilm   # several model configs in one run
    python -m bench.step_time --quick                # smoke test, tiny GPT-2 (make bench; asserts no timings)
    python -m bench.step_time --device cuda --peak-tflops 989   # GPU: GPT-2 Large-sized, batch 16 x 64, bf16 autocast

A *step* is forward + backward + AdamW step + zero_grad. Each ours/peft pair gets the same base model, targets, rank,
alpha, dropout and dtype, and the two are timed step by step in ABBA order, so that drift on a shared machine hits
both alike; "ours/peft" is the median of the per-round ratios (with their interquartile range).

Peak memory = resident bytes of the model's own tensors (weights, buffers, optimizer state) + the peak one step
allocates on top of them: on CUDA from ``max_memory_allocated``; on a CPU replayed from the allocator events that
``torch.profiler`` records during one extra, untimed step (``tracemalloc`` does not see torch's allocator, and RSS is
blurred by malloc caching and by the other model kept alive for interleaving).

TFLOP/s counts 6·N·tokens for full fine-tuning and 4·N·tokens for PEFT (frozen weights get no weight gradients; the
rank-r adapters' FLOPs are negligible), N = non-embedding parameters; attention scores are left out.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

if __package__ in (None, ""):  # `python bench/step_time.py` works as well as `python -m bench.step_time`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from peft_utils.core.inject import apply_adapters
from peft_utils.core.layers import is_conv1d
from peft_utils.core.loop import synchronize
from peft_utils.devices import hardware_name, resolve_device
from peft_utils.models import GPT2_SHAPES, gpt2_config, load_model, random_gpt2, resolve_model_source
from peft_utils.train import installed_versions

REPO = Path(__file__).resolve().parents[1]
METHODS = ("full", "lora", "dora", "qlora")
MODELS = tuple(GPT2_SHAPES) + ("minilm",)
HEADS = {"gpt2": "score", "bert": "classifier"}
TARGETS = {  # "all": every linear layer of each block (as in the QLoRA paper); "attn": the LoRA paper's choice
    ("gpt2", "all"): ("c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    ("gpt2", "attn"): ("c_attn",),
    ("bert", "all"): ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
    ("bert", "attn"): ("query", "value"),
}
MIB = 2**20
T = TypeVar("T")


@dataclass(frozen=True)
class Spec:
    """One benchmark configuration: model, batch shape, adapter hyper-parameters, device and dtype."""

    model: str
    batch: int
    seq: int
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "all"
    device: str = "cpu"
    dtype: str = "fp32"  # "bf16" = bf16 autocast over fp32 weights (and bf16 compute for the 4-bit layers)

    @property
    def family(self) -> str:
        return "bert" if self.model == "minilm" else "gpt2"

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


# --------------------------------------------------------------------------------------------- models

def saved_gpt2(size: str, workdir: Path) -> Path:
    """A random GPT-2 of ``size`` saved once under ``workdir``: the 4-bit loader reads its weights from a folder."""
    from peft_utils.models import find_gpt2_tokenizer, save_random_gpt2

    folder = workdir / f"gpt2-{size}"
    if not folder.exists():
        save_random_gpt2(folder, find_gpt2_tokenizer(REPO.parent / "shared" / "data"), size)
    return folder


def base_model(spec: Spec, workdir: Path, quantized: bool) -> nn.Module:
    """The base: a random GPT-2 of the named size or the real all-MiniLM-L6-v2, in full precision or in 4-bit NF4
    through ``peft_utils.models.load_model`` (both QLoRA sides use it)."""
    if not quantized:
        return random_gpt2(spec.model, seed=0) if spec.family == "gpt2" else load_model("minilm")[0]
    source = saved_gpt2(spec.model, workdir) if spec.family == "gpt2" else "minilm"
    compute = torch.bfloat16 if spec.dtype == "bf16" else torch.float32
    return load_model(str(source), dtype=compute, quantized=True, device_map={"": str(resolve_device(spec.device))})[0]


def non_embedding_parameters(spec: Spec) -> int:
    """N in the 6·N·tokens rule: every parameter outside the embeddings (built on the meta device: no memory)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if spec.family == "gpt2":
        config = gpt2_config(spec.model)
    else:
        config = AutoConfig.from_pretrained(resolve_model_source("minilm"), num_labels=2)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    embedding = sum(p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
    return sum(p.numel() for p in model.parameters()) - embedding


def build(method: str, impl: str, spec: Spec, workdir: Path) -> nn.Module:
    """Full fine-tuning, or our adapters or peft's with the same targets, rank, alpha and dropout (head trainable)."""
    model = base_model(spec, workdir, quantized=method == "qlora")
    if method == "full":
        return model.requires_grad_(True)
    kind, targets = "dora" if method == "dora" else "lora", list(TARGETS[spec.family, spec.targets])
    if impl == "ours":
        return apply_adapters(model, kind, targets, spec.rank, spec.alpha, spec.dropout)
    import peft

    config = peft.LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
        use_dora=kind == "dora", fan_in_fan_out=any(is_conv1d(m) for m in model.modules()),
        modules_to_save=[HEADS[spec.family]],
    )
    return peft.get_peft_model(model, config)


def make_inputs(spec: Spec, vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    high = min(vocab_size, 50000)  # below GPT-2's pad/EOS id, so every row is classified from its last token
    ids = torch.randint(1000, high, (spec.batch, spec.seq), generator=generator)
    return {"input_ids": ids.to(spec.device), "attention_mask": torch.ones_like(ids).to(spec.device),
            "labels": torch.randint(0, 2, (spec.batch,), generator=generator).to(spec.device)}


# --------------------------------------------------------------------------------------------- timing

def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """``fn()`` and its wall seconds, read between device synchronisations (queued GPU work counts)."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


class Runner:
    """One model, its AdamW optimizer and its batch: ``step()`` is one training step."""

    def __init__(self, name: str, model: nn.Module, spec: Spec):
        self.name, self.spec = name, spec
        if not any(getattr(p, "quant_state", None) is not None for p in model.parameters()):
            model = model.to(spec.device)  # 4-bit models are placed by their loader
        self.model = model.train()
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        self.inputs = make_inputs(spec, model.config.vocab_size)
        self.times: list[float] = []

    def autocast(self):
        if self.spec.dtype == "bf16":
            return torch.autocast(device_type=self.spec.device.split(":")[0], dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self) -> None:
        with self.autocast():
            loss = self.model(**self.inputs).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed_step(self) -> float:
        return timed(self.step, torch.device(self.spec.device))[1]


def interleave(runners: list[Runner], steps: int, warmup: int) -> None:
    """Warm up, then time ``steps`` steps of each runner in ABBA order (A B, B A, A B, ...)."""
    for _ in range(warmup):
        for runner in runners:
            runner.step()
    gc.collect()
    gc.disable()  # a collection inside one side's step would be charged to that side only
    try:
        for i in range(steps):
            for runner in runners if i % 2 == 0 else runners[::-1]:
                runner.times.append(runner.timed_step())
    finally:
        gc.enable()


# --------------------------------------------------------------------------------------------- memory

def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the distinct storages behind the model's parameters and buffers and the optimizer's state."""
    tensors = [*model.parameters(), *model.buffers()]
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    storages = {(t.device, t.untyped_storage().data_ptr()): t.untyped_storage().nbytes()
                for t in tensors if t.device.type != "meta"}
    return sum(storages.values())


def allocation_profile(fn: Callable[[], Any], device: str) -> int:
    """Peak bytes allocated by ``fn()`` above what was allocated when it started (see the module docstring)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def measure_memory(runner: Runner) -> tuple[int, int]:
    """(peak bytes of a training step including the model's resident tensors, the step's own peak on top)."""
    runner.optimizer.zero_grad(set_to_none=True)
    step_peak = allocation_profile(runner.step, runner.spec.device)
    return resident_bytes(runner.model, runner.optimizer) + step_peak, step_peak


# --------------------------------------------------------------------------------------------- rows

Row = dict[str, Any]  # one runner's measurement: a CSV line


def make_row(runner: Runner, method: str, impl: str, n_params: int, memory: tuple[int, int],
             peak_tflops: float | None, ratios: list[float] | None) -> Row:
    spec = runner.spec
    q1, median, q3 = quartiles(runner.times)
    r1, ratio, r3 = quartiles(ratios) if ratios else (None, None, None)
    tflops = (6 if method == "full" else 4) * n_params * spec.tokens / median / 1e12
    return {"model": spec.model, "device": spec.device, "dtype": spec.dtype, "batch": spec.batch, "seq": spec.seq,
            "rank": spec.rank, "targets": spec.targets, "method": method, "impl": impl,
            "trainable_params": runner.trainable, "steps": len(runner.times), "step_ms": median * 1e3,
            "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3, "ours_over_peft": ratio, "ratio_q1": r1, "ratio_q3": r3,
            "tokens_per_s": spec.tokens / median, "peak_mib": memory[0] / MIB, "step_alloc_mib": memory[1] / MIB,
            "tflops": tflops, "peak_fraction": tflops / peak_tflops if peak_tflops else None}


def markdown_table(rows: list[Row]) -> str:
    lines = ["| model | method | impl | trainable | step ms (median) | IQR ms | ours/peft (IQR) | tokens/s | peak MiB "
             "| step alloc MiB | TFLOP/s | % of peak |", "|" + "---|" * 12]
    for r in rows:
        ratio = "" if r["ours_over_peft"] is None else \
            f"{r['ours_over_peft']:.3f} ({r['ratio_q1']:.3f}–{r['ratio_q3']:.3f})"
        peak = "" if r["peak_fraction"] is None else f"{100 * r['peak_fraction']:.1f}"
        lines.append(f"| {r['model']} | {r['method']} | {r['impl']} | {r['trainable_params']:,} | {r['step_ms']:.1f} | "
                     f"{r['q1_ms']:.1f}–{r['q3_ms']:.1f} | {ratio} | {r['tokens_per_s']:,.0f} | {r['peak_mib']:,.1f} | "
                     f"{r['step_alloc_mib']:,.1f} | {r['tflops']:.3f} | {peak} |")
    return "\n".join(lines)


def write_csv(rows: Sequence[Row], path: Path, environment: dict[str, str]) -> None:
    """One CSV line per row (any bench's), with the run's environment in extra columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = (list(rows[0]) if rows else []) + list(environment)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        for row in rows:
            writer.writerow(row | environment)


def environment(device: str) -> dict[str, str]:
    """What ran the steps and with which libraries: a timing compares only with timings of the same machine."""
    versions = {name: str(version) for name, version in installed_versions().items()}
    return {"hardware": hardware_name(torch.device(device)), "cpu_count": str(os.cpu_count()), **versions}


# --------------------------------------------------------------------------------------------- driver

def benchmark(spec: Spec, methods: list[str], steps: int, warmup: int, peak_tflops: float | None,
              workdir: Path, log=print) -> list[Row]:
    """Each method's runners (ours and peft's, or one for full fine-tuning) timed interleaved, then measured."""
    n_params = non_embedding_parameters(spec)
    rows = []
    for method in methods:
        impls = ["-"] if method == "full" else ["ours", "peft"]
        torch.manual_seed(0)
        runners = [Runner(f"{method}/{impl}", build(method, impl, spec, workdir), spec) for impl in impls]
        start = time.perf_counter()
        interleave(runners, steps, warmup)
        memories = [measure_memory(r) for r in runners]
        ratios = [a / b for a, b in zip(runners[0].times, runners[-1].times)] if len(runners) == 2 else None
        for runner, impl, memory in zip(runners, impls, memories):
            rows.append(make_row(runner, method, impl, n_params, memory, peak_tflops,
                                 ratios if impl == "ours" else None))
        log(f"  {spec.model} {method}: {time.perf_counter() - start:.0f}s")
        del runners
        gc.collect()
        if spec.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--models", help=f"comma-separated from {','.join(MODELS)} (default: 124m; large on CUDA)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated from " + ",".join(METHODS))
    parser.add_argument("--batch", type=int, help="sequences per batch (default: 4 on CPU, 16 on CUDA)")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence (default: 64)")
    parser.add_argument("--steps", type=int, help="timed steps per model (default: 20; 5 with --quick)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 3; 1 with --quick)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--dropout", type=float, default=0.0, help="default 0: DoRA reuses the base GEMM")
    parser.add_argument("--targets", choices=("all", "attn"), default="all",
                        help="all: every linear layer of each block; attn: c_attn (GPT-2) / query+value (BERT)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), help="bf16 autocast or not (default: bf16 on CUDA)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s, to report the achieved fraction")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--csv", type=Path, help="default: bench/results.csv (results-quick.csv with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny GPT-2, batch 2 x 32, 5 steps, 1 thread")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    if args.quick:
        args.models, args.batch = args.models or "tiny", args.batch or 2
        args.seq = 32 if args.seq == 64 else args.seq
        args.steps, args.warmup = args.steps or 5, 1 if args.warmup is None else args.warmup
        args.threads = args.threads or 1  # tiny matrices gain nothing from threads, and a shared CPU stalls them
    args.models = [m.strip() for m in (args.models or ("large" if cuda else "124m")).split(",")]
    args.methods = [m.strip() for m in args.methods.split(",")]
    for name, given, allowed in (("model", args.models, MODELS), ("method", args.methods, METHODS)):
        unknown = [g for g in given if g not in allowed]
        if unknown:
            parser.error(f"unknown {name}(s) {unknown}; choose from {', '.join(allowed)}")
    args.batch, args.steps = args.batch or (16 if cuda else 4), args.steps or 20
    args.warmup = 3 if args.warmup is None else args.warmup
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.csv = args.csv or REPO / "bench" / ("results-quick.csv" if args.quick else "results.csv")
    return args


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(args.device)
    command = "python -m bench.step_time " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"# {command}\n# " + ", ".join(f"{k}={v}" for k, v in env.items()))
    rows = []
    with tempfile.TemporaryDirectory(prefix="peft-bench-") as workdir:
        for model in args.models:
            spec = Spec(model, args.batch, args.seq, args.rank, args.alpha, args.dropout, args.targets,
                        args.device, args.dtype)
            rows += benchmark(spec, args.methods, args.steps, args.warmup, args.peak_tflops, Path(workdir))
    print(f"\n{args.device}, {args.dtype}, batch {args.batch} x {args.seq} tokens, rank {args.rank}, "
          f"targets {args.targets}, {args.steps} timed steps after {args.warmup} warm-up")
    print(markdown_table(rows))
    write_csv(rows, args.csv, env | {"command": command})
    print(f"\nwrote {args.csv}")
    return rows


if __name__ == "__main__":
    main()
