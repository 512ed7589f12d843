"""CPU throughput: one process with 2 threads against 2 data parallel processes with 1 thread each.

On a 2-core machine both set-ups use both cores; the question is which uses them better for the ``cpu`` profile
(MiniLM, global batch 16, max length 64): one process whose matmuls are split across 2 threads, or 2 processes
(``accelerate launch --multi_gpu --num_processes 2``, gloo) that each compute half of every batch with 1 thread and
all-reduce their gradients once per step. Both train the same rows with the same global batch, so their records
are comparable step for step.

Throughput is ``samples_per_s`` of the run records (training only: evaluation, model loading and process start
are outside it). Rounds are interleaved (1 process first, then 2, reversed the next round) so that drift on a shared
machine hits both alike; the script prints per method the median ratio (2 processes / 1 process) and its range.

    python -m bench.processes                       # 3 rounds x lora, full on 2,000 rows
    python -m bench.processes --rounds 1 --methods lora --train-size 480   # a quick check
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from peft_utils.store import RunStore

REPO = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def samples_per_s(method: str, processes: int, train_size: int) -> float:
    """One fresh run of the CLI; its record's training throughput (rows per second)."""
    threads = 2 // processes
    with tempfile.TemporaryDirectory() as results:
        prefix = LAUNCH if processes == 2 else [sys.executable]
        command = prefix + ["-m", "peft_utils.experiment", "--profile", "cpu", "--methods", method, "--no-sweep",
                            "--train-size", str(train_size), "--eval-size", "64", "--results-dir", results]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PEFT_LAB_PROGRESS": "off"}
        subprocess.run(command, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return float(RunStore(results).summary()["samples_per_s"].iloc[0])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["lora", "full"])
    parser.add_argument("--train-size", type=int, default=2000)
    args = parser.parse_args(argv)
    rows = []
    for method in args.methods:
        one, two = [], []
        for round_ in range(args.rounds):
            order = (1, 2) if round_ % 2 == 0 else (2, 1)
            measured = {p: samples_per_s(method, p, args.train_size) for p in order}
            one.append(measured[1])
            two.append(measured[2])
            print(f"{method} round {round_}: 1x2 threads {measured[1]:.1f} rows/s, 2x1 thread {measured[2]:.1f} rows/s",
                  flush=True)
        ratios = [b / a for a, b in zip(one, two)]
        rows.append((method, statistics.median(one), statistics.median(two), statistics.median(ratios),
                     min(ratios), max(ratios)))
    print("\n| method | 1 process x 2 threads (rows/s) | 2 processes x 1 thread (rows/s) | ratio 2p/1p (range) |")
    print("|---|---:|---:|---|")
    for method, one, two, ratio, low, high in rows:
        print(f"| {method} | {one:.1f} | {two:.1f} | {ratio:.2f} ({low:.2f}-{high:.2f}) |")


if __name__ == "__main__":
    main()
