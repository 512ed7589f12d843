"""What NF4 alone costs a trained classifier: each committed LoRA and QLoRA adapter scored on a float32 base and on
the same base with its linear layers in NF4, on the dev rows its run was scored on.

    python -m bench.nf4_gap                          # results/cpu-fulltrain, every seed: bench/nf4_gap.md and .csv
    python -m bench.nf4_gap --seeds 0 --limit 64     # a quick look: 64 dev rows, one seed (no files unless asked)
    python -m bench.nf4_gap --results-dir results/cpu-fulltrain-all-linear --targets all-linear
                                                     # adapters on all linear layers: bench/nf4_gap-all-linear.md

Why: QLoRA ended below LoRA in a run where it also trained at another learning rate, so that run cannot say whether
the 4-bit frozen base or the rate costs the points. Three measurements of the base alone:

1. The pretrained body in float32 and in NF4 (double quantisation, float32 compute, as ``build_model`` gives
   ``qlora``) under one fresh head (copied): relative errors of the first token's final hidden state and of the
   head's input, the logits' difference over their RMS, and how many predictions agree.
2. Each LoRA adapter on its own float32 base (which must reproduce its record) and on the NF4 base.
3. Each QLoRA adapter on its own NF4 base (reproducing its record) and on the float32 base it was quantised from.

Adapters are loaded with ``checkpoints.load_adapters`` and scored by ``core.loop.evaluate`` over the loader their run
used, so on the own base accuracy, predictions and probabilities repeat the record (bit for bit on the CPU that
trained it). Accuracy differences are paired over sentences and seeds (``stats.paired_bootstrap``).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python bench/nf4_gap.py` works as well as `python -m bench.nf4_gap`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from bench.step_time import environment, write_csv
from peft_utils.checkpoints import load_adapters
from peft_utils.core.batches import encode, make_loader, row_order
from peft_utils.core.inject import kept_modules
from peft_utils.core.loop import Evaluation, evaluate, set_seed
from peft_utils.data import eval_rows, load_sst2
from peft_utils.formatting import format_paired_difference, format_points, format_seconds
from peft_utils.methods import get_method, targets_label
from peft_utils.models import load_frozen_base, load_tokenizer, resolve_model_source
from peft_utils.stats import PAIRED_RESAMPLES, paired_bootstrap, paired_differences
from peft_utils.store import COMPARISON_GROUP, RunStore

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results" / "cpu-fulltrain"
METHODS = ("lora", "qlora")
BASES = ("fp32", "nf4")
BASE_NAMES = {"fp32": "float32", "nf4": "NF4"}
FRESH_HEAD = "none"  # the "method" of part 1's classifier: the pretrained body with a fresh head, no adapter


# --------------------------------------------------------------------------------------------- the runs and rows


@dataclass(frozen=True)
class Run:
    """One committed comparison run: its record (config and summary fields in one dict) and its adapter folder."""

    run_id: str
    method: str
    seed: int
    folder: Path
    record: dict

    @property
    def own_base(self) -> str:
        """The base it trained on: NF4 for a quantised method (QLoRA), float32 otherwise."""
        return "nf4" if get_method(self.method).quantized else "fp32"


def committed_runs(results_dir: str | Path, methods: Sequence[str] = METHODS,
                   seeds: Sequence[int] | None = None, targets: str | None = None) -> list[Run]:
    """The complete comparison runs of ``methods`` and ``seeds`` (default all) in ``results_dir`` on one target set
    (as run ids name it; ``None``: the default), by method and seed, each with its adapter, scored in float32. One
    target set, because the tables pair LoRA with QLoRA by seed."""
    store = RunStore(results_dir)
    table = store.summary()
    chosen = ((table["group"] == COMPARISON_GROUP) & table["method"].isin(methods)
              & (table["targets"].map(targets_label) == targets_label(targets)))
    if seeds is not None:
        chosen &= table["seed"].isin(list(seeds))
    runs = [Run(r["run_id"], r["method"], int(r["seed"]), store.saved_dir(r["run_id"]), r.to_dict())
            for _, r in table[chosen].sort_values(["method", "seed"]).iterrows()]
    if not runs:
        raise ValueError(f"{results_dir}: no complete comparison run of {list(methods)} on targets "
                         f"{targets or 'default'} for seeds {seeds}")
    for run in runs:
        if run.record.get("compute_dtype") != "float32":
            raise ValueError(f"{run.run_id} computed in {run.record.get('compute_dtype')}; this bench compares "
                             "float32 with NF4 under float32 compute")
        if not (run.folder / "adapter_model.safetensors").is_file():
            raise FileNotFoundError(f"{run.folder}: no adapter saved beside the record of {run.run_id}")
    return runs


def dev_rows(record: dict, data_dir: str | Path | None, limit: int | None = None) -> pd.DataFrame:
    """The dev rows the run was scored on, checked against its record's labels; the first ``limit`` if given."""
    if record.get("dataset", "sst2") != "sst2":
        raise ValueError(f"{record['run_id']} was scored on {record['dataset']!r}; this bench reads SST-2")
    dev = load_sst2(data_dir)["dev"]
    size = int(record["eval_size"])
    rows = eval_rows(dev, size if size < len(dev) else None)
    if rows["label"].tolist() != list(record["eval_labels"]):
        raise ValueError(f"the dev rows of {data_dir or 'PEFT_LAB_DATA'} are not those {record['run_id']} was "
                         "scored on (their labels differ from its record's eval_labels)")
    return rows if limit is None else rows.iloc[:limit].reset_index(drop=True)


def eval_loader(rows: pd.DataFrame, tokenizer, record: dict) -> DataLoader:
    """The run's own evaluation loader (its tokens, batches and order: padding changes the last bits)."""
    encoded = encode(rows["sentence"].tolist(), rows["label"].tolist(), tokenizer, int(record["max_length"]))
    batch = record.get("eval_batch_size")
    batch = int(batch) if batch and not pd.isna(batch) else 2 * int(record["per_device_batch_size"])
    return make_loader(encoded, batch, tokenizer.pad_token_id, shuffle=False, seed=int(record["seed"]),
                       bucket_by_length=bool(record["bucket_by_length"]))


# --------------------------------------------------------------------------------------------- bases and scoring


def load_base(base: str, source: str, num_labels: int = 2) -> tuple[nn.Module, object]:
    """``(model, tokenizer)``: the pretrained classifier with its linear layers in float32 or in NF4 (as
    ``build_model`` prepares QLoRA's base), in eval mode, its fresh head seeded (part 1 repeats)."""
    if base not in BASES:
        raise ValueError(f"unknown base {base!r}; choose one of {BASES}")
    set_seed(0)
    model, tokenizer = load_frozen_base(source, base == "nf4", num_labels)
    return model.eval(), tokenizer


@dataclass(frozen=True)
class Outputs:
    """Per evaluation row, in row order: logits, the first token's final hidden state ([CLS] for BERT) and the head's
    input where it is one vector per row (BERT's pooled [CLS]; ``None`` for GPT-2's per-token head)."""

    logits: torch.Tensor
    first_token: torch.Tensor
    head_input: torch.Tensor | None


@dataclass(frozen=True)
class Scored:
    """One model's evaluation (the numbers a record keeps) with the outputs of the same forward passes."""

    evaluation: Evaluation
    outputs: Outputs


def head_module(model: nn.Module) -> nn.Module:
    """The classification head (``classifier`` / ``score``): the module adapters keep trainable."""
    return model.get_submodule(kept_modules(model, (), set())[0])


def _kept(tensor: torch.Tensor) -> torch.Tensor:
    """A captured output as float32 on the CPU, where the two bases' outputs meet."""
    return tensor.detach().float().cpu()


def score(model: nn.Module, loader: DataLoader) -> Scored:
    """``core.loop.evaluate`` (the records' numbers), with hooks keeping the outputs of the same forward passes."""
    captured: dict[str, list[torch.Tensor]] = {"logits": [], "first_token": [], "head_input": []}
    hooks = [
        model.register_forward_hook(lambda _m, _a, out: captured["logits"].append(_kept(out.logits))),
        model.base_model.register_forward_hook(
            lambda _m, _a, out: captured["first_token"].append(_kept(out[0][:, 0]))),
        head_module(model).register_forward_pre_hook(lambda _m, args: captured["head_input"].append(_kept(args[0]))),
    ]
    try:
        evaluation = evaluate(model, loader)
    finally:
        for hook in hooks:
            hook.remove()
    order = torch.tensor(row_order(loader))

    def in_row_order(parts: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.cat(parts)
        rows = torch.empty_like(stacked)
        rows[order] = stacked
        return rows

    per_row = all(part.dim() == 2 for part in captured["head_input"])
    return Scored(evaluation, Outputs(in_row_order(captured["logits"]), in_row_order(captured["first_token"]),
                                      in_row_order(captured["head_input"]) if per_row else None))


def score_adapter(run: Run, base: str, source: str, loader: DataLoader) -> Scored:
    """The run's adapter (peft format) loaded onto a fresh ``base`` and scored."""
    model, _ = load_base(base, source, len(run.record["labels"]))
    return score(load_adapters(model, run.folder), loader)


# --------------------------------------------------------------------------------------------- comparing


def relative_error(reference: torch.Tensor | None, other: torch.Tensor | None) -> tuple[float, float]:
    """Mean and max over rows of ||other - reference|| / ||reference|| (NaN when not measured)."""
    if reference is None or other is None:
        return float("nan"), float("nan")
    per_row = (other - reference).norm(dim=-1) / reference.norm(dim=-1)
    return float(per_row.mean()), float(per_row.max())


@dataclass
class Row:
    """One classifier on one base (a CSV row). ``*_rel``: against the same classifier on its own base (0 there);
    ``record_*``: the own-base evaluation against the run's record."""

    classifier: str
    method: str
    seed: int | None
    base: str
    own_base: str
    n: int
    accuracy: float
    agree: int
    logit_mean_rel: float
    logit_max_rel: float
    first_token_rel_mean: float
    first_token_rel_max: float
    head_input_rel_mean: float
    head_input_rel_max: float
    record_accuracy: float | None = None
    record_predictions_differ: int | None = None
    record_probability_max_diff: float | None = None


def compare(name: str, method: str, seed: int | None, base: str, own_base: str, own: Scored, other: Scored) -> Row:
    """``other`` against ``own`` (the same classifier on its own base): logits' difference over the own logits' RMS,
    relative errors of the hidden states, agreeing predictions."""
    scale = own.outputs.logits.pow(2).mean().sqrt()
    difference = (other.outputs.logits - own.outputs.logits).abs() / scale
    agree = int((np.array(other.evaluation.predictions) == np.array(own.evaluation.predictions)).sum())
    return Row(name, method, seed, base, own_base, other.evaluation.n, other.evaluation.accuracy, agree,
               float(difference.mean()), float(difference.max()),
               *relative_error(own.outputs.first_token, other.outputs.first_token),
               *relative_error(own.outputs.head_input, other.outputs.head_input))


def check_record(row: Row, scored: Scored, record: dict) -> Row:
    """Fill ``row``'s record columns: accuracy, differing predictions, largest probability difference."""
    n = scored.evaluation.n
    recorded = np.array(record["dev_predictions"][:n])
    row.record_accuracy = float(record["final_accuracy"])
    row.record_predictions_differ = int((np.array(scored.evaluation.predictions) != recorded).sum())
    probabilities = np.array(record["dev_probabilities"][:n], dtype=float)
    row.record_probability_max_diff = float(np.abs(np.array(scored.evaluation.probabilities) - probabilities).max())
    return row


def base_gap(source: str, rows: pd.DataFrame, record: dict) -> list[Row]:
    """Part 1: the pretrained body in float32 and in NF4 under one fresh head (float32's, copied)."""
    reference, tokenizer = load_base("fp32", source, len(record["labels"]))
    quantized, _ = load_base("nf4", source, len(record["labels"]))
    head_module(quantized).load_state_dict(head_module(reference).state_dict())
    loader = eval_loader(rows, tokenizer, record)
    own, other = score(reference, loader), score(quantized, loader)
    name = "pretrained body, fresh head"
    return [compare(name, FRESH_HEAD, None, base, "fp32", own, scored)
            for base, scored in (("fp32", own), ("nf4", other))]


@dataclass(frozen=True)
class AdapterResult:
    """One run on both bases: the two CSV rows (own base first) and each base's per-sentence correctness."""

    run: Run
    rows: list[Row]
    correct: dict[str, np.ndarray]


def adapter_gap(run: Run, source: str, data_dir: str | Path | None, limit: int | None) -> AdapterResult:
    """Parts 2 and 3 for one run: its adapter on its own base (checked against its record) and on the other."""
    rows = dev_rows(run.record, data_dir, limit)
    loader = eval_loader(rows, load_tokenizer(source), run.record)
    other_base = next(base for base in BASES if base != run.own_base)
    scored = {base: score_adapter(run, base, source, loader) for base in (run.own_base, other_base)}
    name = f"{run.method} s{run.seed}"
    table = [compare(name, run.method, run.seed, base, run.own_base, scored[run.own_base], scored[base])
             for base in (run.own_base, other_base)]
    check_record(table[0], scored[run.own_base], run.record)
    labels = rows["label"].to_numpy()
    return AdapterResult(run, table, {base: np.array(s.evaluation.predictions) == labels for base, s in scored.items()})


# --------------------------------------------------------------------------------------------- tables


def _ratio(mean: float, largest: float, digits: int = 3) -> str:
    return "n/a" if np.isnan(mean) else f"{mean:.{digits}f} / {largest:.{digits}f}"


def _paired(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[str, str]:
    """A minus B over the same sentences and seeds (bootstrap interval and p), and the counts of sentences each
    got right in more seeds."""
    differences = paired_differences(np.stack(a), np.stack(b))
    result = paired_bootstrap(np.stack(a), np.stack(b), PAIRED_RESAMPLES, seed=0)
    per_sentence = differences.mean(axis=0)
    return (format_paired_difference(*result), f"{(per_sentence < 0).sum()} / {(per_sentence > 0).sum()}")


def base_markdown(rows: list[Row], model: str) -> str:
    """Part 1 as a one-row table: the NF4 row (its columns compare it with the float32 one)."""
    nf4 = next(row for row in rows if row.base == "nf4")
    return "\n".join([
        "| model | dev rows | [CLS] hidden state: relative error, mean / max | pooled [CLS] (head input): relative "
        "error, mean / max | logits: abs. difference ÷ RMS, mean / max | predictions agree |",
        "|---|---:|---:|---:|---:|---:|",
        f"| {model} | {nf4.n} | {_ratio(nf4.first_token_rel_mean, nf4.first_token_rel_max)} | "
        f"{_ratio(nf4.head_input_rel_mean, nf4.head_input_rel_max)} | {_ratio(nf4.logit_mean_rel, nf4.logit_max_rel)} "
        f"| {nf4.agree} / {nf4.n} |"])


def record_note(row: Row) -> str:
    """How the own-base evaluation compares with the run's record."""
    if row.record_predictions_differ:
        return f"{row.record_predictions_differ} predictions differ"
    if row.record_probability_max_diff == 0:
        return "exact"
    return f"same predictions, p ±{row.record_probability_max_diff:.0e}"


def adapter_markdown(results: list[AdapterResult]) -> str:
    """Parts 2 and 3: one row per run, then per method one row pooling its seeds."""
    lines = ["| adapter | seed | trained on | record reproduced | accuracy on own base % | accuracy on other base % | "
             "other − own base (paired) | sentences better on own / other | predictions agree | logits: abs. "
             "difference ÷ RMS, mean / max | [CLS] rel. error, mean / max | pooled rel. error, mean / max |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method in dict.fromkeys(result.run.method for result in results):
        group = [result for result in results if result.run.method == method]
        for result in group:
            own, other = result.rows
            difference, counts = _paired([result.correct[other.base]], [result.correct[own.base]])
            lines.append(
                f"| {method} | {result.run.seed} | {BASE_NAMES[own.base]} | {record_note(own)} | "
                f"{format_points(own.accuracy)} | {format_points(other.accuracy)} | {difference} | {counts} | "
                f"{other.agree} / {other.n} | {_ratio(other.logit_mean_rel, other.logit_max_rel)} | "
                f"{_ratio(other.first_token_rel_mean, other.first_token_rel_max)} | "
                f"{_ratio(other.head_input_rel_mean, other.head_input_rel_max)} |")
        if len(group) > 1:
            own_base = group[0].rows[0].base
            other_base = group[0].rows[1].base
            difference, counts = _paired([r.correct[other_base] for r in group], [r.correct[own_base] for r in group])
            mean = {base: np.mean([r.correct[base].mean() for r in group]) for base in (own_base, other_base)}
            agree, n = sum(r.rows[1].agree for r in group), sum(r.rows[1].n for r in group)
            lines.append(f"| **{method}, {len(group)} seeds** | | {BASE_NAMES[own_base]} | | "
                         f"**{format_points(mean[own_base])}** | **{format_points(mean[other_base])}** | "
                         f"**{difference}** | {counts} | {agree} / {n} | | | |")
    return "\n".join(lines)


def same_base_markdown(results: list[AdapterResult]) -> str:
    """QLoRA minus LoRA over their common seeds: as trained (each on its own base), then both on each base."""
    by_method = {m: {r.run.seed: r for r in results if r.run.method == m} for m in METHODS}
    seeds = sorted(set(by_method["lora"]) & set(by_method["qlora"]))
    if not seeds:
        return ""
    lora, qlora = [by_method["lora"][s] for s in seeds], [by_method["qlora"][s] for s in seeds]
    cases = (("as trained: QLoRA on NF4, LoRA on float32", "nf4", "fp32"),
             ("both on float32", "fp32", "fp32"), ("both on NF4", "nf4", "nf4"))
    lines = [f"| QLoRA − LoRA, seeds {', '.join(map(str, seeds))} pooled | QLoRA % | LoRA % | difference (paired) "
             "| sentences better for LoRA / QLoRA |", "|---|---:|---:|---:|---:|"]
    for label, qlora_base, lora_base in cases:
        a, b = [r.correct[qlora_base] for r in qlora], [r.correct[lora_base] for r in lora]
        difference, counts = _paired(a, b)
        lines.append(f"| {label} | {format_points(np.mean([x.mean() for x in a]))} | "
                     f"{format_points(np.mean([x.mean() for x in b]))} | {difference} | {counts} |")
    return "\n".join(lines)


def report(command: str, machine: dict[str, str], seconds: float, base_rows: list[Row],
           results: list[AdapterResult], model: str) -> str:
    """The whole markdown output: the command, machine and wall time, then the three tables with their keys."""
    n = base_rows[0].n
    return "\n\n".join(part for part in [
        f"# `{command}`",
        f"Run {time.strftime('%Y-%m-%d')}; wall time {format_seconds(seconds)} for everything below, loading "
        f"included (1-minute load average {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores). Machine: "
        + ", ".join(f"{k}={v}" for k, v in machine.items()) + ".",
        "## 1. The NF4 base before training",
        f"The pretrained body in float32 and in NF4 (double quantisation, float32 compute), under one fresh head "
        f"(seeded, copied from the float32 model to the NF4 one), on {n} dev rows. Relative error: "
        "||NF4 − float32|| / ||float32|| per sentence; logits: |NF4 − float32| over the RMS of the float32 logits.",
        base_markdown(base_rows, model),
        "## 2-3. Each adapter on its own base and on the other",
        "\"Own base\": the base it trained on (LoRA float32, QLoRA NF4); \"record reproduced\": its predictions and "
        "probabilities there against its record (exact = every prediction and probability equal). Paired columns: "
        "other base minus own base over the same sentences, 95% bootstrap interval resampling seeds and sentences "
        "(the bold rows pool the seeds) and its bootstrap p. The error columns compare the two bases under the same "
        "adapter.",
        adapter_markdown(results),
        "## QLoRA against LoRA on one base",
        same_base_markdown(results),
    ] if part)


# The environment variables that change what a run reads or how it runs, written into the command it reports.
REPORTED_ENVIRONMENT = ("OMP_WAIT_POLICY", "PEFT_LAB_DATA", "HF_HUB_OFFLINE")


def command_line(argv: Sequence[str]) -> str:
    """The command as typed, with the environment variables above that were set."""
    settings = [f"{name}={shlex.quote(os.environ[name])}" for name in REPORTED_ENVIRONMENT if name in os.environ]
    return " ".join([*settings, "python -m bench.nf4_gap", *map(shlex.quote, argv)])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=RESULTS,
                        help="folder of the comparison runs (default results/cpu-fulltrain)")
    parser.add_argument("--data-dir", help="folder holding sst2/ (default: $PEFT_LAB_DATA)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, help="default: every seed in the folder")
    parser.add_argument("--targets", help="the adapters' target set as run ids name it, e.g. all-linear (default: "
                                          "the model's default set)")
    parser.add_argument("--limit", type=int, help="only the first N dev rows (a quick look; no files unless asked)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, help="markdown output (default bench/nf4_gap.md, bench/nf4_gap-<targets>"
                                                 ".md with --targets; none with --limit)")
    parser.add_argument("--csv", type=Path, help="CSV output (default beside --out's default; none with --limit)")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be positive, got {args.limit}")
    if args.limit is None:
        stem = REPO / "bench" / ("nf4_gap-" + re.sub(r"[^\w+-]", "_", args.targets) if args.targets else "nf4_gap")
        args.out = args.out or stem.with_suffix(".md")
        args.csv = args.csv or stem.with_suffix(".csv")
    return args


def main(argv: Sequence[str] | None = None) -> tuple[list[Row], list[AdapterResult]]:
    """Score every run on both bases, print the tables and write the markdown and CSV (when asked)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    machine = environment("cpu")
    command = command_line(sys.argv[1:] if argv is None else [str(a) for a in argv])
    print(f"# {command}", flush=True)
    runs = committed_runs(args.results_dir, args.methods, args.seeds, args.targets)
    source = resolve_model_source(runs[0].record["model"], args.data_dir)
    base_rows = base_gap(source, dev_rows(runs[0].record, args.data_dir, args.limit), runs[0].record)
    print(base_markdown(base_rows, runs[0].record["model"]), flush=True)
    results = []
    for run in runs:
        if run.record["model"] != runs[0].record["model"]:
            raise ValueError(f"{run.run_id} trained {run.record['model']}, {runs[0].run_id} {runs[0].record['model']}")
        results.append(adapter_gap(run, source, args.data_dir, args.limit))
        print(f"  {run.run_id}: {format_seconds(time.perf_counter() - started)} so far", flush=True)
    text = report(command, machine, time.perf_counter() - started, base_rows, results, runs[0].record["model"])
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    if args.csv:
        write_csv([asdict(row) for row in base_rows + [row for result in results for row in result.rows]], args.csv,
                  machine | {"command": command})
    return base_rows, results


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
