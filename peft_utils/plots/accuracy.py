"""What the methods reach: training loss, dev accuracy with seeds and paired differences, accuracy per evaluation."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

from peft_utils.formatting import format_paired_difference
from peft_utils.methods import ordered_methods
from peft_utils.plots.footnote import dataset_name, save_with_footnote
from peft_utils.plots.selection import comparison_runs, methods_with, rows_of_runs
from peft_utils.plots.style import (
    chance_accuracy,
    interval_legend,
    method_color,
    method_label,
    method_marker,
    new_figure,
    png_path,
    set_method_ticks,
    style_axes,
)
from peft_utils.stats import (PAIRED_RESAMPLES, ema_smooth, ema_span, macro_f1_by_method, numeric_column,
                              optional_column, run_series)
from peft_utils.store import Results


def plot_loss(results: Results, out_dir: str | Path) -> Path | None:
    """``loss.png``: training loss vs optimiser step, one EMA-smoothed line per series over the faint raw loss.

    Why both: the smoothed line shows convergence speed and the final level; the raw loss behind it keeps the
    noise visible, so a reader does not mistake a smoothing artefact for a real difference. With several
    seeds the per-step loss is averaged over seeds first.
    """
    runs = comparison_runs(results.runs)
    steps = rows_of_runs(results.steps, optional_column(runs, "run_id"))
    if steps.empty or "loss" not in steps.columns or "step" not in steps.columns:
        return None
    steps = steps.assign(loss=pd.to_numeric(steps["loss"], errors="coerce"),
                         step=pd.to_numeric(steps["step"], errors="coerce")).dropna(subset=["loss", "step"])
    if steps.empty:
        return None
    fig = new_figure(9, 5.2)
    ax = fig.add_subplot()
    spans = []
    for series in ordered_methods(steps["series"]):
        curve = steps[steps["series"] == series].groupby("step")["loss"].mean().sort_index()
        color = method_color(series)
        ax.plot(curve.index, curve.to_numpy(), color=color, alpha=0.22, linewidth=0.8, zorder=1)
        span = ema_span(len(curve))
        spans.append(span)
        ax.plot(curve.index, ema_smooth(curve.to_numpy(), span), color=color, linewidth=2.2, zorder=2,
                label=method_label(series))
    # Clip the y range to the bulk of the raw loss so one early spike does not flatten every curve.
    low, high = np.nanpercentile(steps["loss"], [0.5, 99.5])
    margin = 0.08 * max(high - low, 1e-3)
    ax.set_ylim(max(0.0, low - margin), high + margin)
    ax.set_xlim(left=0)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title("Training loss per method", fontsize=13, loc="left")
    style_axes(ax, "both")
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], color="#999999", alpha=0.4, linewidth=0.8))
    labels.append("raw per-step loss")
    fig.legend(handles, labels, loc="outside right upper", frameon=False)
    span_note = f"{min(spans)}" if min(spans) == max(spans) else f"{min(spans)}-{max(spans)}"
    notes = [f"Bold lines: exponential moving average (span {span_note} steps) of the raw loss drawn faintly behind."]
    return save_with_footnote(fig, png_path(out_dir, "loss.png"), runs, notes)


def plot_accuracy(results: Results, out_dir: str | Path, paired: pd.DataFrame | None = None,
                  paired_reason: str | None = None) -> Path | None:
    """``accuracy.png``: dev accuracy per method, each seed a dot, the mean with its 95% interval; and, beside it,
    the paired differences to full fine-tuning (and of the LoRA variants to LoRA) with intervals and p-values.

    Why dots and not bars: with a few seeds the spread between them is part of the result, and bars on a zoomed
    axis invite reading their length as a ratio. The interval on the mean is Student-t over seeds, or, for a
    method with a single run, the Wilson interval of that run's dev accuracy (which ignores seed noise; the
    legend says which). Why the paired panel: the per-method intervals overlap even when one method is reliably
    better on the same sentences; the paired difference cancels the sentences' shared difficulty.
    ``paired``: :func:`peft_utils.stats.paired_comparisons` rows (None: the panel is left out, with
    ``paired_reason`` in the footnote).
    """
    runs = comparison_runs(results.runs)
    table = methods_with(runs, "accuracy")
    if table.empty:
        return None
    methods = list(table.index)
    pairs = paired if paired is not None and not paired.empty else None
    width = max(5.5, 1.15 * len(methods) + 2.5)
    height = max(4.8, 2.6 + (0 if pairs is None else 0.5 * len(pairs)))
    fig = new_figure(width + (0 if pairs is None else 7.2), height)
    if pairs is not None:
        left, right = fig.subplots(1, 2, width_ratios=[width, 6.0])
    else:
        left, right = fig.add_subplot(), None
    kinds = _draw_accuracy_per_method(left, runs, table)
    notes = ["Dots: one run (seed) each; black marker and bar: the mean and its 95% interval."]
    if pairs is not None:
        _draw_paired_differences(right, pairs)
        notes.append(f"Paired differences: runs matched by seed, on the same {int(pairs['n_sentences'].max()):,} dev "
                     f"sentences; interval: 95% bootstrap resampling seeds and sentences ({PAIRED_RESAMPLES:,} "
                     f"resamples); p: the share of those resamples across 0, two-sided.")
    elif paired_reason:
        notes.append(f"Paired differences not shown: {paired_reason}.")
    fig.suptitle(f"{dataset_name(runs)} dev accuracy per method"
                 + (" and paired differences" if pairs is not None else ""),
                 fontsize=13, x=0.01, ha="left")
    if "Wilson" in kinds:
        notes.append("Wilson interval: dev-set sampling noise of a single run only (run-to-run variation unseen).")
    return save_with_footnote(fig, png_path(out_dir, "accuracy.png"), runs, notes)


def _draw_macro_f1(ax, runs: pd.DataFrame, series: list[str], x: np.ndarray) -> list[float]:
    """Hollow squares at each series' mean macro-F1 where the classes call for it; returns the values drawn."""
    f1 = macro_f1_by_method(runs)
    if f1 is None:
        return []
    values = f1.reindex(series).to_numpy() * 100
    ax.scatter(x - 0.36, values, marker="s", s=40, facecolors="none", edgecolors="#222222", linewidth=1.2, zorder=4)
    return [float(v) for v in values]


def _draw_accuracy_per_method(ax, runs: pd.DataFrame, table: pd.DataFrame) -> set[str]:
    """Seed dots, mean marker and 95% interval per series, macro-F1 where it applies; returns the interval kinds
    drawn ("Wilson", "t ...")."""
    methods = list(table.index)
    x = np.arange(len(methods))
    accuracy, keys = numeric_column(runs, "final_accuracy"), run_series(runs)
    values = []
    for i, method in enumerate(methods):
        seeds = accuracy[keys == method].dropna().to_numpy() * 100
        values.extend(seeds)
        offsets = np.linspace(-0.16, 0.16, len(seeds)) if len(seeds) > 1 else np.zeros(1)
        ax.scatter(i - 0.12 + offsets * 0.6, seeds, s=34, color=method_color(method), alpha=0.75,
                   edgecolor="white", linewidth=0.8, zorder=3)
    mean = table["accuracy"].to_numpy() * 100
    has_interval = table["acc_low"].notna().to_numpy()
    low = np.where(has_interval, table["acc_low"].to_numpy() * 100, mean)
    high = np.where(has_interval, table["acc_high"].to_numpy() * 100, mean)
    ax.errorbar(x + 0.12, mean, yerr=[mean - low, high - mean], fmt="D", color="#222222", markersize=6,
                elinewidth=1.4, capsize=5, zorder=4)
    for i in range(len(methods)):
        ax.annotate(f"{mean[i]:.1f}%", (x[i] + 0.12, mean[i]), xytext=(9, 0), textcoords="offset points",
                    va="center", ha="left", fontsize=9.5, fontweight="bold", color="#222222")
    f1 = _draw_macro_f1(ax, runs, methods, x)
    values.extend(f1)
    ylo, yhi = min(np.nanmin(low), np.nanmin(values)), max(np.nanmax(high), np.nanmax(values))
    pad = max(0.6, 0.12 * (yhi - ylo))
    ax.set_ylim(ylo - pad, min(100.0, yhi + pad))
    ax.set_xlim(-0.6, len(methods) - 0.4)
    set_method_ticks(ax, methods)
    ax.yaxis.set_major_formatter(PercentFormatter(decimals=1))
    ax.set_ylabel("dev accuracy (zoomed axis)")
    ax.set_title("Accuracy: seeds and mean", fontsize=10, loc="left")
    style_axes(ax)
    kinds = set(table["interval"])
    handles = [Line2D([], [], linestyle="none", marker="o", color="#888888", markersize=6, label="one seed"),
               Line2D([], [], linestyle="none", marker="D", color="#222222", markersize=6,
                      label="mean, " + interval_legend(kinds))]
    if f1:
        handles.append(Line2D([], [], linestyle="none", marker="s", markerfacecolor="none", color="#222222",
                              markersize=6, label="macro-F1, mean over seeds"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.1), fontsize=8.5, frameon=False)
    return kinds


def _draw_paired_differences(ax, pairs: pd.DataFrame) -> None:
    """A forest plot: one row per pair, the difference in points with its interval, the numbers on the right."""
    y = np.arange(len(pairs))[::-1]
    diff = pairs["difference"].to_numpy() * 100
    low, high = pairs["low"].to_numpy() * 100, pairs["high"].to_numpy() * 100
    for yi, d, lo, hi, method in zip(y, diff, low, high, pairs["method"]):
        ax.errorbar(d, yi, xerr=[[d - lo], [hi - d]], fmt=method_marker(method), color=method_color(method),
                    markersize=7, elinewidth=1.8, capsize=4, zorder=3)
    ax.axvline(0, color="#555555", linewidth=1, linestyle="--", zorder=1)
    reach = max(0.5, np.nanmax(np.abs(np.concatenate([low, high]))))
    ax.set_xlim(-1.15 * reach, 1.15 * reach)
    ax.set_ylim(-0.6, len(pairs) - 0.4)
    labels = [f"{method_label(m)} − {method_label(r)}" for m, r in zip(pairs["method"], pairs["reference"])]
    ax.set_yticks(y, labels)
    numbers = ax.twinx()  # the numbers as right-hand tick labels: the layout engine then keeps them in view
    numbers.set_ylim(ax.get_ylim())
    seeds = pairs["n_seeds"].to_numpy()
    numbers.set_yticks(y, [format_paired_difference(*row) + (f" ({s} seeds)" if s > 1 else "")
                           for row, s in zip(pairs[["difference", "low", "high", "p_value"]].to_numpy(), seeds)])
    numbers.tick_params(length=0, labelsize=8.5)
    numbers.spines[["top", "right", "left"]].set_visible(False)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, steps=[1, 2, 5, 10], integer=True))  # whole points only
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:+.0f}" if v else "0"))
    ax.set_xlabel("accuracy difference (percentage points; right of 0: first method better)")
    ax.set_title("Paired differences (95% CI over seeds and sentences, bootstrap p)", fontsize=10, loc="left")
    style_axes(ax, "x")


def plot_accuracy_curve(results: Results, out_dir: str | Path) -> Path | None:
    """``accuracy_curve.png``: dev accuracy at every evaluation, per series.

    Why: the final number hides whether a method had already converged or was still climbing (so more epochs
    would change the ranking) or peaked early and started to overfit. The x axis is the epoch when every
    evaluation records one (comparable across batch sizes), otherwise the optimiser step.
    """
    runs = comparison_runs(results.runs)
    evals = rows_of_runs(results.evals, optional_column(runs, "run_id"))
    if evals.empty or "accuracy" not in evals.columns:
        return None
    evals = evals.assign(accuracy=pd.to_numeric(evals["accuracy"], errors="coerce")).dropna(subset=["accuracy"])
    epoch = numeric_column(evals, "epoch")
    step = numeric_column(evals, "step")
    if epoch.notna().all() and len(evals):
        xcol, xlabel = epoch, "epoch"
    elif step.notna().all() and len(evals):
        xcol, xlabel = step, "optimiser step"
    else:
        return None
    evals = evals.assign(_x=xcol)
    fig = new_figure(9, 5.2)
    ax = fig.add_subplot()
    several_seeds = False
    for series in ordered_methods(evals["series"]):
        sub = evals[evals["series"] == series]
        per_x = sub.groupby("_x")["accuracy"].agg(["mean", "min", "max", "count"]).sort_index()
        color = method_color(series)
        ax.plot(per_x.index, per_x["mean"] * 100, color=color, linewidth=2,
                marker=method_marker(series), markersize=6, label=method_label(series))
        if sub["run_id"].nunique() > 1:
            several_seeds = True
            ax.fill_between(per_x.index, per_x["min"] * 100, per_x["max"] * 100, color=color, alpha=0.15,
                            linewidth=0)
    # Zoomed to the data (differences of interest are small); chance level drawn only when in range.
    ymin = max(0.0, 2 * math.floor((float(evals["accuracy"].min()) * 100 - 1) / 2))
    ymax = min(100.0, 2 * math.ceil((float(evals["accuracy"].max()) * 100 + 1) / 2))
    ax.set_ylim(ymin, ymax)
    chance = chance_accuracy(runs) * 100
    show_chance = ymin < chance < ymax
    if show_chance:
        ax.axhline(chance, color="#555555", linestyle="--", linewidth=1)
    ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    if xlabel == "epoch" and np.allclose(evals["_x"], np.round(evals["_x"])):
        ax.set_xticks(sorted(evals["_x"].unique()))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("dev accuracy" + (f" (axis starts at {ymin:.0f}%)" if ymin > 0 else ""))
    ax.set_title("Dev accuracy during training", fontsize=13, loc="left")
    style_axes(ax, "both")
    fig.legend(loc="outside right upper", frameon=False)
    notes = [f"Dashed line: chance level ({chance:.0f}%)."] if show_chance else []
    if several_seeds:
        notes.append("Lines: mean over seeds; shaded: min-max range over seeds.")
    return save_with_footnote(fig, png_path(out_dir, "accuracy_curve.png"), runs, notes)
