"""Data parallel training on CPU processes (gloo): ``accelerate launch --num_processes 2`` against one process.

Both runs use the same global batch (8 rows: 2 processes x 4), the tiny random GPT-2 with dropout 0 (its own
dropout too: each process draws its own masks, so dropout would make the runs differ by design), a train size
whose last batch is short (36 rows -> 4 full batches and one of 4) and an odd number of dev rows (31), so the
sharding of a short batch and the exactly-once evaluation are exercised.

Tolerance: the two runs compute the same mean loss and gradient, but not in the same order (two per-process sums
all-reduced, against one sum), so float32 rounding differs in the last bits and may grow through the optimiser
steps; 1e-5 on losses of ~0.7 is ~100x the drift measured here (<= 1.2e-7 over the 5 steps) and far below what a
wrong weighting, a repeated or dropped row, or a different data order produces (>= 1e-3 on this data).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import json
import math
import shutil

import pytest

from peft_utils.models import resolve_model_source
from peft_utils.store import RunStore, read_events

METHODS = ("full", "lora", "dora", "qlora")
ARGS = ["--profile", "smoke", "--no-sweep", "--no-figures", "--methods", *METHODS, "--train-size", "36",
        "--eval-size", "31", "--batch-size", "8", "--dropout", "0"]


def _model_without_dropout(folder: Path, sst2_dir: Path) -> Path:
    """The smoke profile's random GPT-2 with every dropout probability set to 0 in its config."""
    shutil.copytree(resolve_model_source("random-gpt2-tiny", sst2_dir), folder)
    config = json.loads((folder / "config.json").read_text())
    config.update({k: 0.0 for k in config if k.endswith("pdrop") or k == "summary_first_dropout"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _experiment(results: Path, processes: int, sst2_dir: Path, model: Path, args: list[str] = ARGS) -> None:
    if processes == 1:
        command = [sys.executable, "-m", "peft_utils.experiment"]
    else:
        # accelerate's multi-process launcher (torch elastic); without a GPU the processes join over gloo.
        # (``--cpu`` would pick its single-process launcher.)
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "-m", "peft_utils.experiment"]
    # CPU processes on any machine: with one GPU, two processes would both claim it (NCCL refuses).
    env = {**os.environ, "PEFT_LAB_PROGRESS": "off", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command + args + ["--model", str(model), "--data-dir", str(sst2_dir),
                                            "--results-dir", str(results)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory, sst2_dir):
    model = _model_without_dropout(tmp_path_factory.mktemp("model") / "gpt2-tiny-no-dropout", sst2_dir)
    folders = {n: tmp_path_factory.mktemp(f"processes{n}") for n in (1, 2)}
    for processes, folder in folders.items():
        _experiment(folder, processes, sst2_dir, model)
    return folders


def _losses(folder: Path, run_id: str) -> list[float]:
    return [e["loss"] for e in read_events(folder / f"{run_id}.jsonl") if e["event"] == "step"]


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_match_one(one_and_two, method):
    one, two = (RunStore(one_and_two[n]).summary() for n in (1, 2))
    run_id = next(r for r in one["run_id"] if f"-{method}-" in r)
    single, double = _losses(one_and_two[1], run_id), _losses(one_and_two[2], run_id)
    assert len(single) == len(double) == 5  # 36 rows in global batches of 8: 4 full and one of 4
    assert double == pytest.approx(single, abs=1e-5)
    row = two.set_index("run_id").loc[run_id]
    assert row["n_eval"] == 31 and len(row["dev_predictions"]) == 31  # every dev row once, not 32
    assert (row["num_processes"], row["per_device_batch_size"], row["global_batch_size"]) == (2, 4, 8)
    reference = one.set_index("run_id").loc[run_id]
    assert row["final_accuracy"] == pytest.approx(reference["final_accuracy"], abs=1 / 31 + 1e-9)


def test_one_record_per_run(one_and_two):
    records = sorted(p.name for p in one_and_two[2].glob("*.jsonl"))
    assert records == sorted(p.name for p in one_and_two[1].glob("*.jsonl"))
    assert len(records) == len(METHODS)
    assert not (one_and_two[2] / "imgs").exists()  # --no-figures: the records only


def test_a_global_batch_that_does_not_split_is_refused_before_training(tmp_path, sst2_dir):
    command = [sys.executable, "-m", "peft_utils.experiment"] + ARGS[:-4] + ["--batch-size", "6",
                                                                             "--grad-accum-steps", "4"]
    done = subprocess.run(command + ["--data-dir", str(sst2_dir), "--results-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: batch_size=6 (the global batch) does not divide into 1 process(es) x 4 accumulation step(s); "
        "choose a multiple of 4")
    assert not list(tmp_path.glob("*.jsonl"))


# bf16 autocast in two processes, every method, on data a tiny random GPT-2 learns in a few steps (the label is
# the sentiment of the last word), written as SST-2 files: the GPU's mixed-precision path, run on the CPU.
BF16_ARGS = ["--profile", "smoke", "--no-sweep", "--no-figures", "--methods", "full", "lora", "dora", "qlora", "qdora",
             "--precision", "bf16", "--epochs", "3", "--batch-size", "8", "--dropout", "0", "--train-size", "48",
             "--eval-size", "12", "--lr", "full=1e-3", "lora=1e-2", "dora=1e-2", "qlora=1e-2", "qdora=1e-2"]
WORDS = {1: ("great", "good", "superb", "lovely", "brilliant", "wonderful"),
         0: ("bad", "awful", "dreadful", "boring", "terrible", "poor")}


def _rule_data(folder: Path) -> Path:
    rows = [f"the film was {word}\t{label}" for label, words in WORDS.items() for word in words]
    folder.mkdir(parents=True)
    for name, repeats in (("train.tsv", 4), ("dev.tsv", 1)):
        (folder / name).write_text("sentence\tlabel\n" + "\n".join(rows * repeats) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def bf16_in_two_processes(tmp_path_factory, sst2_dir):
    model = _model_without_dropout(tmp_path_factory.mktemp("model") / "gpt2-tiny-no-dropout", sst2_dir)
    data = _rule_data(tmp_path_factory.mktemp("data") / "sst2")
    results = tmp_path_factory.mktemp("bf16")
    _experiment(results, 2, data, model, BF16_ARGS)
    return results


@pytest.mark.parametrize("method", ["full", "lora", "dora", "qlora", "qdora"])
def test_every_method_trains_under_bf16_in_two_processes(bf16_in_two_processes, method):
    row = RunStore(bf16_in_two_processes).summary().set_index("method").loc[method]
    losses = _losses(bf16_in_two_processes, row["run_id"])
    assert len(losses) == 18 and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, f"{method}: the loss did not fall ({losses})"
    assert (row["precision"], row["compute_dtype"], row["mixed_precision"], row["num_processes"]) == (
        "bf16", "bfloat16", "bf16", 2)
    assert row["skipped_steps"] == 0
