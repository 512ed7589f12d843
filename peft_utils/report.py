"""The notebook's and README's tables, read from the records (the statistics are :mod:`peft_utils.stats`'): the
notebook holds no logic, only calls."""
from __future__ import annotations

from collections.abc import Container, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .config import ExperimentConfig
from .formatting import format_bytes, format_count, format_paired_difference, format_points, format_seconds
from .methods import ordered_methods, series_label, series_method
from .store import COMPARISON_GROUP, SETTING_KEYS, RunStore
from .stats import (macro_f1_by_method, numeric_column, paired_statistics, per_method_summary,
                    reading, run_series, runs_in_group)

# The summary table's paired columns: against full fine-tuning, LoRA on the same targets, the default targets.
_REFERENCES = {"full": "vs full fine-tuning", "lora": "vs LoRA", "targets": "vs default targets"}


def describe_config(config: ExperimentConfig) -> str:
    """What the profile fixed beside the parameters cell (which shows all a reader changes), as short Markdown."""
    from .devices import compute_dtype_for, resolve_device  # on use: devices imports torch

    train, sweep = config.train, config.sweep
    size = "all" if config.data.eval_size is None else f"{config.data.eval_size:,}"
    device = resolve_device(train.device)
    dtype = str(compute_dtype_for(device, train.precision)).removeprefix("torch.")
    lines = [f"`{config.profile}` profile: device `{device}`, compute in {dtype}, batch "
             f"{train.batch_size}, at most {train.max_length} tokens a sentence, warm-up {train.warmup_ratio:.0%} then "
             f"linear decay, weight decay {train.weight_decay:g}; scored on {size} dev rows"
             + (f", also every {train.eval_every} steps" if train.eval_every else "") + "."]
    if sweep.enabled:
        rows = "the comparison's" if sweep.train_size is None else f"{sweep.train_size:,}"
        lines.append(f"The rank x alpha map: LoRA at ranks {', '.join(map(str, sweep.ranks))} x alpha/r "
                     f"{', '.join(f'{r:g}' for r in sweep.alpha_ratios)} ({len(sweep.ranks) * len(sweep.alpha_ratios)}"
                     f" runs, {rows} train rows each).")
    return "\n\n".join(lines)


def format_summary(table: pd.DataFrame) -> pd.DataFrame:
    """A run table's columns a reader compares, in readable units, runs named by series."""
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


def comparison_markdown(results_dir: str | Path, run_ids: Sequence[str] | None = None) -> str:
    """The comparison runs (``run_ids``, else the default view) as the notebook's and README's Markdown table."""
    runs = RunStore(results_dir).load(run_ids).runs
    return summary_markdown(summary_table(runs, paired_statistics(runs).table))


def readings_markdown(results_dir: str | Path) -> str:
    """Each paired difference of the comparison runs with its reading as a Markdown row, or why there is none."""
    paired = paired_statistics(RunStore(results_dir).load().runs)
    if paired.table is None or paired.table.empty:
        return f"(no paired test: {paired.reason or 'fewer than two series with a common seed'})"
    rows = [[series_label(row.method), series_label(row.reference),
             format_paired_difference(row.difference, row.low, row.high, row.p_value), row.n_seeds,
             _pair_reading(row)] for row in paired.table.itertuples()]
    header = ["series", "against", "difference, 95% interval, bootstrap p", "seeds", "reading"]
    return markdown_table(pd.DataFrame(rows, columns=header), right={3})


def _pair_reading(row: tuple) -> str:
    """The decision rule against full fine-tuning, the question it was written for; any other pair by its interval
    alone (the rule's "matches" would claim an equivalence it was never fixed for)."""
    if row.reference == "full":
        return reading(row.difference, row.low, row.high)
    if row.low > 0 or row.high < 0:
        return f"no rule: interval {'above' if row.low > 0 else 'below'} 0"
    return "no rule: interval contains 0 (no difference shown)"


def format_predictions(predictions: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """``inference.predict_runs`` output with runs named by series (and seed when there are several): a two-class
    run's probability of its last class in % (``P(positive) %``), a K-class run's predicted class as it is."""
    several_seeds = table["seed"].nunique() > 1
    out = predictions.copy()
    for run_id, series, seed, labels in zip(table["run_id"], run_series(table), table["seed"], table["labels"]):
        name = f"{series} s{seed}" if several_seeds else series
        if run_id in out and len(labels) == 2:
            out[run_id], name = (100 * out[run_id]).round(1), f"{name}: P({labels[-1]}) %"
        out = out.rename(columns={run_id: name})
    return out


def summary_table(runs: pd.DataFrame, paired: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per compared series: :func:`~peft_utils.stats.per_method_summary`, ``macro_f1`` where the classes
    call for it, and per reference in ``paired`` ``vs_<ref>`` with ``_low``, ``_high`` and ``_p`` (fractions)."""
    comparison = runs_in_group(runs, COMPARISON_GROUP)
    series = ordered_methods(run_series(comparison))
    table = per_method_summary(comparison, series)
    if table.empty:
        return table
    f1 = macro_f1_by_method(comparison)
    if f1 is not None:
        table["macro_f1"] = f1.reindex(series)
    if paired is not None:
        kinds = ["full" if reference == "full" else "targets" if reference == series_method(s) else "lora"
                 for s, reference in zip(paired["method"], paired["reference"])]
        for kind, rows in paired.assign(kind=kinds).set_index("method").groupby("kind", sort=False):
            for suffix, column in (("", "difference"), ("_low", "low"), ("_high", "high"), ("_p", "p_value")):
                table[f"vs_{kind}{suffix}"] = rows[column].reindex(series)
    return table


def summary_markdown(table: pd.DataFrame) -> str:
    """:func:`summary_table` as Markdown: accuracy in %, differences in points with their interval and p."""
    if table.empty:
        return "(no comparison run)"
    references = [r for r in _REFERENCES if f"vs_{r}" in table.columns]
    # "same targets" where the table holds non-default targets, so that column never reads as LoRA on the default
    other_targets = any(series != series_method(series) for series in table.index)
    titles = [_REFERENCES[r] + (", same targets" if r == "lora" and other_targets else "") for r in references]
    accuracy_title = "dev accuracy % (mean ± sd)" if table["accuracy_sd"].notna().any() else "dev accuracy %"
    f1 = ["macro-F1 % (mean)"] if "macro_f1" in table.columns else []
    header = ["method", accuracy_title, *f1, "seeds", "train time", "peak memory", "trainable params",
              "shipped", *titles]
    rows = []
    for series, row in table.iterrows():
        accuracy = _mean_sd(row["accuracy"], row["accuracy_sd"])
        memory = format_bytes(row["peak_memory_bytes"]) + (f" ({row['memory_kind']})" if row["memory_kind"] else "")
        cells = [series_label(str(series)), accuracy,
                 *([format_points(row["macro_f1"])] if f1 else []), str(int(row["n_seeds"])),
                 format_seconds(row["train_time_s"]), memory, format_count(row["trainable_params"]),
                 format_bytes(row["disk_bytes"])]
        for reference in references:
            difference = row[f"vs_{reference}"]
            cells.append("—" if not np.isfinite(difference) else format_paired_difference(
                difference, row[f"vs_{reference}_low"], row[f"vs_{reference}_high"], row[f"vs_{reference}_p"]))
        rows.append(cells)
    return markdown_table(pd.DataFrame(rows, columns=header), right=range(2, len(header)))


def _mean_sd(mean: float, sd: float) -> str:
    """An accuracy over seeds in %: ``"87.8 ± 0.5"``, the mean alone where one seed leaves no spread."""
    return format_points(mean) + (f" ± {format_points(sd)}" if np.isfinite(sd) else "")


_SETTING_NUMBERS = ("n_seeds", "accuracy", "accuracy_sd", "shown")


def settings_table(results_dir: str | Path) -> pd.DataFrame:
    """The settings tried in ``results_dir`` (rank or alpha changed, re-run), ``shown`` on its default view's."""
    store = RunStore(results_dir)
    return setting_rows(store.load(every_setting=True).runs, store.load().runs.get("run_id", ()))


def setting_rows(runs: pd.DataFrame, shown: Sequence[str] = ()) -> pd.DataFrame:
    """One row per (series, setting) of the comparison runs: rank, alpha, any other setting two settings of a series
    differ in, seeds, accuracy and its sd, and ``shown`` (its runs are among ``shown``)."""
    comparison = runs_in_group(runs, COMPARISON_GROUP)
    if comparison.empty:
        return pd.DataFrame(columns=["series", "setting", "rank", "alpha", *_SETTING_NUMBERS])
    comparison = comparison.assign(series=run_series(comparison), rank=numeric_column(comparison, "rank"),
                                   alpha=numeric_column(comparison, "alpha"),
                                   accuracy=numeric_column(comparison, "final_accuracy"))
    by_series = comparison.groupby("series")
    differ = [key for key in SETTING_KEYS if key not in ("rank", "alpha") and key in comparison
              and (by_series[key].agg(lambda values: values.map(_setting_text).nunique()) > 1).any()]
    keys = ["series", "setting"]
    table = comparison.groupby(keys, sort=False)["accuracy"].agg(n_seeds="count", accuracy="mean", accuracy_sd="std")
    table = comparison.drop_duplicates(keys).set_index(keys)[["rank", "alpha", *differ]].join(table)
    shown_settings = set(comparison.loc[comparison["run_id"].isin(list(shown)), "setting"])
    table["shown"] = [setting in shown_settings for _, setting in table.index]
    order = {series: position for position, series in enumerate(ordered_methods(comparison["series"]))}
    return table.reset_index().sort_values("series", key=lambda s: s.map(order), kind="stable", ignore_index=True)


def settings_text(results_dir: str | Path, markdown: bool = False) -> str:
    """The settings of ``results_dir``: as Markdown for the notebook; as text for a terminal only when a series holds
    several, else ``""``."""
    table = settings_table(results_dir)
    several = table["series"].duplicated().any()
    if not markdown:
        return (f"Settings tried in {results_dir} (*: each series' setting asked for last, the one tables and figures "
                f"show unless told which runs):\n{format_settings(table).to_string(index=False)}") if several else ""
    if table.empty:
        return "(no comparison run yet)"
    return ("" if several else "One setting per method so far. ") + (
        f"Settings tried in `{results_dir}`; * marks the ones the tables and figures above show.\n\n"
        + markdown_table(format_settings(table)))


def markdown_table(frame: pd.DataFrame, right: Container[int] = ()) -> str:
    """``frame`` as a Markdown table (``to_markdown`` needs tabulate), columns at positions ``right`` right-aligned."""
    rows = [[str(column) for column in frame.columns], *frame.astype(str).values.tolist()]
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    rule = "|" + "".join("---:|" if i in right else "---|" for i in range(len(frame.columns)))
    return "\n".join([lines[0], rule, *lines[1:]])


def format_settings(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`settings_table` as a reader compares it: "*" on the settings shown now, "—" where a run has none."""
    settings = [c for c in table.columns if c not in ("series", "setting", *_SETTING_NUMBERS)]
    out = pd.DataFrame({"": table["shown"].map({True: "*", False: ""}), "series": table["series"].map(series_label)})
    for key in settings:
        out[key] = [_setting_text(value) for value in table[key]]
    out["seeds"] = table["n_seeds"]
    out["dev accuracy %"] = [_mean_sd(mean, sd) for mean, sd in zip(table["accuracy"], table["accuracy_sd"])]
    out["setting"] = table["setting"]
    return out


def _setting_text(value: object) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "—"
    return f"{value:g}" if isinstance(value, float) else str(value)
