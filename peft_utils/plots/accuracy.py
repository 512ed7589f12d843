"""What the methods reach: training loss and dev accuracy during training, final dev accuracy with paired
differences."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

from peft_utils.formatting import format_paired_difference
from peft_utils.methods import ordered_methods
from peft_utils.plots.footnote import dataset_name, save_with_footnote
from peft_utils.plots.style import (comparison_runs, interval_legend, method_color, method_label, method_marker,
                                    method_summary, new_figure, png_path, rows_of_runs, style_axes)
from peft_utils.stats import (PAIRED_RESAMPLES, ema_smooth, ema_span, macro_f1_by_method, numeric_column,
                              optional_column, run_series)
from peft_utils.store import Results


def _numeric_rows(frame: pd.DataFrame, runs: pd.DataFrame, column: str) -> pd.DataFrame:
    """The rows of ``frame`` (steps or evals) of ``runs`` with a numeric ``column`` and ``step``."""
    rows = rows_of_runs(frame, optional_column(runs, "run_id"))
    if rows.empty or column not in rows.columns or "step" not in rows.columns:
        return rows.iloc[0:0]
    return rows.assign(**{name: pd.to_numeric(rows[name], errors="coerce") for name in (column, "step")}).dropna(
        subset=[column, "step"])


def plot_loss(results: Results, out_dir: str | Path) -> Path | None:
    """``loss.png``: training loss against optimiser step (left) and, where evaluations were recorded, dev accuracy
    at each evaluation on the same steps (right), one line per series, means over seeds.

    Why both: the loss shows convergence speed and its final level; the accuracy whether a method had converged or
    was still climbing when training stopped, which the final number in accuracy.png hides. The loss is drawn raw
    and faint behind its exponential moving average, so a smoothing artefact is not taken for a difference.
    """
    runs = comparison_runs(results.runs)
    steps = _numeric_rows(results.steps, runs, "loss")
    if steps.empty:
        return None
    evals = _numeric_rows(results.evals, runs, "accuracy")
    fig = new_figure(13 if len(evals) else 9, 5.2)
    axes = fig.subplots(1, 2, sharex=True) if len(evals) else [fig.add_subplot()]
    spans = [_draw_loss(axes[0], steps[steps["series"] == series], series) for series in ordered_methods(steps["series"])]
    # Clip the y range to the bulk of the raw loss so one early spike does not flatten every curve.
    low, high = np.nanpercentile(steps["loss"], [0.5, 99.5])
    axes[0].set_ylim(max(0.0, low - 0.08 * max(high - low, 1e-3)), high + 0.08 * max(high - low, 1e-3))
    axes[0].set(xlim=(0, None), xlabel="optimiser step", ylabel="training loss (cross-entropy)")
    axes[0].set_title("Training loss per method", fontsize=11, loc="left")
    span = f"{min(spans)}" if min(spans) == max(spans) else f"{min(spans)}-{max(spans)}"
    notes = [f"Loss: exponential moving average (span {span} steps) of the raw loss drawn faintly behind it."]
    if len(evals):
        several = _draw_accuracy_curves(axes[1], evals)
        notes += ["Accuracy: mean over seeds; shaded: min-max over seeds."] if several else []
    for ax in axes:
        style_axes(ax, "both")
    handles, labels = axes[-1].get_legend_handles_labels()  # with the accuracy panel, its markers too
    fig.legend([*handles, Line2D([], [], color="#999999", alpha=0.4, linewidth=0.8)], [*labels, "raw per-step loss"],
               loc="outside right upper", frameon=False)
    fig.suptitle("Training: what each method converges to, and how fast", fontsize=13, x=0.01, ha="left")
    return save_with_footnote(fig, png_path(out_dir, "loss.png"), runs, notes)


def _draw_loss(ax, steps: pd.DataFrame, series: str) -> int:
    """One series' per-step loss (mean over seeds), raw and smoothed; returns the smoothing span."""
    curve = steps.groupby("step")["loss"].mean().sort_index()
    span = ema_span(len(curve))
    ax.plot(curve.index, curve.to_numpy(), color=method_color(series), alpha=0.22, linewidth=0.8, zorder=1)
    ax.plot(curve.index, ema_smooth(curve.to_numpy(), span), color=method_color(series), linewidth=2.2, zorder=2,
            label=method_label(series))
    return span


def _draw_accuracy_curves(ax, evals: pd.DataFrame) -> bool:
    """Dev accuracy per evaluation step, a line per series (min-max band over seeds); True if any has several."""
    several = False
    for series in ordered_methods(evals["series"]):
        own = evals[evals["series"] == series]
        per_step = own.groupby("step")["accuracy"].agg(["mean", "min", "max"]).sort_index() * 100
        ax.plot(per_step.index, per_step["mean"], color=method_color(series), marker=method_marker(series),
                linewidth=2, markersize=6, label=method_label(series))
        if own["run_id"].nunique() > 1:
            several = True
            ax.fill_between(per_step.index, per_step["min"], per_step["max"], color=method_color(series), alpha=0.15,
                            linewidth=0)
    ax.yaxis.set_major_formatter(PercentFormatter(decimals=1))
    ax.set(xlabel="optimiser step", ylabel="dev accuracy (zoomed axis)")
    ax.set_title("Dev accuracy at each evaluation", fontsize=11, loc="left")
    return several


def plot_accuracy(results: Results, out_dir: str | Path, paired: pd.DataFrame | None = None,
                  paired_reason: str | None = None) -> Path | None:
    """``accuracy.png``: dev accuracy per series, each seed a dot, the mean with its 95% interval; beside it, the
    paired differences (:func:`peft_utils.stats.paired_comparisons` rows ``paired``) with intervals and p-values.

    Why dots and not bars: with a few seeds their spread is part of the result, and bars on a zoomed axis invite
    reading lengths as ratios. Why the paired panel: per-method intervals overlap even where one method is reliably
    better on the same sentences; the paired difference cancels the sentences' shared difficulty. Without
    ``paired`` the panel is left out and ``paired_reason`` goes in the footnote.
    """
    runs = comparison_runs(results.runs)
    table = method_summary(runs, "accuracy")
    if table.empty:
        return None
    pairs = paired if paired is not None and not paired.empty else None
    width = max(5.5, 1.15 * len(table) + 2.5)
    fig = new_figure(width + (0 if pairs is None else 7.2), max(4.8, 2.6 + (0 if pairs is None else 0.5 * len(pairs))))
    axes = [fig.add_subplot()] if pairs is None else fig.subplots(1, 2, width_ratios=[width, 6.0])
    _draw_accuracy_per_method(axes[0], runs, table)
    notes = ["Dots: one run (seed) each; black marker and bar: the mean and its 95% interval."]
    if pairs is not None:
        _draw_paired_differences(axes[1], pairs)
        notes.append(f"Paired differences: runs matched by seed, on the same {int(pairs['n_sentences'].max()):,} dev "
                     f"sentences; interval: 95% bootstrap resampling seeds and sentences ({PAIRED_RESAMPLES:,} "
                     f"resamples); p: the share of those resamples across 0, two-sided.")
    elif paired_reason:
        notes.append(f"Paired differences not shown: {paired_reason}.")
    if "Wilson" in set(table["interval"]):
        notes.append("Wilson interval: dev-set sampling noise of a single run only (run-to-run variation unseen).")
    fig.suptitle(f"{dataset_name(runs)} dev accuracy per method" + ("" if pairs is None else " and paired differences"),
                 fontsize=13, x=0.01, ha="left")
    return save_with_footnote(fig, png_path(out_dir, "accuracy.png"), runs, notes)


def _draw_accuracy_per_method(ax, runs: pd.DataFrame, table: pd.DataFrame) -> None:
    """Seed dots, the mean and its 95% interval per series, and hollow squares at macro-F1 where the classes call
    for it (:func:`~peft_utils.stats.macro_f1_by_method`)."""
    x = np.arange(len(table))
    accuracy, keys = numeric_column(runs, "final_accuracy") * 100, run_series(runs)
    values = [accuracy[keys.isin(table.index)].dropna().to_numpy()]
    for i, series in enumerate(table.index):
        seeds = accuracy[keys == series].dropna().to_numpy()
        ax.scatter(i - 0.12 + np.linspace(-0.1, 0.1, len(seeds)) * (len(seeds) > 1), seeds, s=34, alpha=0.75,
                   color=method_color(series), edgecolor="white", linewidth=0.8, zorder=3)
    mean = table["accuracy"].to_numpy() * 100
    low, high = (np.where(table[c].notna(), table[c] * 100, mean) for c in ("acc_low", "acc_high"))
    ax.errorbar(x + 0.12, mean, yerr=[mean - low, high - mean], fmt="D", color="#222222", markersize=6,
                elinewidth=1.4, capsize=5, zorder=4)
    for i in x:
        ax.annotate(f"{mean[i]:.1f}%", (x[i] + 0.12, mean[i]), xytext=(9, 0), textcoords="offset points",
                    va="center", fontsize=9.5, fontweight="bold", color="#222222")
    handles = [Line2D([], [], linestyle="none", marker="o", color="#888888", markersize=6, label="one seed"),
               Line2D([], [], linestyle="none", marker="D", color="#222222", markersize=6,
                      label="mean, " + interval_legend(set(table["interval"])))]
    f1 = macro_f1_by_method(runs)
    if f1 is not None:
        values.append(f1.reindex(table.index).to_numpy() * 100)
        ax.scatter(x - 0.36, values[-1], marker="s", s=40, facecolors="none", edgecolors="#222222", linewidth=1.2,
                   zorder=4)
        handles.append(Line2D([], [], linestyle="none", marker="s", markerfacecolor="none", color="#222222",
                              markersize=6, label="macro-F1, mean over seeds"))
    values = np.concatenate([low, high, *values])
    pad = max(0.6, 0.12 * (np.nanmax(values) - np.nanmin(values)))
    ax.set(xlim=(-0.6, len(table) - 0.4), ylim=(np.nanmin(values) - pad, min(100.0, np.nanmax(values) + pad)),
           ylabel="dev accuracy (zoomed axis)")
    # A target set goes on a second line, under the method's name, so neighbouring tick labels do not collide.
    ax.set_xticks(x, [method_label(s).replace(" (", "\n(", 1) for s in table.index])
    ax.yaxis.set_major_formatter(PercentFormatter(decimals=1))
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
    ax.set_yticks(y, [f"{method_label(m)} − {method_label(r)}" for m, r in zip(pairs["method"], pairs["reference"])])
    numbers = ax.twinx()  # the numbers as right-hand tick labels: the layout engine then keeps them in view
    numbers.set_ylim(ax.get_ylim())
    numbers.set_yticks(y, [format_paired_difference(*row[:4]) + (f" ({row[4]:.0f} seeds)" if row[4] > 1 else "")
                           for row in pairs[["difference", "low", "high", "p_value", "n_seeds"]].to_numpy()])
    numbers.tick_params(length=0, labelsize=8.5)
    numbers.spines[["top", "right", "left"]].set_visible(False)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, steps=[1, 2, 5, 10], integer=True))  # whole points only
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:+.0f}" if v else "0"))
    ax.set_xlabel("accuracy difference (percentage points; right of 0: first method better)")
    ax.set_title("Paired differences (95% CI over seeds and sentences, bootstrap p)", fontsize=10, loc="left")
    style_axes(ax, "x")
