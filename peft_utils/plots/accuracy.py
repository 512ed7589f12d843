"""What the methods reach: loss and dev accuracy during training (``loss.png``), final dev accuracy with paired
differences (``accuracy.png``), every adapter setting tried in one folder (``settings.png``), and dev accuracy
against train rows (``learning_curve.png``, from :mod:`peft_utils.learning_curve`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import PercentFormatter

from peft_utils.formatting import format_paired_difference
from peft_utils.learning_curve import FULL, LORA, Curve
from peft_utils.methods import ordered_methods, series_label
from peft_utils.plots.style import (WILSON_NOTE, accuracy_legend, count_range, dataset_name, draw_seeds_and_mean,
                                    figure_legend, log_ticks, method_color, method_marker, method_summary, new_figure,
                                    save_with_footnote, zoom_accuracy_axis)
from peft_utils.report import setting_rows
from peft_utils.stats import (PAIRED_RESAMPLES, ema_smooth, ema_span, numeric_column, paired_statistics, run_series,
                              runs_in_group)
from peft_utils.store import COMPARISON_GROUP, Results


def _recorded_rows(frame: pd.DataFrame, runs: pd.DataFrame, column: str) -> pd.DataFrame:
    """The rows of ``frame`` (steps or evals, possibly without the column) of ``runs`` that recorded ``column``."""
    if column not in frame:
        return frame.iloc[0:0]
    return frame[frame["run_id"].isin(runs.get("run_id", ())) & frame[column].notna()]


def plot_loss(results: Results, out_dir: str | Path) -> Path | None:
    """``loss.png``: training loss per step, raw and faint behind its moving average (so a smoothing artefact is not
    taken for a difference), beside dev accuracy at each evaluation: was a method still climbing when it stopped?"""
    runs = runs_in_group(results.runs, COMPARISON_GROUP)
    steps, evals = _recorded_rows(results.steps, runs, "loss"), _recorded_rows(results.evals, runs, "accuracy")
    if steps.empty:
        return None
    fig, axes = new_figure(13 if len(evals) else 9, 5.2, "Training: what each method converges to, and how fast",
                           "both", ncols=2 if len(evals) else 1, sharex=True)
    spans = []
    for series in ordered_methods(steps["series"]):
        curve = steps[steps["series"] == series].groupby("step")["loss"].mean().sort_index()
        spans.append(ema_span(len(curve)))
        axes[0].plot(curve.index, curve, color=method_color(series), alpha=0.22, linewidth=0.8, zorder=1)
        axes[0].plot(curve.index, ema_smooth(curve.to_numpy(), spans[-1]), color=method_color(series), linewidth=2.2,
                     zorder=2, label=series_label(series))
    # The y range clipped to the bulk of the raw loss, so one early spike does not flatten every curve.
    low, high = np.nanpercentile(steps["loss"], [0.5, 99.5])
    margin = 0.08 * max(high - low, 1e-3)
    axes[0].set(xlim=(0, None), ylim=(max(0.0, low - margin), high + margin), xlabel="optimiser step",
                ylabel="training loss (cross-entropy)")
    axes[0].set_title("Training loss per method", fontsize=10, loc="left")
    notes = [f"Loss: exponential moving average (span {count_range(spans)} steps) of the raw loss drawn faintly "
             "behind it."]
    if len(evals):
        for series in ordered_methods(evals["series"]):  # over the min-max band of its seeds
            per_step = evals[evals["series"] == series].groupby("step")["accuracy"].agg(["mean", "min", "max"]) * 100
            axes[1].plot(per_step.index, per_step["mean"], color=method_color(series), marker=method_marker(series),
                         linewidth=2, markersize=6, label=series_label(series))
            axes[1].fill_between(per_step.index, per_step["min"], per_step["max"], color=method_color(series),
                                 alpha=0.15, linewidth=0)
        axes[1].yaxis.set_major_formatter(PercentFormatter(decimals=1))
        axes[1].set(xlabel="optimiser step", ylabel="dev accuracy (zoomed axis)")
        axes[1].set_title("Dev accuracy at each evaluation", fontsize=10, loc="left")
        if evals.groupby("series")["run_id"].nunique().gt(1).any():
            notes.append("Accuracy: mean over seeds; shaded: min-max over seeds.")
    figure_legend(fig, axes[-1].get_legend_handles_labels()[0])  # one panel's lines: with markers where drawn
    return save_with_footnote(fig, Path(out_dir) / "loss.png", runs, notes)


def plot_accuracy(results: Results, out_dir: str | Path) -> Path | None:
    """``accuracy.png``: dev accuracy per series, its seeds and its mean with the 95% interval, beside the paired
    differences: per-method intervals overlap even where one method is reliably better on the same sentences."""
    runs = runs_in_group(results.runs, COMPARISON_GROUP)
    table = method_summary(runs)
    if table.empty:
        return None
    paired = paired_statistics(runs)
    pairs = paired.table if paired.table is not None and not paired.table.empty else None
    width = max(5.5, 1.15 * len(table) + 2.5)
    title = f"{dataset_name(runs)} dev accuracy per method"
    notes = ["Dots: one run (seed) each; large marker and bar: the mean and its 95% interval."]
    if pairs is None:
        fig, axes = new_figure(width, 4.8, title)
        notes += [f"Paired differences not shown: {paired.reason}."] if paired.reason else []
    else:
        fig, axes = new_figure(width + 7.2, max(4.8, 2.6 + 0.5 * len(pairs)), title + " and paired differences",
                               ("y", "x"), ncols=2, width_ratios=[width, 6.0])
        _draw_paired_differences(axes[1], pairs)
        notes.append(f"Paired differences: runs matched by seed, on the same {int(pairs['n_sentences'].max()):,} dev "
                     f"sentences; interval: 95% bootstrap resampling seeds and sentences ({PAIRED_RESAMPLES:,} "
                     f"resamples); p: the share of those resamples across 0, two-sided.")
    accuracy, keys = numeric_column(runs, "final_accuracy") * 100, run_series(runs)
    for i, (series, row) in enumerate(table.iterrows()):
        seeds = accuracy[keys == series].dropna()
        draw_seeds_and_mean(axes[0], series, row, i + 0.12, (i - 0.12 + np.linspace(-0.1, 0.1, len(seeds)), seeds))
        axes[0].annotate(f"{row['accuracy']:.1%}", (i + 0.12, row["accuracy"] * 100), xytext=(9, 0), va="center",
                         textcoords="offset points", fontsize=9.5, fontweight="bold", color="#222222")
    zoom_accuracy_axis(axes[0], runs, table)
    # A target set goes on a second line, under the method's name, so neighbouring tick labels do not collide.
    axes[0].set(xlim=(-0.6, len(table) - 0.4))
    axes[0].set_xticks(range(len(table)), [series_label(s).replace(" (", "\n(", 1) for s in table.index])
    axes[0].set_title("Accuracy: seeds and mean", fontsize=10, loc="left")
    axes[0].legend(handles=accuracy_legend(table), loc="upper center", bbox_to_anchor=(0.5, -0.1), fontsize=8.5,
                   frameon=False)
    notes += [WILSON_NOTE] if "Wilson" in set(table["interval"]) else []
    return save_with_footnote(fig, Path(out_dir) / "accuracy.png", runs, notes)


def _draw_paired_differences(ax, pairs: pd.DataFrame) -> None:
    """A forest plot: one row per pair, the difference in points with its interval, the numbers beside its name."""
    y = np.arange(len(pairs))[::-1]
    diff, low, high = (pairs[c].to_numpy() * 100 for c in ("difference", "low", "high"))
    for yi, d, lo, hi, series in zip(y, diff, low, high, pairs["method"]):
        ax.errorbar(d, yi, xerr=[[d - lo], [hi - d]], fmt=method_marker(series), color=method_color(series),
                    markersize=7, elinewidth=1.8, capsize=4, zorder=3)
    ax.axvline(0, color="#555555", linewidth=1, linestyle="--", zorder=1)
    reach = max(0.5, np.nanmax(np.abs(np.concatenate([low, high]))))
    ax.set(xlim=(-1.15 * reach, 1.15 * reach), ylim=(-0.6, len(pairs) - 0.4))
    # Each pair's numbers under its name, as tick labels: the layout engine keeps them in view.
    ax.set_yticks(y, [f"{series_label(row.method)} − {series_label(row.reference)}\n"
                      f"{format_paired_difference(row.difference, row.low, row.high, row.p_value)}"
                      + (f" ({row.n_seeds} seeds)" if row.n_seeds > 1 else "") for row in pairs.itertuples()])
    ax.set_xlabel("accuracy difference (percentage points; right of 0: first method better)")
    ax.set_title("Paired differences (95% CI over seeds and sentences, bootstrap p)", fontsize=10, loc="left")


def plot_settings(results: Results, out_dir: str | Path) -> Path | None:
    """``settings.png`` (``results`` loaded with ``every_setting=True``): each adapter setting's mean dev accuracy
    ± 1 sd over its seeds, so two settings are never averaged into one; ``None`` unless a series holds several."""
    runs = runs_in_group(results.runs, COMPARISON_GROUP)
    table = setting_rows(runs)
    table = table[table["rank"] > 0].reset_index(drop=True)
    if not table["series"].duplicated().any():
        return None
    fig, (ax,) = new_figure(max(5.5, 0.9 * len(table) + 3), 4.6, "Settings tried in this folder")
    for series, rows in table.groupby("series", sort=False):
        ax.errorbar(rows.index, 100 * rows["accuracy"], yerr=100 * rows["accuracy_sd"].fillna(0), markersize=8,
                    fmt=method_marker(series), color=method_color(series), elinewidth=1, capsize=3,
                    label=series_label(series))
    shared = table.duplicated(["series", "rank", "alpha"], keep=False)  # named by id where rank and alpha agree
    ax.set_xticks(np.arange(len(table)), [f"r={row.rank:g}\nα={row.alpha:g}" + (f"\n{row.setting}" if same else "")
                                          for row, same in zip(table.itertuples(), shared)])
    ax.set(xlim=(-0.6, len(table) - 0.4), ylabel="dev accuracy, % (mean ± sd over seeds)")
    figure_legend(fig)
    notes = [f"One point per setting, {count_range(table['n_seeds'])} seed(s) each; settings listed by "
             "peft_utils.report.settings_table."]
    return save_with_footnote(fig, Path(out_dir) / "settings.png", runs, notes)


def plot_learning_curve(curve: Curve, out_dir: str | Path) -> Path:
    """``learning_curve.png``: dev accuracy per method against train rows (the one-epoch large end apart) beside
    each epoch's training and dev loss at the smallest size, means over seeds."""
    fig, (left, right) = new_figure(11.5, 4.6, "Does full fine-tuning overfit small data? LoRA (all linear layers) "
                                    "against full fine-tuning", ncols=2, width_ratios=[1.15, 1])
    large = [curve.large] if curve.large else []
    for offset, series in ((0.97, FULL), (1.03, LORA)):  # side by side, so the bars do not hide each other
        for points, line in ((curve.sizes, "-"), (large, "none")):
            mean, low, high = 100 * np.reshape([p.accuracy[series][:3] for p in points], (-1, 3)).T
            left.errorbar([p.rows * offset for p in points], mean, yerr=[mean - low, high - mean], capsize=3,
                          color=method_color(series), marker=method_marker(series), linestyle=line,
                          markerfacecolor="white" if line == "none" else method_color(series),
                          label=series_label(series) + ("" if line == "-" else ", 1 epoch") if points else None)
    log_ticks(left, [p.rows for p in curve.sizes + large], [f"{p.rows:,}" for p in curve.sizes + large])
    left.set(xlabel=f"train rows (log scale; {curve.sizes[0].epochs if curve.sizes else 1} epochs, the large end 1 "
             "epoch)", ylabel="dev accuracy, %\nmean and 95% interval (seeds x sentences)")
    means = curve.losses.groupby(["series", "epoch"])[["loss", "train_loss"]].mean().reset_index()
    for series in (FULL, LORA):
        run, color, marker = means[means["series"] == series], method_color(series), method_marker(series)
        right.plot(run["epoch"], run["loss"], color=color, marker=marker, label=f"{series_label(series)}: dev loss")
        right.plot(run["epoch"], run["train_loss"], color=color, marker=marker, linestyle="--", markerfacecolor="white",
                   label=f"{series_label(series)}: training loss (epoch mean)")
    if curve.sizes:
        right.set_title(f"{curve.sizes[0].rows:,} train rows: loss per epoch, mean of "
                        f"{curve.losses['seed'].nunique()} seeds", fontsize=10, loc="left")
    right.set(xlabel="epoch", ylabel="cross-entropy", xticks=sorted(means["epoch"].unique()))
    for ax, corner in ((left, "lower right"), (right, "best")):
        ax.legend(fontsize=8.5, frameon=False, loc=corner)
    return save_with_footnote(fig, Path(out_dir) / "learning_curve.png", curve.runs)
