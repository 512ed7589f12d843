"""What the methods cost: ``cost.png`` training time, peak memory and shipped size side by side, ``pareto.png`` each
against dev accuracy with its Pareto frontier, the view peft's method-comparison suite uses."""
from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter, FuncFormatter, MaxNLocator, NullLocator

from peft_utils.formatting import format_bytes, format_seconds
from peft_utils.methods import series_label
from peft_utils.plots.style import (WILSON_NOTE, accuracy_legend, dataset_name, draw_seeds_and_mean, figure_legend,
                                    method_color, method_summary, new_figure, save_with_footnote, zoom_accuracy_axis)
from peft_utils.stats import numeric_column, run_series, runs_in_group
from peft_utils.store import COMPARISON_GROUP, Results

LOG_SPAN = 10.0  # a cost axis whose values span more than this factor is drawn on a log scale
_FRONTIER_STYLE = {"color": "#333333", "linestyle": "--", "linewidth": 1.3}
MEMORY_KIND_TEXT = {"cuda": "peak GPU memory allocated (torch.cuda)", "rss": "peak process RSS (CPU run)"}


class Cost(NamedTuple):
    """One cost: its column in :func:`~peft_utils.stats.per_method_summary` and in the run table, name and format."""

    column: str
    run_column: str
    name: str
    format_value: Callable[[float], str]
    title: str  # of its cost.png panel


COSTS = (Cost("train_time_s", "train_time_s", "training time", format_seconds, "Training time, all epochs"),
         Cost("peak_memory_bytes", "peak_memory_bytes", "peak memory", lambda v: format_bytes(v, decimals=2),
              "Peak memory during training"),
         Cost("disk_bytes", "size.disk_bytes", "shipped size", format_bytes, "What each method ships"))


def pareto_front(costs: Sequence[float], accuracies: Sequence[float]) -> np.ndarray:
    """Which points no other dominates (costs no more, is no less accurate, and is strictly better in one): a boolean
    mask. Two identical points both stay on the front; a NaN cost or accuracy is off it and dominates nothing."""
    cost, accuracy = np.asarray(costs, dtype=float), np.asarray(accuracies, dtype=float)
    no_worse = (cost[:, None] <= cost[None, :]) & (accuracy[:, None] >= accuracy[None, :])  # [j, i]: j vs i
    better = (cost[:, None] < cost[None, :]) | (accuracy[:, None] > accuracy[None, :])
    return np.isfinite(cost) & np.isfinite(accuracy) & ~(no_worse & better).any(axis=0)  # NaN compares false


def _cost_table(results: Results) -> tuple[pd.DataFrame, pd.DataFrame, list[Cost], list[str]]:
    """The comparison runs, their :func:`method_summary`, the costs recorded and notes; memory is left out when its
    kinds differ (a GPU's allocations and a process's RSS are not one quantity)."""
    runs = runs_in_group(results.runs, COMPARISON_GROUP)
    table = method_summary(runs)
    costs = [cost for cost in COSTS if not table.empty and (table[cost.column] > 0).any()]
    kinds = set("+".join(table.loc[table["peak_memory_bytes"] > 0, "memory_kind"]).split("+")) if costs else set()
    notes = ["Over a method's seeds: the mean training time, the largest peak memory (the budget to provision)."
             ] if costs and (table["n_runs"] > 1).any() else []
    if len(kinds) > 1:
        costs = [c for c in costs if c.column != "peak_memory_bytes"]
        notes.append(f"Peak memory not drawn: its kinds differ across runs ({', '.join(sorted(kinds))}).")
    return runs, table, costs, notes


def _set_cost_axis(ax, cost: Cost, values: np.ndarray, memory_kind: str, from_zero: bool = False) -> None:
    """A cost's x axis: bytes on a log scale past :data:`LOG_SPAN`; time linear (bars compare as lengths), ticked in
    round numbers of one unit. ``from_zero`` (bars) starts at 0 and leaves room on the right for the bars' labels."""
    low, high = float(values.min()), float(values.max())
    log, pad = cost.column != "train_time_s" and high / low > LOG_SPAN, (high - low) or 0.2 * high
    if log:
        low, high = low / 3, high * (60 if from_zero else 3)
    else:
        low, high = (0.0, high * 1.5) if from_zero else (max(0.0, low - 0.3 * pad), high + 0.3 * pad)
    kind = MEMORY_KIND_TEXT.get(memory_kind) if cost.column == "peak_memory_bytes" else None
    ax.set(xscale="log" if log else "linear", xlim=(low, high),
           xlabel=(kind or cost.name) + (" (log scale)" if log else ""))
    ax.xaxis.set_minor_locator(NullLocator())
    if cost.column != "train_time_s":
        ax.xaxis.set_major_formatter(EngFormatter(unit="B"))
        if not log:  # a narrow linear range gets few ticks: "1.35 GB" labels are wide
            ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        return
    unit, name = (3600, "h") if high >= 7200 else (60, "min") if high >= 120 else (1, "s")
    ticks = MaxNLocator(nbins=5, steps=[1, 2, 5, 10]).tick_values(low / unit, high / unit) * unit
    ax.set_xticks([t for t in ticks if low <= t <= high])
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / unit:g} {name}"))


def plot_cost(results: Results, out_dir: str | Path) -> Path | None:
    """``cost.png``: a panel of labelled bars per recorded cost; times also as a share of full fine-tuning's (else the
    slowest's), and the base model in fp32, which an adapter needs beside it, over the sizes."""
    runs, table, costs, notes = _cost_table(results)
    if not costs:
        return None
    fig, axes = new_figure(4.4 * len(costs) + 1.6, 0.5 * len(table) + 2.2,
                           "What each method costs: training time, peak memory and shipped size", "x",
                           ncols=len(costs), sharey=True)
    y = np.arange(len(table))[::-1]
    for ax, cost in zip(axes, costs):
        known = table[table[cost.column] > 0]
        values, title = known[cost.column], cost.title
        labels = [cost.format_value(v) for v in values]
        if cost.column == "train_time_s":
            reference = "full" if "full" in known.index else values.idxmax()
            labels = [f"{text} ({v / values[reference]:.0%})" for text, v in zip(labels, values)]
            title += f"\n(% of {series_label(reference)}'s{'' if reference == 'full' else ', the slowest'})"
        if cost.column == "disk_bytes":
            base = (known["fp32_bytes"] - 4 * known["trainable_params"].fillna(0).where(known.index != "full", 0)).min()
            labels = [f"{text} {kind or ''}" for text, kind in zip(labels, known["disk_kind"])]
            title += f"\n(the base model in fp32: {format_bytes(base)})" if np.isfinite(base) else ""
        bars = ax.barh(y[table[cost.column] > 0], values, height=0.62, edgecolor="white", zorder=2,
                       color=[method_color(s) for s in known.index])
        ax.bar_label(bars, labels, padding=3, fontsize=8.5)
        ax.set_title(title, fontsize=10, loc="left")
        _set_cost_axis(ax, cost, values.to_numpy(dtype=float), known["memory_kind"].iloc[0], True)
    axes[0].set_yticks(y, [series_label(s) for s in table.index])
    if "rss" in set(table["memory_kind"]):
        notes.append("Process RSS includes the Python runtime, libraries and data, not only the model.")
    return save_with_footnote(fig, Path(out_dir) / "cost.png", runs, notes)


def plot_pareto(results: Results, out_dir: str | Path) -> Path | None:
    """``pareto.png``: accuracy against each recorded cost, the frontier a staircase whose methods the panel's title
    names: methods often sit so close that labels beside the points would cover each other."""
    runs, table, costs, notes = _cost_table(results)
    if not costs:
        return None
    fig, axes = new_figure(4.7 * len(costs) + 0.6, 5.6, f"{dataset_name(runs)} dev accuracy against each cost: the "
                           "Pareto frontier (up and left is better)", "both", ncols=len(costs), sharey=True)
    accuracy, keys, titles = numeric_column(runs, "final_accuracy") * 100, run_series(runs), []
    for ax, cost in zip(axes, costs):
        known, spent = table[table[cost.column] > 0], numeric_column(runs, cost.run_column)
        drawn = keys.isin(known.index) & accuracy.notna() & (spent > 0)
        for series, row in known.iterrows():
            draw_seeds_and_mean(ax, series, row, row[cost.column], (spent[drawn & (keys == series)],
                                                                    accuracy[drawn & (keys == series)]))
        _set_cost_axis(ax, cost, np.concatenate([known[cost.column], spent[drawn]]), known["memory_kind"].iloc[0])
        front = known[pareto_front(known[cost.column], known["accuracy"])].sort_values(cost.column)
        xs, ys = front[cost.column].to_numpy(dtype=float), front["accuracy"].to_numpy(dtype=float) * 100
        ax.step(np.append(xs, ax.get_xlim()[1]), np.append(ys, ys[-1]), where="post", zorder=2, **_FRONTIER_STYLE)
        # No-break spaces inside each method's entry: the title's lines break between entries only.
        members = ", ".join(f"{series_label(s)}: {cost.format_value(v)}".replace(" ", "\N{NO-BREAK SPACE}")
                            for s, v in front[cost.column].items())
        titles.append([f"vs {cost.name}", *textwrap.wrap(f"frontier: {members}", 52, break_on_hyphens=False)])
    for ax, lines in zip(axes, titles):  # padded to one height, so the titles' first lines align
        ax.set_title("\n".join(lines + [""] * (max(map(len, titles)) - len(lines))), fontsize=10, loc="left")
    zoom_accuracy_axis(axes[0], runs, table)
    # Each series once, from whichever panel drew it (a cost some series did not record leaves them out of its panel).
    entries = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}
    frontier = Line2D([], [], label="Pareto frontier", **_FRONTIER_STYLE)
    figure_legend(fig, [*entries.values(), *accuracy_legend(table), frontier])
    notes = ["Dashed staircase: the Pareto frontier through the methods' means, the methods (named above each panel) "
             "no other method beats on both accuracy and that cost; it ignores the intervals, so where they overlap "
             "the order is not established (accuracy.png's paired tests say which differences are).", *notes]
    notes += [WILSON_NOTE] if "Wilson" in set(table["interval"]) else []
    return save_with_footnote(fig, Path(out_dir) / "pareto.png", runs, notes)
