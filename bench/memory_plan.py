"""The GPU memory planner's estimate against the peaks ``bench.step_time`` measured, and its GPT-2 Large decisions.

    python -m bench.memory_plan                  # estimates for the rows of bench/results.csv, then the GPU plans
    python -m bench.memory_plan --csv other.csv  # another step_time CSV (e.g. a GPU run's)

The measured peaks are ``bench.step_time``'s (resident model and optimizer tensors + the allocator's peak during one
step), so the estimate is made for the same setting: its optimizer (torch's default AdamW, the for-loop one on a
CPU), its targets, batch and dtype. Only our implementation's rows are compared (peft's layers keep other tensors).
The plans are ``plan_memory``'s choices for GPT-2 Large at batch 16 x 128 (and 16 x 512) tokens on three GPUs, given each GPU's
free memory after the CUDA context (assumed, not measured here).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.step_time import MIB, REPO, TARGETS, Spec
from peft_utils.config import TrainConfig
from peft_utils.memory_plan import estimate_memory, plan_memory
from peft_utils.models import gpt2_config, resolve_model_source

GIB = 2**30
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (label, compute dtype, free bytes): the card's memory less ~0.5-0.7 GiB of CUDA context. A T4 has no bf16 units.
GPUS = (
    ("T4 16 GB", torch.float16, int(15.0 * GIB)),
    ("A100 40 GB", torch.bfloat16, int(39.0 * GIB)),
    ("H100 80 GB", torch.bfloat16, int(78.5 * GIB)),
)
PLAN_METHODS = ("full", "lora", "dora", "qlora")


def model_config(model: str):
    if model == "minilm":
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(resolve_model_source("minilm"), num_labels=2)
    return gpt2_config(model)


def compare(csv_path: Path) -> list[str]:
    """Markdown rows: estimate vs measured for every row of our implementation in a ``bench.step_time`` CSV."""
    lines = ["| model | method | batch x seq | estimated peak MiB | measured peak MiB | error |", "|---|---|---|---|---|---|"]
    with csv_path.open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["impl"] == "peft":
                continue
            spec = Spec(row["model"], int(row["batch"]), int(row["seq"]), int(row["rank"]), targets=row["targets"],
                        device=row["device"], dtype=row["dtype"])
            estimate = estimate_memory(
                model_config(spec.model), row["method"], spec.batch, spec.seq, DTYPES[spec.dtype],
                rank=spec.rank, targets=list(TARGETS[spec.family, spec.targets]), device_type=spec.device.split(":")[0],
                optimizer="for-loop" if spec.device == "cpu" else "fused",
            )
            measured = float(row["peak_mib"]) * MIB
            lines.append(f"| {spec.model} | {row['method']} | {spec.batch} x {spec.seq} | {estimate.total / MIB:,.1f} "
                         f"| {measured / MIB:,.1f} | {estimate.total / measured - 1:+.1%} |")
    return lines


def plans(batch: int = 16, length: int = 128) -> list[str]:
    """Markdown rows: the planner's choice for GPT-2 Large on each GPU and method."""
    config = gpt2_config("large")
    lines = ["| GPU | method | micro-batch x accumulation | checkpointing | estimate GiB | decision |",
             "|---|---|---|---|---|---|"]
    for gpu, dtype, free in GPUS:
        for method in PLAN_METHODS:
            plan = plan_memory(config, method, TrainConfig(batch_size=batch, max_length=length), compute_dtype=dtype,
                               device_bytes=free, name="gpt2-large")
            lines.append(f"| {gpu} ({str(dtype).removeprefix('torch.')}) | {method} | {plan.per_device_batch} x "
                         f"{plan.grad_accum_steps} | {'on' if plan.gradient_checkpointing else 'off'} | "
                         f"{plan.estimate.total / GIB:.1f} | {plan.reason} |")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", type=Path, default=REPO / "bench" / "results.csv", help="a bench.step_time CSV")
    args = parser.parse_args(argv)
    print(f"Estimate vs measured ({args.csv.relative_to(REPO) if args.csv.is_relative_to(REPO) else args.csv}):\n")
    print("\n".join(compare(args.csv)))
    for length in (128, 512):
        print(f"\nGPT-2 Large, global batch 16 x {length} tokens:\n")
        print("\n".join(plans(length=length)))


if __name__ == "__main__":
    main()
