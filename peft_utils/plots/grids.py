"""The two grids of runs: the LoRA rank x alpha map (sweep) and the learning-rate tuning scores."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.ticker import PercentFormatter

from peft_utils.formatting import format_count
from peft_utils.methods import ordered_methods, series_label
from peft_utils.plots.style import (count_range, distinct_texts, figure_legend, log_ticks, method_color, method_marker,
                                    new_figure, save_with_footnote)
from peft_utils.stats import numeric_column, optional_column, run_series, runs_in_group
from peft_utils.store import COMPARISON_GROUP, SWEEP_GROUP, TUNE_GROUP, Results
from peft_utils.tuning import learning_rate_scores

# How far below the best held-out scores the accuracy axis reaches, in points: a rate that diverged to chance sits on
# the floor, so it does not squeeze the differences near the optimum, which decide the choice, into a sliver.
LR_AXIS_DEPTH = 12.0


def plot_sweep(results: Results, out_dir: str | Path) -> Path | None:
    """``sweep.png``: mean dev accuracy over the LoRA rank x alpha/r grid. Why alpha/r columns: LoRA scales its update
    by alpha/r, so along a column only capacity changes (rsLoRA, alpha/sqrt(r), gets a heatmap of its own)."""
    sweep = runs_in_group(results.runs, SWEEP_GROUP)
    rank, accuracy = numeric_column(sweep, "rank"), numeric_column(sweep, "final_accuracy")
    sweep = sweep.assign(rank=rank, final_accuracy=accuracy, ratio=(numeric_column(sweep, "alpha") / rank).round(4),
                         rslora=optional_column(sweep, "rslora").eq(True))[(rank > 0) & accuracy.notna()]
    if sweep.empty:
        return None
    ranks, ratios, variants = (sorted(sweep[c].unique()) for c in ("rank", "ratio", "rslora"))
    fig, axes = new_figure(len(variants) * (0.95 * len(ratios) + 1.2) + 2.2, 0.42 * len(ranks) + 2.4,
                           "LoRA rank × α/r sweep" + " (rsLoRA)" * (variants == [True]), "", ncols=len(variants),
                           sharey=True)
    cells = sweep.groupby(["rslora", "rank", "ratio"])["final_accuracy"].agg(["mean", "size"])
    low, high = 100 * cells["mean"].min(), 100 * cells["mean"].max()
    spread = max(high - low, 0.1)
    for ax, variant in zip(axes, variants):
        matrix = cells.loc[variant, "mean"].unstack().reindex(index=ranks, columns=ratios).to_numpy() * 100
        image = ax.imshow(np.ma.masked_invalid(matrix), cmap=colormaps["viridis"].with_extremes(bad="#F2F2F2"),
                          vmin=low - 0.05 * spread, vmax=high + 0.05 * spread, aspect="auto")
        for (row, column), value in np.ndenumerate(matrix):
            if np.isfinite(value):  # white text on viridis' dark low end, the best bold
                ax.text(column, row, f"{value:.1f}", ha="center", va="center", fontsize=9,
                        color="white" if (value - low) / spread < 0.55 else "#1A1A1A",
                        fontweight="bold" if value == high else "normal")
        ax.set(xticks=range(len(ratios)), xticklabels=[f"{r:g}" for r in ratios], xlabel="α / r")
        ax.set_title(("rsLoRA: scale α/√r" if variant else "LoRA: scale α/r") + "\n(dev accuracy, %)", fontsize=10,
                     loc="left")
        ax.tick_params(length=0)
        ax.spines[:].set_visible(False)
    fig.colorbar(image, ax=list(axes), shrink=0.8, pad=0.02)
    params = numeric_column(sweep, "trainable_params").groupby(sweep["rank"]).first()
    axes[0].set_yticks(range(len(ranks)), [f"{r:g} ({format_count(params.get(r))})" for r in ranks])
    axes[0].set_ylabel("LoRA rank r (trainable parameters)")
    notes = [f"Cells: mean dev accuracy over {count_range(cells['size'])} seed(s); blank cells were not run."]
    comparison = runs_in_group(results.runs, COMPARISON_GROUP)
    full = comparison[optional_column(comparison, "method").eq("full")]
    if not full.empty:  # the reference a cell is read against, and whether it saw as many rows
        rows = [count_range(numeric_column(frame, "train_size")) for frame in (full, sweep)]
        notes.append(f"Full fine-tuning (comparison runs, {rows[0]} train rows; the grid: {rows[1]}): "
                     f"{numeric_column(full, 'final_accuracy').mean():.1%} dev accuracy, "
                     f"{format_count(numeric_column(full, 'trainable_params').max())} trainable parameters.")
    return save_with_footnote(fig, Path(out_dir) / "sweep.png", sweep, notes)


def plot_lr_tuning(results: Results, out_dir: str | Path) -> Path | None:
    """``lr_tuning.png``: held-out accuracy against learning rate per series, a line over its seeds' faint dots, the
    chosen rate circled. Why the whole grid: a choice at its edge, or a flat curve, says the grid decided."""
    tune = runs_in_group(results.runs, TUNE_GROUP)
    scores = learning_rate_scores(tune) if not tune.empty else pd.DataFrame()
    if scores.empty:
        return None
    fig, (ax,) = new_figure(9.5, 5.2, "Learning-rate tuning: accuracy on a held-out slice of the train split", "both")
    # The axis reaches LR_AXIS_DEPTH points below the lowest series' best score; lower scores fall on its floor, as ▽.
    accuracy, keys = numeric_column(tune, "final_accuracy") * 100, run_series(tune)
    values = np.concatenate([scores["accuracy"] * 100, accuracy.dropna()])
    values = values[values >= (scores["accuracy"] * 100).groupby(scores["series"]).max().min() - LR_AXIS_DEPTH]
    pad = max(1.0, 0.1 * np.ptp(values))
    floor, top = values.min() - pad, min(100.5, values.max() + 1.5 * pad)
    all_series, below = ordered_methods(scores["series"]), []
    for i, series in enumerate(all_series):
        nudge = 2 ** (0.05 * (i - (len(all_series) - 1) / 2))  # series sharing a grid, side by side in log space
        own = scores[scores["series"] == series].assign(percent=lambda f: f["accuracy"] * 100)
        color, chosen, failed = method_color(series), own[own["chosen"]].iloc[0], own[own["percent"] < floor]
        seeds = (keys == series) & (accuracy >= floor)  # with one seed, hidden under the line's marker
        ax.scatter(numeric_column(tune[seeds], "lr") * nudge, accuracy[seeds], s=14, color=color, alpha=0.35, zorder=2)
        ax.plot(own["lr"] * nudge, np.maximum(own["percent"], floor), color=color, marker=method_marker(series),
                markersize=6, linewidth=2, zorder=3, clip_on=False,
                label=f"{series_label(series)}: chose {chosen['lr']:.0e}")
        ax.scatter(chosen["lr"] * nudge, chosen["percent"], s=260, facecolor="none", edgecolor=color, linewidth=2.2,
                   zorder=4)
        ax.scatter(failed["lr"] * nudge, np.full(len(failed), floor), s=90, marker="v", facecolor="white",
                   edgecolor=color, linewidth=1.8, zorder=5, clip_on=False)
        below += [f"{series_label(series)} at {row.lr:.0e}: {row.percent:.1f}%" for row in failed.itertuples()]
    lrs = np.sort(scores["lr"].unique())
    log_ticks(ax, lrs, [f"{lr:.0e}" for lr in lrs], rotation=45 if len(lrs) > 6 else 0)
    ax.set(xlim=(lrs[0] / 1.6, lrs[-1] * 1.6), ylim=(floor, top), xlabel="peak learning rate (log scale)",
           ylabel=f"held-out accuracy ({'/'.join(distinct_texts(optional_column(tune, 'eval_split'))) or 'held-out'})")
    # whole percents unless the scores sit within a few points, where half-point ticks would print alike
    ax.yaxis.set_major_formatter(PercentFormatter(decimals=0 if top - floor >= 5 else 1))
    figure_legend(fig)
    notes = ["Circled: each series' chosen rate, the highest held-out accuracy (ties: lower held-out loss, then the "
             "smaller rate). The dev split is never used for the choice."]
    if (scores["n_seeds"] > 1).any():
        notes.append("Lines: mean over seeds; faint dots: single seeds.")
    if below:
        notes.append(f"▽ on the axis floor, {LR_AXIS_DEPTH:g} points below the best scores, so that a rate that "
                     f"failed does not flatten the differences deciding the choice: {'; '.join(below)}.")
    return save_with_footnote(fig, Path(out_dir) / "lr_tuning.png", tune, notes)
