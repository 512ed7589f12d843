"""What the methods cost: training time, peak memory and shipped size, one panel each of one figure."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from peft_utils.formatting import format_bytes, format_seconds
from peft_utils.plots.footnote import save_with_footnote
from peft_utils.plots.style import (MEMORY_KIND_TEXT, comparison_runs, method_color, method_label, method_summary,
                                    new_figure, png_path, set_time_axis, style_axes, tick_formatter)
from peft_utils.store import Results


def plot_cost(results: Results, out_dir: str | Path) -> Path | None:
    """``cost.png``: per series, training time (with its share of full fine-tuning's), peak memory and the size of
    what it ships, as bars in three panels sharing the series' rows; a panel for each cost some series recorded.

    Why bars with their numbers written on: the reader compares a few values per cost, and the results table holds
    the rest (trainable parameters, intervals). Sizes use a log axis: a full checkpoint and an adapter differ by
    orders of magnitude, and on a linear one the adapters vanish.
    """
    runs = comparison_runs(results.runs)
    table = method_summary(runs)
    panels = [(column, draw) for column, draw in (("train_time_s", _draw_time), ("peak_memory_bytes", _draw_memory),
                                                  ("disk_bytes", _draw_size))
              if not table.empty and (table[column] > 0).any()]
    if not panels:
        return None
    fig = new_figure(4.4 * len(panels) + 1.6, 0.5 * len(table) + 2.2)
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    y = np.arange(len(table))[::-1]
    notes = []
    for ax, (column, draw) in zip(axes, panels):
        known = (table[column] > 0).to_numpy()
        bars = ax.barh(y[known], table.loc[known, column], height=0.62, edgecolor="white", zorder=2,
                       color=[method_color(s) for s in table.index[known]])
        notes += draw(ax, table[known], bars)
        style_axes(ax, "x")
    axes[0].set_yticks(y, [method_label(s) for s in table.index])
    fig.suptitle("What each method costs: training time, peak memory and shipped size", fontsize=13, x=0.01,
                 ha="left")
    if (table["n_runs"] > 1).any():
        notes.append("Over a method's seeds: the mean training time, the largest peak memory (the budget to provision).")
    return save_with_footnote(fig, png_path(out_dir, "cost.png"), runs, notes)


def _draw_time(ax, table: pd.DataFrame, bars) -> list[str]:
    """Training time, each bar labelled with its share of full fine-tuning's (else of the slowest method's)."""
    seconds = table["train_time_s"].to_numpy(dtype=float)
    reference = "full" if "full" in table.index else table["train_time_s"].idxmax()
    shares = seconds / table.loc[reference, "train_time_s"]
    ax.bar_label(bars, [f"{format_seconds(s)} ({share:.0%})" for s, share in zip(seconds, shares)], padding=3,
                 fontsize=8.5)
    set_time_axis(ax, 0, seconds.max() * 1.5, log=False)
    ax.set_xlabel("training time (all epochs, evaluation excluded)")
    ax.set_title(f"Training time\n(% of {method_label(reference)}'s)", fontsize=10, loc="left")
    return [] if reference == "full" else [f"Training time shares: of the slowest method, {method_label(reference)}; "
                                           "full fine-tuning is not in this run set."]


def _draw_memory(ax, table: pd.DataFrame, bars) -> list[str]:
    """Peak memory, named by its kind: a GPU's tensor allocations and a CPU run's process RSS do not compare, so
    mixed kinds are hatched and listed."""
    values = table["peak_memory_bytes"].to_numpy(dtype=float)
    kinds = [kind or "unknown" for kind in table["memory_kind"]]
    ax.bar_label(bars, [format_bytes(v, decimals=2) for v in values], padding=3, fontsize=8.5)
    ax.set_xlim(0, values.max() * 1.35)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10]))
    ax.xaxis.set_major_formatter(tick_formatter(format_bytes))
    ax.set_title("Peak memory during training", fontsize=10, loc="left")
    if len(set(kinds)) > 1:
        for bar, kind in zip(bars, kinds):
            bar.set_hatch("" if kind == "cuda" else "xx")
        ax.set_xlabel("peak memory (mixed kinds, see note)")
        listing = "; ".join(f"{method_label(s)}: {MEMORY_KIND_TEXT.get(k, k)}" for s, k in zip(table.index, kinds))
        return [f"NOTE: memory kinds differ (hatched bars are not GPU allocations): {listing}."]
    ax.set_xlabel(MEMORY_KIND_TEXT.get(kinds[0], f"peak memory ({kinds[0]})"))
    return ["Process RSS includes the Python runtime, libraries and data, not only the model."] if kinds[0] == "rss" \
        else []


def _draw_size(ax, table: pd.DataFrame, bars) -> list[str]:
    """What each method ships (a full checkpoint, an adapter, a 4-bit base and adapter), beside the base model in
    fp32 that an adapter needs too: the fp32 size less the trainable weights an adapter added."""
    sizes = table["disk_bytes"].to_numpy(dtype=float)
    ax.bar_label(bars, [f"{format_bytes(v)} {kind or ''}" for v, kind in zip(sizes, table["disk_kind"])], padding=3,
                 fontsize=8.5, bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})  # over the dashed line
    ax.set_xscale("log")
    ax.set_xlim(sizes.min() / 3, sizes.max() * 60)  # room on the right for the labels
    ax.xaxis.set_major_formatter(tick_formatter(format_bytes))
    ax.set_xlabel("shipped size (log scale; 1 MB = 10^6 bytes)")
    added = 4 * table["trainable_params"].fillna(0).where(table.index != "full", 0)
    base = (table["fp32_bytes"] - added).min()
    title = "What each method ships"
    if np.isfinite(base):
        ax.axvline(base, color="#555555", linestyle="--", linewidth=1.2, zorder=1)
        title += f"\n(dashed: the base model in fp32, {format_bytes(base)})"
    ax.set_title(title, fontsize=10, loc="left")
    return []
