"""The two grids of runs: the LoRA rank x alpha map (sweep) and the learning-rate tuning scores."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.lines import Line2D
from matplotlib.ticker import NullLocator, PercentFormatter

from peft_utils.formatting import format_count
from peft_utils.methods import ordered_methods
from peft_utils.plots.footnote import save_with_footnote
from peft_utils.plots.selection import comparison_runs, method_summary, sweep_runs
from peft_utils.plots.style import (
    METHOD_COLORS,
    distinct_texts,
    label_bars,
    method_color,
    method_label,
    method_marker,
    new_figure,
    png_path,
    style_axes,
    tick_formatter,
)
from peft_utils.stats import numeric_column, optional_column, run_series, runs_in_group
from peft_utils.store import TUNE_GROUP, Results
from peft_utils.tuning import learning_rate_scores


# How far below a series' best held-out score the accuracy axis reaches, in points. A rate scoring lower (training
# that diverged to chance) sits on the axis floor with its score written above it, so one failed rate does not
# squeeze the differences near the optimum, which decide the choice, into a sliver of the axis.
LR_AXIS_DEPTH = 12.0


def _rows_label(sizes: set[int]) -> str:
    return " / ".join(f"{n:,}" for n in sorted(sizes)) or "?"


def plot_sweep(results: Results, out_dir: str | Path) -> Path | None:
    """``sweep.png``: the LoRA rank x alpha/r grid as a heatmap of dev accuracy, trainable parameters beside it.

    Rows are ranks, columns the alpha/r ratio. The ratio, not alpha, is the column key because LoRA scales its
    update by alpha/r: along a column the update's scale is fixed and only capacity (rank) changes. With rsLoRA
    the scale is alpha/sqrt(r) instead, and the title says so. Each cell is the mean over its seeds. The bars
    share the heatmap's rows: trainable parameters grow linearly with r and do not depend on alpha, so together
    they show where extra rank stops paying off. ``None`` when no run has group ``"sweep"``.
    """
    sweep = sweep_runs(results.runs)
    if sweep.empty:
        return None
    sweep = sweep.assign(**{name: numeric_column(sweep, name)
                            for name in ("rank", "alpha", "final_accuracy", "trainable_params")})
    sweep = sweep[(sweep["rank"] > 0) & sweep["final_accuracy"].notna()]
    if sweep.empty:
        return None
    rslora = optional_column(sweep, "rslora").astype(object).where(lambda v: v.notna(), False).astype(bool)
    sweep = sweep.assign(ratio=(sweep["alpha"] / sweep["rank"]).round(4), rslora=rslora)
    ranks, ratios = sorted(sweep["rank"].unique()), sorted(sweep["ratio"].unique())
    variants = sorted(sweep["rslora"].unique())
    comparison = method_summary(comparison_runs(results.runs))
    full = comparison.loc["full"] if "full" in comparison.index else None
    heat_width = 0.95 * len(ratios) + 1.2
    fig = new_figure(len(variants) * heat_width + 1.2 + 4.2, 0.42 * len(ranks) + 2.4)
    axes = fig.subplots(1, len(variants) + 1, width_ratios=[heat_width] * len(variants) + [4.2], sharey=True)
    cells = sweep.groupby(["rslora", "rank", "ratio"])["final_accuracy"].agg(["mean", "size"])
    low, high = cells["mean"].min() * 100, cells["mean"].max() * 100
    for ax, variant in zip(axes, variants):
        image = _draw_sweep_heatmap(ax, cells.loc[variant], ranks, ratios, (low, high))
        ax.set_title(("rsLoRA: scale α/√r" if variant else "LoRA: scale α/r") + "\n(dev accuracy, %)", fontsize=10,
                     loc="left")
    fig.colorbar(image, ax=list(axes[:-1]), shrink=0.8, pad=0.02)  # the values are written in the cells too
    _draw_sweep_params(axes[-1], sweep, ranks, math.nan if full is None else full["trainable_params"])
    title = "LoRA rank × α/r sweep" + (" (rsLoRA)" if variants == [True] else "")
    fig.suptitle(title, fontsize=13, x=0.01, ha="left")
    seeds = cells["size"].max()
    notes = [f"Cells: mean dev accuracy over {'up to ' if cells['size'].min() < seeds else ''}{seeds} seed"
             f"{'s' if seeds > 1 else ''}; blank cells were not run."]
    if full is not None and np.isfinite(full["accuracy"]):
        full_runs = comparison_runs(results.runs).query("method == 'full'")
        rows = {name: set(numeric_column(frame, "train_size").dropna().astype(int))
                for name, frame in (("sweep", sweep), ("full", full_runs))}
        fewer = f", trained on {_rows_label(rows['full'])} rows (the grid: {_rows_label(rows['sweep'])})" \
            if rows["full"] != rows["sweep"] else ""
        notes.append(f"Full fine-tuning (comparison runs): {full['accuracy'] * 100:.1f}% dev accuracy{fewer}.")
    return save_with_footnote(fig, png_path(out_dir, "sweep.png"), sweep, notes)


def _draw_sweep_heatmap(ax, cells: pd.DataFrame, ranks: Sequence[float], ratios: Sequence[float],
                        value_range: tuple[float, float]):
    """Mean accuracy per (rank, ratio) cell, annotated; returns the image for the colour bar."""
    matrix = np.full((len(ranks), len(ratios)), np.nan)
    for (rank, ratio), mean in cells["mean"].items():
        matrix[ranks.index(rank), ratios.index(ratio)] = mean * 100
    low, high = value_range
    spread = max(high - low, 0.1)
    cmap = colormaps["viridis"].with_extremes(bad="#F2F2F2")
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=low - 0.05 * spread, vmax=high + 0.05 * spread,
                      aspect="auto")
    for (row, column), value in np.ndenumerate(matrix):
        if np.isfinite(value):
            dark = (value - low) / spread < 0.55  # viridis is dark at the low end
            ax.text(column, row, f"{value:.1f}", ha="center", va="center", fontsize=9,
                    color="white" if dark else "#1A1A1A", fontweight="bold" if value == high else "normal")
    ax.set_xticks(range(len(ratios)), [f"{r:g}" for r in ratios])
    ax.set_yticks(range(len(ranks)), [f"{r:g}" for r in ranks])
    ax.set_xlabel("α / r")
    ax.set_ylabel("LoRA rank r")
    ax.tick_params(length=0)
    ax.spines[:].set_visible(False)
    return image


def _draw_sweep_params(ax, sweep: pd.DataFrame, ranks: Sequence[float], full_params: float) -> None:
    """Trainable parameters per rank (rows shared with the heatmap), log scale, full fine-tuning as a reference."""
    params = sweep.groupby("rank")["trainable_params"].first().reindex(ranks)
    known = params.notna().to_numpy()
    y = np.arange(len(ranks))
    bars = ax.barh(y[known], params.to_numpy()[known], color=METHOD_COLORS["lora"], height=0.6, zorder=2)
    label_bars(ax, bars, [format_count(v) for v in params.to_numpy()[known]], fontsize=8.5)
    top = np.nanmax(params.to_numpy()) if known.any() else 1.0
    if np.isfinite(full_params):
        ax.axvline(full_params, color=METHOD_COLORS["full"], linestyle="--", linewidth=1.3,
                   label=f"full fine-tuning ({format_count(full_params)})")
        ax.legend(loc="upper right", fontsize=8.5, framealpha=0.9, edgecolor="none")  # beside the shortest bars
        top = max(top, full_params)
    ax.set_xscale("log")
    bottom = np.nanmin(params.to_numpy()) if known.any() else 1.0
    ax.set_xlim(bottom / 3, top * 8)
    ax.xaxis.set_major_formatter(tick_formatter(format_count))
    ax.set_xlabel("trainable parameters (log)")
    ax.set_title("Trainable parameters\n(independent of α)", fontsize=10, loc="left")
    ax.tick_params(axis="y", labelleft=False, length=0)
    style_axes(ax, "x")


def plot_lr_tuning(results: Results, out_dir: str | Path) -> Path | None:
    """``lr_tuning.png``: held-out accuracy vs learning rate per series (a method on a target set), each series'
    chosen rate marked.

    The tuning runs (group ``"tune"``) are scored on a held-out slice of the train split, never on dev, so the
    rate is chosen without looking at the reported split; the chosen rates are those of
    :func:`peft_utils.tuning.choose_learning_rates`, the function the training side calls. Why plot the whole grid: a
    chosen rate at the grid's edge, or a flat curve, says the grid (not the method) decided. ``None`` when there is
    no tuning run.
    """
    tune = runs_in_group(results.runs, TUNE_GROUP)
    if tune.empty:
        return None
    scores = learning_rate_scores(tune)
    if scores.empty:
        return None
    fig = new_figure(9.5, 5.2)
    ax = fig.add_subplot()
    several_seeds = (scores["n_seeds"] > 1).any()
    low, high = _lr_axis_limits(scores, tune)
    _draw_lr_curves(ax, tune, scores, several_seeds, low)
    _style_lr_axes(ax, tune, scores, (low, high))
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], linestyle="none", marker="o", markersize=12, markerfacecolor="none",
                          markeredgecolor="#444444"))
    labels.append("chosen rate")
    fig.legend(handles, labels, loc="outside right upper", frameon=False)
    notes = ["Chosen: highest held-out accuracy (ties: lower held-out loss, then the smaller rate). The dev split "
             "is never used for the choice."]
    if several_seeds:
        notes.append("Lines: mean over seeds; faint dots: single seeds.")
    if (scores["accuracy"] * 100 < low).any():
        notes.append(f"▽ on the axis floor: a score below the axis, written beside it. The axis reaches "
                     f"{LR_AXIS_DEPTH:g} points below each method's best, so a rate that failed does not flatten the "
                     "differences that decide the choice.")
    return save_with_footnote(fig, png_path(out_dir, "lr_tuning.png"), tune, notes)


def _draw_lr_curves(ax, tune: pd.DataFrame, scores: pd.DataFrame, several_seeds: bool, floor: float) -> None:
    """Per series: mean held-out accuracy per rate (single seeds as faint dots when there are several); a score
    below ``floor``, the axis' lower limit, is drawn on the floor (:func:`_mark_off_axis`)."""
    accuracy, keys = numeric_column(tune, "final_accuracy") * 100, run_series(tune)
    all_series = ordered_methods(scores["series"])
    chosen = scores[scores["chosen"]]
    label_heights = (chosen["accuracy"] * 100).groupby(chosen["lr"]).max()  # labels at one rate stack from its top
    labelled: dict[float, int] = {}  # chosen rate -> labels already drawn there (stacked, not overprinted)
    off_axis: dict[float, int] = {}  # rate -> off-axis scores already written there
    for i, series in enumerate(all_series):
        # Series sharing a grid are nudged sideways (in log space) so coinciding curves stay visible.
        nudge = 2 ** (0.05 * (i - (len(all_series) - 1) / 2))
        own = scores[scores["series"] == series]
        grid = own.assign(lr=own["lr"] * nudge)
        color = method_color(series)
        if several_seeds:
            seeds = (keys == series) & (accuracy >= floor)
            ax.scatter(numeric_column(tune[seeds], "lr") * nudge, accuracy[seeds], s=14, color=color, alpha=0.35,
                       zorder=2)
        drawn = np.maximum(grid["accuracy"] * 100, floor)
        ax.plot(grid["lr"], drawn, color=color, marker=method_marker(series), markersize=6, linewidth=2, zorder=3,
                label=method_label(series), clip_on=False)
        for row in own[own["accuracy"] * 100 < floor].itertuples():  # keyed by the grid's rate, not the nudged one
            stacked = off_axis[row.lr] = off_axis.get(row.lr, -1) + 1
            _mark_off_axis(ax, row.lr * nudge, row.accuracy * 100, floor, color, stacked)
        rate = float(own.loc[own["chosen"], "lr"].iloc[0])
        _mark_chosen_rate(ax, grid[grid["chosen"]].iloc[0], rate, label_heights[rate], color, labelled)


def _mark_off_axis(ax, lr: float, score: float, floor: float, color: str, stacked: int) -> None:
    """A score below the axis: an open ▽ on the floor with the score written right of it, where no line arrives
    (``stacked`` scores of other series already written at this rate push the text up)."""
    ax.scatter([lr], [floor], s=90, marker="v", facecolor="white", edgecolor=color, linewidth=1.8, zorder=5,
               clip_on=False)
    ax.annotate(f"{score:.1f}%", (lr, floor), xytext=(8, 2 + 11 * stacked), textcoords="offset points",
                ha="left", va="bottom", fontsize=8, color=color)


def _mark_chosen_rate(ax, chosen: pd.Series, rate: float, height: float, color: str,
                      labelled: dict[float, int]) -> None:
    """Circle a series' chosen rate (``chosen``: its grid row, nudged sideways) and write ``rate`` above it; labels
    of series that chose the same rate stack from ``height``, the highest of them (``labelled`` counts those drawn)."""
    ax.scatter(chosen["lr"], chosen["accuracy"] * 100, s=260, facecolor="none", edgecolor=color, linewidth=2.2,
               zorder=4)
    stacked = labelled[rate] = labelled.get(rate, -1) + 1
    ax.annotate(f"{rate:.0e}", (chosen["lr"], height), xytext=(0, 12 + 11 * stacked),
                textcoords="offset points", ha="center", va="bottom", fontsize=8.5, color=color,
                fontweight="bold")


def _lr_axis_limits(scores: pd.DataFrame, tune: pd.DataFrame) -> tuple[float, float]:
    """The accuracy axis' limits in percent: every mean score and single-seed score within :data:`LR_AXIS_DEPTH`
    points of its series' best mean, padded; lower scores fall below it."""
    best = (scores["accuracy"] * 100).groupby(scores["series"]).max()
    values = pd.concat([pd.Series(scores["accuracy"].to_numpy() * 100, index=scores["series"]),
                        pd.Series(numeric_column(tune, "final_accuracy").to_numpy() * 100, index=run_series(tune))])
    near_best = values[values >= best.reindex(values.index).to_numpy() - LR_AXIS_DEPTH].to_numpy()
    pad = max(1.0, 0.1 * np.ptp(near_best))
    return np.min(near_best) - pad, min(100.5, np.max(near_best) + 1.5 * pad)


def _style_lr_axes(ax, tune: pd.DataFrame, scores: pd.DataFrame, limits: tuple[float, float]) -> None:
    """Log rate axis ticked at the grid's rates; accuracy axis at ``limits``; titles and grid."""
    ax.set_xscale("log")
    lrs = np.sort(scores["lr"].unique())
    ax.set_xticks(lrs, [f"{lr:.0e}" for lr in lrs], rotation=45 if len(lrs) > 6 else 0)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(lrs[0] / 1.6, lrs[-1] * 1.6)
    low, high = limits
    ax.set_ylim(low, high)
    # whole percents unless the scores sit within a few points, where half-point ticks would print alike
    ax.yaxis.set_major_formatter(PercentFormatter(decimals=0 if high - low >= 5 else 1))
    ax.set_xlabel("peak learning rate (log scale)")
    split = "/".join(distinct_texts(optional_column(tune, "eval_split"))) or "held-out"
    ax.set_ylabel(f"held-out accuracy ({split})")
    ax.set_title("Learning-rate tuning: accuracy on a held-out slice of the train split", fontsize=12, loc="left")
    style_axes(ax, "both")
