"""End to end: our CLI against Hugging Face ``Trainer`` + peft on the same rows, settings and machine.

``Trainer`` + peft is what a user would otherwise run, so it is the reference for the time column of the
comparison. Both sides train the ``cpu`` profile's rows (the same balanced subset, the whole dev set) with its
settings: MiniLM, batch 16, max length 64, 1 epoch, the profile's learning rate per method, weight decay 0.01,
6% linear warm-up then linear decay, clipping at 1.0, dynamic padding, length grouping, evaluation every 125 steps
and at the end. The reference keeps the libraries' defaults for everything else (its fused AdamW, its length-grouped
sampler, ``DataCollatorWithPadding``, its decay-parameter rule).

Each side runs in a fresh process, one method at a time, in interleaved rounds (ours then reference, then the
reverse order next round), so drift on a shared machine hits both sides alike. Per method the script prints the
median of the per-round ratios ours / reference with their range, and both sides' dev accuracies.

Train time = optimisation wall time without evaluation, on both sides:

- ours: ``train_time_s`` of the run record (the training clock pauses for every evaluation);
- reference: wall time from ``on_train_begin`` to ``on_train_end`` (a ``TrainerCallback``), minus the
  ``eval_runtime`` that ``Trainer.evaluate`` reports for each of its evaluations.

Model loading, tokenisation and process start are outside both. QLoRA: both sides load the same NF4 model through
``peft_utils.models.load_quantized`` (plain ``from_pretrained`` + bitsandbytes 0.50 repacks 4-bit weights in place for
CPU inference at the first evaluation, after which training fails; see ``core.quant.pin_4bit_layout``), and the reference
calls peft's ``prepare_model_for_kbit_training`` with ``use_gradient_checkpointing=False``, as the profile trains
without checkpointing.

    python -m bench.end_to_end                       # the cpu profile, 3 rounds x full, lora, dora, qlora
    python -m bench.end_to_end --train-size 480 --eval-size 128 --rounds 1 --methods lora   # a quick check
    python -m bench.end_to_end --summarise bench/end_to_end.jsonl   # the table of rounds recorded with --jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
METHODS = ("full", "lora", "dora", "qlora")
PROFILE = "cpu"
RESULT_PREFIX = "END_TO_END_RESULT "


# --------------------------------------------------------------------------------------------- one side, one run


def ours(method: str, train_size: int | None, eval_size: int | None) -> dict[str, Any]:
    """Our command line, exactly as a user runs it; the numbers come from the run record it writes."""
    with tempfile.TemporaryDirectory() as results:
        command = [sys.executable, "-m", "peft_utils.experiment", "--profile", PROFILE, "--methods", method,
                   "--no-sweep", "--results-dir", results]
        command += ["--train-size", str(train_size)] if train_size else []
        command += ["--eval-size", str(eval_size)] if eval_size else []
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        (record,) = Path(results).glob(f"comparison-{method}-*.jsonl")
        events = [json.loads(line) for line in record.read_text().splitlines()]
    summary = next(e for e in events if e["event"] == "summary")
    trainable = next(e for e in events if e["event"] == "config")["trainable_params"]
    return {"train_time_s": summary["train_time_s"], "accuracy": summary["final_accuracy"],
            "trainable_params": trainable, "process_s": wall}


def reference(method: str, train_size: int | None, eval_size: int | None) -> dict[str, Any]:
    """``Trainer`` + peft in a fresh process (this file with ``--reference``); its last line carries the numbers."""
    command = [sys.executable, "-m", "bench.end_to_end", "--reference", method]
    command += ["--train-size", str(train_size)] if train_size else []
    command += ["--eval-size", str(eval_size)] if eval_size else []
    start = time.perf_counter()
    done = subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wall = time.perf_counter() - start
    line = next(l for l in reversed(done.stdout.splitlines()) if l.startswith(RESULT_PREFIX))
    return {**json.loads(line.removeprefix(RESULT_PREFIX)), "process_s": wall}


def _reference_model(method: str, settings: dict[str, Any]):
    """The model a peft user builds: the same pretrained MiniLM, peft's LoRA/DoRA on peft's default layers for
    BERT (query and value, the same as ours: ``core.targets.default_targets``), the head trained (``TaskType.SEQ_CLS``)."""
    import peft
    from transformers import AutoModelForSequenceClassification

    from peft_utils.models import configure_padding, load_quantized, load_tokenizer, resolve_model_source

    source = resolve_model_source(settings["model"])
    if method == "qlora":
        model, tokenizer = load_quantized(source, compute_dtype="float32")
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        tokenizer = load_tokenizer(source)
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
        configure_padding(tokenizer, model)
    if method == "full":
        return model, tokenizer
    config = peft.LoraConfig(
        task_type=peft.TaskType.SEQ_CLS, r=settings["rank"], lora_alpha=settings["alpha"],
        lora_dropout=settings["dropout"], use_dora=method == "dora",
    )
    return peft.get_peft_model(model, config), tokenizer


def run_reference(method: str, train_size: int | None, eval_size: int | None) -> dict[str, Any]:
    """One ``Trainer`` run with the profile's settings; returns train time (eval excluded) and dev accuracy."""
    import numpy as np
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments, set_seed

    from peft_utils.data import load_sst2
    from peft_utils.config import config_record, make_config
    from peft_utils.data import train_and_eval_rows

    config = make_config(PROFILE, train_size=train_size, eval_size=eval_size)
    settings = config_record(config)  # the flat parameter names: model, rank, batch_size, ...
    set_seed(0)  # adapter and head initialisation, as our CLI's seed 0
    model, tokenizer = _reference_model(method, settings)
    splits = load_sst2()
    train_frame, eval_frame = train_and_eval_rows(config, splits["train"], splits["dev"], seed=0)

    def dataset(frame) -> list[dict[str, Any]]:
        encoded = tokenizer(frame["sentence"].tolist(), truncation=True, max_length=settings["max_length"])
        return [{"input_ids": ids, "attention_mask": mask, "labels": label}
                for ids, mask, label in zip(encoded["input_ids"], encoded["attention_mask"], frame["label"].tolist())]

    class TrainClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.start

    def accuracy(prediction) -> dict[str, float]:
        return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}

    with tempfile.TemporaryDirectory() as output:
        args = TrainingArguments(
            output_dir=output, use_cpu=True, seed=0, num_train_epochs=settings["epochs"],
            per_device_train_batch_size=settings["batch_size"], per_device_eval_batch_size=2 * settings["batch_size"],
            learning_rate=config.method_lr(method), weight_decay=settings["weight_decay"],
            warmup_steps=settings["warmup_ratio"], max_grad_norm=settings["max_grad_norm"],
            train_sampling_strategy="group_by_length" if settings["bucket_by_length"] else "random",
            eval_strategy="steps", eval_steps=settings["eval_every"], logging_steps=settings["log_every"],
            save_strategy="no", report_to="none",
        )
        clock = TrainClock()
        trainer = Trainer(model=model, args=args, train_dataset=dataset(train_frame),
                          eval_dataset=dataset(eval_frame), data_collator=DataCollatorWithPadding(tokenizer),
                          compute_metrics=accuracy, callbacks=[clock])
        trainer.train()
        evals = [entry for entry in trainer.state.log_history if "eval_runtime" in entry]
        final = trainer.evaluate() if not evals or evals[-1]["step"] != trainer.state.global_step else evals[-1]
    eval_seconds = sum(entry["eval_runtime"] for entry in evals)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"train_time_s": clock.seconds - eval_seconds, "accuracy": final["eval_accuracy"],
            "eval_time_s": eval_seconds, "trainable_params": trainable,
            "fused_adamw": bool(trainer.optimizer.optimizer.defaults.get("fused"))}


# --------------------------------------------------------------------------------------------- the benchmark


def compare(methods: list[str], rounds: int, train_size: int | None, eval_size: int | None,
            jsonl: Path | None = None) -> list[dict[str, Any]]:
    """Interleaved rounds; the order of the two sides alternates between rounds (ABBA). Each finished pair is
    printed and appended to ``jsonl`` at once, so an interrupted benchmark keeps the rounds it completed."""
    rows = []
    for round_ in range(rounds):
        for method in methods:
            sides = [("ours", ours), ("reference", reference)]
            times = {}
            for side, run in sides if round_ % 2 == 0 else sides[::-1]:
                times[side] = run(method, train_size, eval_size)
            row = {"round": round_, "method": method, **{f"{side}_{key}": value for side, result in times.items()
                                                          for key, value in result.items()}}
            row["ratio"] = row["ours_train_time_s"] / row["reference_train_time_s"]
            print(json.dumps(row), flush=True)
            if jsonl is not None:
                with jsonl.open("a") as out:
                    out.write(json.dumps(row) + "\n")
            rows.append(row)
    return rows


def summarise(rows: list[dict[str, Any]]) -> str:
    """One markdown row per method: median ratio (min-max over rounds), median times, accuracies."""
    lines = ["| method | ours / reference, median (min-max) | ours train s | reference train s | ours acc | "
             "reference acc | rounds |", "|---|---|---|---|---|---|---|"]
    for method in dict.fromkeys(row["method"] for row in rows):
        mine = [row for row in rows if row["method"] == method]
        ratios = [row["ratio"] for row in mine]

        def median(key: str) -> float:
            return statistics.median(row[key] for row in mine)

        accuracies = {side: sorted({f"{row[side + '_accuracy']:.4f}" for row in mine})
                      for side in ("ours", "reference")}
        lines.append(
            f"| {method} | **{statistics.median(ratios):.3f}** ({min(ratios):.3f}-{max(ratios):.3f}) | "
            f"{median('ours_train_time_s'):.1f} | {median('reference_train_time_s'):.1f} | "
            f"{', '.join(accuracies['ours'])} | {', '.join(accuracies['reference'])} | {len(mine)} |"
        )
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.end_to_end", description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per method (default 3)")
    parser.add_argument("--train-size", type=int, help="train rows (default: the cpu profile's 4,000)")
    parser.add_argument("--eval-size", type=int, help="dev rows (default: the cpu profile's, all 872)")
    parser.add_argument("--jsonl", type=Path, help="also append every round's numbers to this file")
    parser.add_argument("--summarise", type=Path, metavar="JSONL", help="only print the table of recorded rounds")
    parser.add_argument("--reference", choices=METHODS, help=argparse.SUPPRESS)  # one reference run (subprocess)
    args = parser.parse_args(argv)
    if args.rounds <= 0:
        parser.error(f"--rounds must be positive, got {args.rounds}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.reference:
        print(RESULT_PREFIX + json.dumps(run_reference(args.reference, args.train_size, args.eval_size)))
        return 0
    if args.summarise:
        print(summarise([json.loads(line) for line in args.summarise.read_text().splitlines() if line.strip()]))
        return 0
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # both sides' processes inherit it (see experiment.py)
    print(summarise(compare(args.methods, args.rounds, args.train_size, args.eval_size, args.jsonl)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
