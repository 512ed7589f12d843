"""Step time, tokens/s, TFLOP/s and peak memory: full fine-tuning vs our LoRA / DoRA / QLoRA vs peft's.

    python -m bench.step_time                        # CPU: GPT-2 124M-sized (random weights), batch 4 x 64 tokens
    python -m bench.step_time --models 124m,minilm   # several model configs in one run
    python -m bench.step_time --quick                # smoke test: tiny GPT-2, a few steps (CI; asserts no timings)
    python -m bench.step_time --device cuda --peak-tflops 989   # GPU: GPT-2 Large-sized, batch 16 x 64, bf16 autocast

A *step* is forward + backward + AdamW step + zero_grad. Each ours/peft pair gets the same base model, targets, rank,
alpha, dropout and dtype, and the two are timed step by step in alternation (ABBA order), so that drift on a shared
machine hits both alike; "ours/peft" is the median of the per-round ratios (with their interquartile range).

Peak memory = resident bytes of the model's own tensors (weights, buffers, optimizer state; gradients are freed
between steps) + the peak of what one step allocates on top of them:
  * CUDA: ``max_memory_allocated() - memory_allocated()`` around one step (so other models kept alive for
    interleaving do not count);
  * CPU: the running maximum of the PyTorch CPU allocator, replayed from the alloc/free events that
    ``torch.profiler.profile(profile_memory=True)`` records during one extra, untimed step. (``tracemalloc`` does not
    see torch's allocator, and RSS is blurred by malloc caching and by the other model kept alive for interleaving.)

TFLOP/s counts 6·N·tokens for full fine-tuning and 4·N·tokens for PEFT (forward 2N + the backward's input
gradients 2N; frozen weights get no weight gradients, and the rank-r adapter FLOPs are negligible), where N is the
number of non-embedding parameters; attention-score FLOPs are left out (small at 64 tokens).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/step_time.py` works as well as `python -m bench.step_time`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from peft_utils.core.inject import apply_adapters
from peft_utils.core.layers import is_conv1d
from peft_utils.models import GPT2_SHAPES, gpt2_config, load_model, random_gpt2, resolve_model_source

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
    detach_norm: bool = True

    @property
    def family(self) -> str:
        return "bert" if self.model == "minilm" else "gpt2"

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def target_modules(self) -> list[str]:
        return list(TARGETS[self.family, self.targets])

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "bf16" else torch.float32


# --------------------------------------------------------------------------------------------- models

def base_model(spec: Spec) -> nn.Module:
    """The full-precision base: a random GPT-2 of the named size, or the real all-MiniLM-L6-v2."""
    if spec.family == "gpt2":
        return random_gpt2(spec.model, seed=0)
    return load_model("minilm")[0]


def quantized_model(spec: Spec, workdir: Path) -> nn.Module:
    """The same base loaded in 4-bit NF4 through ``peft_utils.models.load_quantized`` (both QLoRA sides use it)."""
    from peft_utils.data import find_gpt2_tokenizer
    from peft_utils.models import load_quantized, save_random_gpt2

    if spec.family == "gpt2":
        source = workdir / f"gpt2-{spec.model}"
        if not source.exists():
            save_random_gpt2(source, find_gpt2_tokenizer(REPO.parent / "shared" / "data"), spec.model)
    else:
        source = "minilm"
    device = torch.device(spec.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    model, _ = load_quantized(str(source), compute_dtype=spec.compute_dtype, device_map={"": str(device)})
    return model


def non_embedding_parameters(spec: Spec) -> int:
    """N in the 6·N·tokens rule: every parameter outside the embeddings (built on the meta device: no memory)."""
    if spec.family == "gpt2":
        from transformers import GPT2ForSequenceClassification

        with torch.device("meta"):
            model = GPT2ForSequenceClassification(gpt2_config(spec.model))
    else:
        from transformers import AutoConfig, AutoModelForSequenceClassification

        config = AutoConfig.from_pretrained(resolve_model_source("minilm"), num_labels=2)
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config)
    embedding = sum(p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
    return sum(p.numel() for p in model.parameters()) - embedding


def with_adapters(model: nn.Module, method: str, impl: str, spec: Spec) -> nn.Module:
    """Our adapters or peft's, with the same targets, rank, alpha and dropout; the head stays trainable in both."""
    kind = "dora" if method == "dora" else "lora"
    if impl == "ours":
        return apply_adapters(
            model, kind, spec.target_modules, spec.rank, spec.alpha, spec.dropout, detach_norm=spec.detach_norm
        )
    import peft

    config = peft.LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=spec.target_modules,
        use_dora=kind == "dora", fan_in_fan_out=any(is_conv1d(m) for m in model.modules()),
        modules_to_save=[HEADS[spec.family]],
    )
    return peft.get_peft_model(model, config)


def build(method: str, impl: str, spec: Spec, workdir: Path) -> nn.Module:
    if method == "full":
        return base_model(spec).requires_grad_(True)
    model = quantized_model(spec, workdir) if method == "qlora" else base_model(spec)
    return with_adapters(model, method, impl, spec)


def make_inputs(spec: Spec, vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    high = min(vocab_size, 50000)  # below GPT-2's pad/EOS id, so every row is classified from its last token
    ids = torch.randint(1000, high, (spec.batch, spec.seq), generator=generator)
    return {
        "input_ids": ids.to(spec.device),
        "attention_mask": torch.ones_like(ids).to(spec.device),
        "labels": torch.randint(0, 2, (spec.batch,), generator=generator).to(spec.device),
    }


# --------------------------------------------------------------------------------------------- timing

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
        synchronize(self.spec.device)
        start = time.perf_counter()
        self.step()
        synchronize(self.spec.device)
        return time.perf_counter() - start


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


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


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


# --------------------------------------------------------------------------------------------- memory

def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the distinct storages behind the model's parameters and buffers and the optimizer's state."""
    tensors = [*model.parameters(), *model.buffers()]
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    storages = {}
    for tensor in tensors:
        if tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def allocation_profile(fn, device: str) -> tuple[int, int]:
    """(peak, net) bytes allocated by ``fn()`` above what was allocated when it started (see the module docstring).

    ``net`` is what is still allocated when ``fn`` returns (for a forward pass: the activations kept for backward).
    """
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, torch.cuda.memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for _, nbytes in sorted(events, key=lambda event: event[0]):
        live += nbytes
        peak = max(peak, live)
    return peak, live


def measure_memory(runner: Runner) -> tuple[int, int]:
    """(peak bytes of a training step including the model's resident tensors, the step's own peak on top)."""
    runner.optimizer.zero_grad(set_to_none=True)
    step_peak, _ = allocation_profile(runner.step, runner.spec.device)
    return resident_bytes(runner.model, runner.optimizer) + step_peak, step_peak


# --------------------------------------------------------------------------------------------- rows

@dataclass
class Row:
    model: str
    device: str
    dtype: str
    batch: int
    seq: int
    rank: int
    targets: str
    method: str
    impl: str
    trainable_params: int
    steps: int
    step_ms: float
    q1_ms: float
    q3_ms: float
    ours_over_peft: float | None
    ratio_q1: float | None
    ratio_q3: float | None
    tokens_per_s: float
    peak_mib: float
    step_alloc_mib: float
    tflops: float
    peak_fraction: float | None


def make_row(runner: Runner, method: str, impl: str, spec: Spec, n_params: int, memory: tuple[int, int],
             peak_tflops: float | None, ratios: list[float] | None) -> Row:
    q1, median, q3 = quartiles(runner.times)
    r1, ratio, r3 = quartiles(ratios) if ratios else (None, None, None)
    flops = (6 if method == "full" else 4) * n_params * spec.tokens
    tflops = flops / median / 1e12
    return Row(
        spec.model, spec.device, spec.dtype, spec.batch, spec.seq, spec.rank, spec.targets, method, impl,
        runner.trainable, len(runner.times), median * 1e3, q1 * 1e3, q3 * 1e3, ratio, r1, r3,
        spec.tokens / median, memory[0] / MIB, memory[1] / MIB, tflops,
        tflops / peak_tflops if peak_tflops else None,
    )


def markdown_table(rows: list[Row]) -> str:
    header = (
        "| model | method | impl | trainable | step ms (median) | IQR ms | ours/peft (IQR) | tokens/s "
        "| peak MiB | step alloc MiB | TFLOP/s |"
    )
    has_peak = any(r.peak_fraction is not None for r in rows)
    if has_peak:
        header += " % of peak |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        ratio = f"{r.ours_over_peft:.3f} ({r.ratio_q1:.3f}–{r.ratio_q3:.3f})" if r.ours_over_peft is not None else ""
        line = (
            f"| {r.model} | {r.method} | {r.impl} | {r.trainable_params:,} | {r.step_ms:.1f} | "
            f"{r.q1_ms:.1f}–{r.q3_ms:.1f} | {ratio} | {r.tokens_per_s:,.0f} | {r.peak_mib:,.1f} | "
            f"{r.step_alloc_mib:,.1f} | {r.tflops:.3f} |"
        )
        if has_peak:
            line += f" {100 * r.peak_fraction:.1f} |" if r.peak_fraction is not None else " |"
        lines.append(line)
    return "\n".join(lines)


def write_csv(rows: Sequence[Any], path: Path, environment: dict[str, str]) -> None:
    """One CSV line per dataclass row (any bench's ``Row``), with the run's environment in extra columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = ([f.name for f in fields(rows[0])] if rows else []) + list(environment)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row) | environment)


def environment(device: str) -> dict[str, str]:
    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu, "cpu_count": str(os.cpu_count()), "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
    }
    with contextlib.suppress(ImportError):
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


# --------------------------------------------------------------------------------------------- driver

def quant_available() -> str | None:
    """None when the 4-bit path can run here, otherwise why not."""
    try:
        import bitsandbytes  # noqa: F401

        from peft_utils.models import load_quantized  # noqa: F401
    except ImportError as error:
        return str(error)
    return None


def benchmark(spec: Spec, methods: list[str], steps: int, warmup: int, peak_tflops: float | None,
              workdir: Path, log=print) -> list[Row]:
    n_params = non_embedding_parameters(spec)
    rows = []
    for method in methods:
        if method == "qlora" and (reason := quant_available()):
            log(f"skipping qlora: {reason}")
            continue
        impls = ["-"] if method == "full" else ["ours", "peft"]
        torch.manual_seed(0)
        runners = [Runner(f"{method}/{impl}", build(method, impl, spec, workdir), spec) for impl in impls]
        start = time.perf_counter()
        interleave(runners, steps, warmup)
        memories = [measure_memory(r) for r in runners]
        ratios = None
        if len(runners) == 2:
            ratios = [a / b for a, b in zip(runners[0].times, runners[1].times)]
        for runner, impl, memory in zip(runners, impls, memories):
            rows.append(make_row(runner, method, impl, spec, n_params, memory, peak_tflops,
                                 ratios if impl == "ours" else None))
        log(f"  {spec.model} {method}: {time.perf_counter() - start:.0f}s")
        del runners
        gc.collect()
        if spec.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--models", help=f"comma-separated from {','.join(MODELS)} (default: 124m on CPU, large on CUDA)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated from " + ",".join(METHODS))
    parser.add_argument("--batch", type=int, help="sequences per batch (default: 4 on CPU, 16 on CUDA)")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence (default: 64)")
    parser.add_argument("--steps", type=int, help="timed steps per model (default: 20; 5 with --quick)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 3; 1 with --quick)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--dropout", type=float, default=0.0, help="adapter dropout (default 0: DoRA reuses the base GEMM)")
    parser.add_argument("--targets", choices=("all", "attn"), default="all",
                        help="all: every linear layer of each block; attn: c_attn (GPT-2) / query+value (BERT)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), help="bf16 = bf16 autocast (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s, to report the achieved fraction")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--csv", type=Path, help="CSV output (default: bench/results.csv; bench/results-quick.csv with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny GPT-2, batch 2 x 32, 5 steps, 1 thread")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    if args.quick:
        args.models = args.models or "tiny"
        args.batch = args.batch or 2
        args.seq = 32 if args.seq == 64 else args.seq
        args.steps = args.steps or 5
        args.warmup = 1 if args.warmup is None else args.warmup
        args.threads = args.threads or 1  # tiny matrices gain nothing from threads, and a shared CPU stalls them
    args.models = [m.strip() for m in (args.models or ("large" if cuda else "124m")).split(",")]
    args.methods = [m.strip() for m in args.methods.split(",")]
    for name, given, allowed in (("model", args.models, MODELS), ("method", args.methods, METHODS)):
        unknown = [g for g in given if g not in allowed]
        if unknown:
            parser.error(f"unknown {name}(s) {unknown}; choose from {', '.join(allowed)}")
    args.batch = args.batch or (16 if cuda else 4)
    args.steps = args.steps or 20
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
    print(f"# {command}")
    print("# " + ", ".join(f"{k}={v}" for k, v in env.items()))
    rows = []
    with tempfile.TemporaryDirectory(prefix="peft-bench-") as workdir:
        for model in args.models:
            spec = Spec(model, args.batch, args.seq, args.rank, args.alpha, args.dropout, args.targets,
                        args.device, args.dtype)
            rows += benchmark(spec, args.methods, args.steps, args.warmup, args.peak_tflops, Path(workdir))
    print()
    print(f"{args.device}, {args.dtype}, batch {args.batch} x {args.seq} tokens, rank {args.rank}, "
          f"targets {args.targets}, {args.steps} timed steps after {args.warmup} warm-up")
    print(markdown_table(rows))
    write_csv(rows, args.csv, env | {"command": command})
    print(f"\nwrote {args.csv}")
    return rows


if __name__ == "__main__":
    main()
