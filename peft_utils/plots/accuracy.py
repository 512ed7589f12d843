"""What the methods reach: loss and dev accuracy during training (``loss.png``), final dev accuracy with paired
differences (``accuracy.png``), and every adapter setting tried in one folder (``settings.png``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

from peft_utils.formatting import format_paired_difference
from peft_utils.methods import ordered_methods, series_label
from peft_utils.plots.footnote import count_range, dataset_name, save_with_footnote
from peft_utils.plots.style import (WILSON_NOTE, accuracy_legend, draw_seeds_and_mean, method_color, method_marker,
                                    method_summary, new_figure, style_axes, zoom_accuracy_axis)
from peft_utils.report import setting_rows
from peft_utils.stats import (PAIRED_RESAMPLES, ema_smooth, ema_span, macro_f1_by_method, numeric_column,
                              paired_statistics, run_series, runs_in_group)
from peft_utils.store import COMPARISON_GROUP, Results


def _recorded_rows(frame: pd.DataFrame, runs: pd.DataFrame, column: str) -> pd.DataFrame:
    """The rows of ``frame`` (steps or evals, one per event) of ``runs`` that recorded ``column``."""
    if column not in frame:
        return frame.iloc[0:0]
    return frame[frame["run_id"].isin(runs.get("run_id", ())) & frame[column].notna()]


def plot_loss(results: Results, out_dir: str | Path) -> Path | None:
    """``loss.png``: training loss per optimiser step (raw and faint behind its moving average, so a smoothing
    artefact is not taken for a difference) and dev accuracy at each evaluation, a line per series, means over
    seeds. Why the accuracy too: whether a method was still climbing when training stopped, which the final number
    in accuracy.png hides."""
    runs = runs_in_group(results.runs, COMPARISON_GROUP)
    steps = _recorded_rows(results.steps, runs, "loss")
    if steps.empty:
        return None
    evals = _recorded_rows(results.evals, runs, "accuracy")
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
    axes[0].set_title("Training loss per method", fontsize=11, loc="left")
    notes = [f"Loss: exponential moving average (span {count_range(spans)} steps) of the raw loss drawn faintly "
             "behind it."]
    if len(evals):
        _draw_accuracy_curves(axes[1], evals)
        if evals.groupby("series")["run_id"].nunique().gt(1).any():
            notes.append("Accuracy: mean over seeds; shaded: min-max over seeds.")
    fig.legend(*axes[-1].get_legend_handles_labels(), loc="outside right upper", frameon=False)  # markers too
    return save_with_footnote(fig, Path(out_dir) / "loss.png", runs, notes)


def _draw_accuracy_curves(ax, evals: pd.DataFrame) -> None:
    """Dev accuracy per evaluation step, a line per series over its min-max band over seeds (none with one)."""
    for series in ordered_methods(evals["series"]):
        per_step = evals[evals["series"] == series].groupby("step")["accuracy"].agg(["mean", "min", "max"]) * 100
        ax.plot(per_step.index, per_step["mean"], color=method_color(series), marker=method_marker(series),
                linewidth=2, markersize=6, label=series_label(series))
        ax.fill_between(per_step.index, per_step["min"], per_step["max"], color=method_color(series), alpha=0.15,
                        linewidth=0)
    ax.yaxis.set_major_formatter(PercentFormatter(decimals=1))
    ax.set(xlabel="optimiser step", ylabel="dev accuracy (zoomed axis)")
    ax.set_title("Dev accuracy at each evaluation", fontsize=11, loc="left")


def plot_accuracy(results: Results, out_dir: str | Path) -> Path | None:
    """``accuracy.png``: dev accuracy per series, each seed a dot (with few seeds their spread is part of the result),
    the mean with its 95% interval; beside it the paired differences (:func:`~peft_utils.stats.paired_statistics`;
    else the reason in the footnote): per-method intervals overlap even where one method is reliably better on the
    same sentences."""
    runs = runs_in_group(results.runs, COMPARISON_GROUP)
    table = method_summary(runs, "accuracy")
    if table.empty:
        return None
    paired = paired_statistics(runs)
    pairs = paired.table if paired.table is not None and not paired.table.empty else None
    width = max(5.5, 1.15 * len(table) + 2.5)
    title = f"{dataset_name(runs)} dev accuracy per method"
    notes = ["Dots: one run (seed) each; large marker and bar: the mean and its 95% interval."]
    if pairs is None:
        fig, axes = new_figure(width, 4.8, title, None)
        notes += [f"Paired differences not shown: {paired.reason}."] if paired.reason else []
    else:
        fig, axes = new_figure(width + 7.2, max(4.8, 2.6 + 0.5 * len(pairs)), title + " and paired differences", None,
                               ncols=2, width_ratios=[width, 6.0])
        _draw_paired_differences(axes[1], pairs)
        notes.append(f"Paired differences: runs matched by seed, on the same {int(pairs['n_sentences'].max()):,} dev "
                     f"sentences; interval: 95% bootstrap resampling seeds and sentences ({PAIRED_RESAMPLES:,} "
                     f"resamples); p: the share of those resamples across 0, two-sided.")
    _draw_accuracy_per_method(axes[0], runs, table)
    if "Wilson" in set(table["interval"]):
        notes.append(WILSON_NOTE)
    return save_with_footnote(fig, Path(out_dir) / "accuracy.png", runs, notes)


def _draw_accuracy_per_method(ax, runs: pd.DataFrame, table: pd.DataFrame) -> None:
    """Per series its seeds, its mean (written beside it) and 95% interval, and hollow squares at macro-F1 where the
    classes call for it (:func:`~peft_utils.stats.macro_f1_by_method`)."""
    accuracy, keys = numeric_column(runs, "final_accuracy") * 100, run_series(runs)
    for i, (series, row) in enumerate(table.iterrows()):
        seeds = accuracy[keys == series].dropna()
        draw_seeds_and_mean(ax, series, row, i + 0.12, (i - 0.12 + np.linspace(-0.1, 0.1, len(seeds)), seeds))
        ax.annotate(f"{row['accuracy']:.1%}", (i + 0.12, row["accuracy"] * 100), xytext=(9, 0), va="center",
                    textcoords="offset points", fontsize=9.5, fontweight="bold", color="#222222")
    handles = accuracy_legend(table)
    f1 = macro_f1_by_method(runs)
    f1 = [] if f1 is None else f1.reindex(table.index).to_numpy() * 100
    if len(f1):
        handles.append(ax.scatter(np.arange(len(table)) - 0.36, f1, marker="s", s=40, facecolors="none", zorder=4,
                                  edgecolors="#222222", linewidth=1.2, label="macro-F1, mean over seeds"))
    zoom_accuracy_axis(ax, runs, table, f1)
    ax.set_xlim(-0.6, len(table) - 0.4)
    # A target set goes on a second line, under the method's name, so neighbouring tick labels do not collide.
    ax.set_xticks(range(len(table)), [series_label(s).replace(" (", "\n(", 1) for s in table.index])
    ax.set_title("Accuracy: seeds and mean", fontsize=10, loc="left")
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.1), fontsize=8.5, frameon=False)
    style_axes(ax)


def _draw_paired_differences(ax, pairs: pd.DataFrame) -> None:
    """A forest plot: one row per pair, the difference in points with its interval, the numbers on the right."""
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
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, steps=[1, 2, 5, 10], integer=True))  # whole points only
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:+.0f}" if v else "0"))
    ax.set_xlabel("accuracy difference (percentage points; right of 0: first method better)")
    ax.set_title("Paired differences (95% CI over seeds and sentences, bootstrap p)", fontsize=10, loc="left")
    style_axes(ax, "x")


def plot_settings(results: Results, out_dir: str | Path) -> Path | None:
    """``settings.png``, from a folder loaded with ``every_setting=True`` (the notebook's loop: change rank or alpha,
    re-run into the same folder): per adapter setting, its mean dev accuracy ± 1 sd over its seeds above a tick
    naming its rank and alpha (and id, where another setting shares both), so two settings are never averaged into
    one; ``None`` unless a series holds several settings."""
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
    shared = table.duplicated(["series", "rank", "alpha"], keep=False)
    ax.set_xticks(np.arange(len(table)), [f"r={row.rank:g}\nα={row.alpha:g}" + (f"\n{row.setting}" if same else "")
                                          for row, same in zip(table.itertuples(), shared)])
    ax.set(xlim=(-0.6, len(table) - 0.4), ylabel="dev accuracy, % (mean ± sd over seeds)")
    fig.legend(loc="outside right upper", fontsize=8.5, frameon=False)
    notes = [f"One point per setting, {count_range(table['n_seeds'])} seed(s) each; settings listed by "
             "peft_utils.report.settings_table."]
    return save_with_footnote(fig, Path(out_dir) / "settings.png", runs, notes)
