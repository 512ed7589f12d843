"""DoRA's activation and peak memory: ours with the norm detached (the paper's §4.3 and peft's default) or not,
against peft's DoRA, with LoRA (ours and peft's) as the floor.

    python -m bench.dora_memory                       # CPU: GPT-2 124M-sized, batch 4 x 64, all linear layers
    python -m bench.dora_memory --device cuda --models large --batch 16

Per variant: the bytes the forward pass allocates and still holds when it returns (the activations kept for
backward, from the same allocator accounting as the peaks), the peak
a training step allocates above the model's resident tensors and the resulting peak (both measured as in
``bench.step_time``), and the step time (all variants interleaved; ratio = median of per-round ratios vs peft DoRA).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import gc
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.step_time import (
    MIB, MODELS, REPO, Runner, Spec, allocation_profile, build, environment, interleave, measure_memory, quartiles,
)

# (label, method, impl, detach_norm)
VARIANTS = (
    ("dora ours, norm detached", "dora", "ours", True),
    ("dora ours, norm not detached", "dora", "ours", False),
    ("dora peft (detached)", "dora", "peft", True),
    ("lora ours", "lora", "ours", True),
    ("lora peft", "lora", "peft", True),
)
REFERENCE = "dora peft (detached)"


def forward_held_bytes(runner: Runner) -> int:
    """Bytes the forward pass allocates and still holds when it returns: the activations kept for backward."""
    runner.optimizer.zero_grad(set_to_none=True)
    losses = []

    def forward() -> None:
        with runner.autocast():
            losses.append(runner.model(**runner.inputs).loss)

    _, held = allocation_profile(forward, runner.spec.device)
    losses.pop().backward()
    runner.optimizer.zero_grad(set_to_none=True)
    return held


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default=None, help=f"comma-separated from {','.join(MODELS)} (default 124m; large on CUDA)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", choices=("all", "attn"), default="all")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant (default 8)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--dtype", choices=("fp32", "bf16"))
    parser.add_argument("--csv", type=Path, default=REPO / "bench" / "dora_memory.csv")
    parser.add_argument("--quick", action="store_true", help="tiny GPT-2, batch 2 x 32, 3 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batch, args.seq, args.steps, args.warmup = args.models or "tiny", 2, 32, 3, 1
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args


def measure_model(model_name: str, args: argparse.Namespace, workdir: Path) -> list[dict]:
    """Every variant on one model, stepped interleaved; one result row per variant."""
    spec = Spec(model_name.strip(), args.batch, args.seq, args.rank, 2.0 * args.rank, 0.0, args.targets,
                args.device, args.dtype)
    runners = {}
    for label, method, impl, detach in VARIANTS:
        torch.manual_seed(0)
        variant = dataclasses.replace(spec, detach_norm=detach)
        runners[label] = Runner(label, build(method, impl, variant, workdir), variant)
    interleave(list(runners.values()), args.steps, args.warmup)
    reference = runners[REFERENCE].times
    results = []
    for label, runner in runners.items():
        peak, step_peak = measure_memory(runner)
        ratios = [a / b for a, b in zip(runner.times, reference)]
        results.append({
            "model": spec.model, "device": spec.device, "dtype": spec.dtype, "batch": spec.batch,
            "seq": spec.seq, "rank": spec.rank, "targets": spec.targets, "variant": label,
            "forward_held_mib": forward_held_bytes(runner) / MIB,
            "step_alloc_mib": step_peak / MIB, "peak_mib": peak / MIB,
            "step_ms": quartiles(runner.times)[1] * 1e3, "time_vs_peft_dora": quartiles(ratios)[1],
        })
    return results


def report(results: list[dict], args: argparse.Namespace, env: dict, command: str) -> None:
    """Print the table and write the CSV (every row with the environment and the command)."""
    print(f"\n{args.device}, {args.dtype}, batch {args.batch} x {args.seq}, rank {args.rank}, targets {args.targets}, "
          f"{args.steps} interleaved steps per variant")
    print("| model | variant | held after forward MiB | step alloc MiB | peak MiB | step ms (median) | time vs peft DoRA |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['variant']} | {r['forward_held_mib']:,.1f} | {r['step_alloc_mib']:,.1f} | "
              f"{r['peak_mib']:,.1f} | {r['step_ms']:.1f} | {r['time_vs_peft_dora']:.3f} |")
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(results[0]) + list(env) + ["command"])
        writer.writeheader()
        for r in results:
            writer.writerow(r | env | {"command": command})
    print(f"\nwrote {args.csv}")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(args.device)
    command = "python -m bench.dora_memory " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"# {command}\n# " + ", ".join(f"{k}={v}" for k, v in env.items()))
    results = []
    with tempfile.TemporaryDirectory(prefix="peft-bench-") as workdir:
        for model_name in (args.models or ("large" if args.device.startswith("cuda") else "124m")).split(","):
            results += measure_model(model_name, args, Path(workdir))
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    report(results, args, env, command)
    return results


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
