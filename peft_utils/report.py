"""Display helpers for the notebook and the README: the summary table and small formatters. They read records and
format; the statistics themselves (paired tests included) live in :mod:`peft_utils.stats`.

Kept here so that the notebook holds no logic, only calls.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .config import ExperimentConfig, config_record
from .formatting import format_bytes, format_count, format_paired_difference, format_points, format_seconds
from .methods import ordered_methods, series_label, series_method
from .store import COMPARISON_GROUP, RunStore
from .stats import (MATCH_MARGIN, macro_f1_by_method, numeric_column, paired_statistics, per_method_summary,
                    reading, run_series, runs_in_group)

# The references the summary table compares a series against (:func:`~peft_utils.stats.comparison_pairs`), with
# their column titles: full fine-tuning; LoRA on the series' own target set (the title adds "same targets" where the
# table holds a set other than the model's default, so it is never read as LoRA on the default set); the series'
# method on the model's default target set.
_REFERENCES = {"full": "vs full fine-tuning", "lora": "vs LoRA", "targets": "vs default targets"}


def show_source(*functions: Callable) -> None:
    """Show the source of library functions, so the notebook shows the code that actually runs.

    As Markdown, not printed: printed output is forwarded to the terminal by ``make run``, the source is for readers.
    """
    from IPython.display import Markdown, display

    for function in functions:
        display(Markdown(f"```python\n{inspect.getsource(function)}\n```"))


def describe_config(config: ExperimentConfig) -> str:
    """The resolved settings as a Markdown table (the profile's values with the notebook's parameters applied)."""
    rows = "\n".join(f"| `{key}` | `{value!r}` |" for key, value in config_record(config).items())
    return f"| setting | value |\n|---|---|\n{rows}"


def describe_quantization() -> str:
    """Bits per weight of the 4-bit formats, from the same function the size report uses."""
    from .sizes import nf4_bits_per_weight  # on use: sizes imports torch, which the figures never need

    single, double = nf4_bits_per_weight(double_quant=False), nf4_bits_per_weight(double_quant=True)
    return (
        "| storage | bits per weight | vs fp32 |\n|---|---:|---:|\n"
        f"| fp32 | 32 | 1.00x |\n| bf16 | 16 | 2.00x |\n"
        f"| NF4, blocksize 64 | {single:.3f} | {32 / single:.2f}x |\n"
        f"| NF4 + double quantisation | {double:.3f} | {32 / double:.2f}x |"
    )


def format_summary(table: pd.DataFrame) -> pd.DataFrame:
    """The columns a reader compares, with readable units (accuracy %, seconds, MB); runs named by series, so a
    method on two target sets reads as two."""
    if table.empty:
        return table
    out = pd.DataFrame({"run": table["run_id"], "series": run_series(table)})
    out["dev accuracy %"] = (100 * table["final_accuracy"]).round(2)
    out["train time s"] = table["train_time_s"].round(1)
    out["peak memory MB"] = (table["peak_memory_bytes"] / 1e6).round(0)
    out["memory kind"] = table["memory_kind"]
    out["trainable params"] = table["trainable_params"]
    if "size.disk_bytes" in table:
        out["shipped MB"] = (table["size.disk_bytes"] / 1e6).round(2)
    return out


def comparison_markdown(results_dir: str | Path) -> str:
    """The comparison runs of ``results_dir`` as the notebook's and README's Markdown table: per series (a method
    on a target set) the mean ± sd dev accuracy over seeds, cost, and the paired differences to full fine-tuning,
    LoRA and the default targets (labels from the records; without them the paired columns are left out, with the
    reason printed)."""
    runs = RunStore(results_dir).load().runs
    return summary_markdown(summary_table(runs, paired_statistics(runs).table))


def readings_markdown(results_dir: str | Path, margin: float = MATCH_MARGIN) -> str:
    """Every paired difference of ``results_dir``'s comparison runs with the decision rule's reading
    (:func:`~peft_utils.stats.reading`): one Markdown row per pair, in :func:`~peft_utils.stats.comparison_pairs`
    order; a one-line reason when there is no paired test."""
    paired = paired_statistics(RunStore(results_dir).load().runs)
    if paired.table is None or paired.table.empty:
        return f"(no paired test: {paired.reason or 'fewer than two series with a common seed'})"
    lines = ["| series | against | difference, 95% interval, McNemar p | seeds | reading |", "|---|---|---|---:|---|"]
    for row in paired.table.itertuples():
        difference = format_paired_difference(row.difference, row.low, row.high, row.p_value)
        lines.append(f"| {series_label(row.method)} | {series_label(row.reference)} | {difference} | {row.n_seeds} | "
                     f"{reading(row.difference, row.low, row.high, margin)} |")
    return "\n".join(lines)


def format_predictions(predictions: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """``inference.predict_runs`` output with runs named by series (and seed when there are several), in %."""
    several_seeds = table["seed"].nunique() > 1
    names = {run_id: f"{series} s{seed}" if several_seeds else series
             for run_id, series, seed in zip(table["run_id"], run_series(table), table["seed"])}
    out = predictions.rename(columns=names)
    runs = [names[r] for r in table["run_id"] if r in names]
    out[runs] = (100 * out[runs]).round(1)
    return out.rename(columns={name: f"{name}: P(positive) %" for name in runs})


# --------------------------------------------------------------------------------------------------------------
# The summary table
# --------------------------------------------------------------------------------------------------------------
def summary_table(runs: pd.DataFrame, paired: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per compared series (a method on a target set, :func:`~peft_utils.stats.run_series`): accuracy over
    seeds, cost, and the paired differences to the references.

    Columns: ``n_seeds``, ``accuracy`` (mean) and ``accuracy_sd`` (sample sd over seeds; NaN with one seed, where
    there is no spread to report), ``train_time_s`` (mean), ``peak_memory_bytes`` (max) and ``memory_kind``,
    ``trainable_params``, ``disk_bytes`` and ``disk_kind``; ``macro_f1`` (mean over seeds) where the classes call
    for it (:func:`~peft_utils.stats.macro_f1_by_method`);
    then for each reference present in ``paired`` (full fine-tuning, LoRA on the same targets, the default
    targets: :data:`_REFERENCES`): ``vs_<ref>``, ``vs_<ref>_low``, ``vs_<ref>_high``, ``vs_<ref>_p`` (fractions).
    Only comparison runs count. Indexed by series, in the package's order.
    """
    comparison = runs_in_group(runs, COMPARISON_GROUP)
    keys = run_series(comparison)
    series = ordered_methods(keys)
    summary = per_method_summary(comparison, series)
    if summary.empty:
        return summary
    accuracy = numeric_column(comparison, "final_accuracy").groupby(keys)
    table = pd.DataFrame({
        "n_seeds": accuracy.count().reindex(series),
        "accuracy": accuracy.mean().reindex(series),
        "accuracy_sd": accuracy.std(ddof=1).reindex(series),
    })
    f1 = macro_f1_by_method(comparison)
    if f1 is not None:
        table["macro_f1"] = f1.reindex(series)
    for column in ("train_time_s", "peak_memory_bytes", "memory_kind", "trainable_params", "disk_bytes", "disk_kind"):
        table[column] = summary[column]
    if paired is not None:
        kinds = [_reference_kind(s, reference) for s, reference in zip(paired["method"], paired["reference"])]
        for kind in _REFERENCES:
            rows = paired[[k == kind for k in kinds]].set_index("method")
            if rows.empty:
                continue
            for suffix, column in (("", "difference"), ("_low", "low"), ("_high", "high"), ("_p", "p_value")):
                table[f"vs_{kind}{suffix}"] = rows[column].reindex(series)
    table.index.name = "series"
    return table


def _reference_kind(series: str, reference: str) -> str:
    """Which :data:`_REFERENCES` column a :func:`~peft_utils.stats.comparison_pairs` pair fills: its reference is
    full fine-tuning, the series' own method (on the default targets) or else LoRA (on the series' targets)."""
    if reference == "full":
        return "full"
    return "targets" if reference == series_method(series) else "lora"


def summary_markdown(table: pd.DataFrame) -> str:
    """:func:`summary_table` as a Markdown table for the README and the notebook (accuracy in %, differences in
    percentage points with their 95% paired-bootstrap interval and McNemar p)."""
    if table.empty:
        return "(no comparison run)"
    references = [r for r in _REFERENCES if f"vs_{r}" in table.columns]
    other_targets = any(series != series_method(series) for series in table.index)
    titles = [_REFERENCES[r] + (", same targets" if r == "lora" and other_targets else "") for r in references]
    accuracy_title = "dev accuracy % (mean ± sd)" if table["accuracy_sd"].notna().any() else "dev accuracy %"
    f1 = ["macro-F1 % (mean)"] if "macro_f1" in table.columns else []
    header = ["method", accuracy_title, *f1, "seeds", "train time", "peak memory", "trainable params",
              "shipped", *titles]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    for series, row in table.iterrows():
        accuracy = format_points(row["accuracy"])
        if np.isfinite(row["accuracy_sd"]):
            accuracy += f" ± {format_points(row['accuracy_sd'])}"
        memory = format_bytes(row["peak_memory_bytes"]) + (f" ({row['memory_kind']})" if row["memory_kind"] else "")
        cells = [series_label(str(series)), accuracy,
                 *([format_points(row["macro_f1"])] if f1 else []), str(int(row["n_seeds"])),
                 format_seconds(row["train_time_s"]), memory, format_count(row["trainable_params"]),
                 format_bytes(row["disk_bytes"])]
        for reference in references:
            difference = row[f"vs_{reference}"]
            cells.append("—" if not np.isfinite(difference) else format_paired_difference(
                difference, row[f"vs_{reference}_low"], row[f"vs_{reference}_high"], row[f"vs_{reference}_p"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
