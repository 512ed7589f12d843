"""The Pareto view: dev accuracy against each cost on its own axis, with the methods no other method beats.

Each cost (training time, peak memory, shipped size) gets a panel with its own scale, every seed is shown, and the
Pareto frontier (the methods for which no other is at least as accurate and at least as cheap, and better in one of
the two) is drawn as a staircase and named above its panel: everything below and right of it is dominated on that
cost. This is the view peft's method-comparison suite uses.
"""
from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, NullFormatter, PercentFormatter

from peft_utils.formatting import format_bytes, format_seconds
from peft_utils.plots.footnote import dataset_name, save_with_footnote
from peft_utils.plots.style import (MEMORY_KIND_TEXT, comparison_runs, interval_legend, method_color, method_label,
                                    method_marker, method_summary, new_figure, png_path, set_time_axis, style_axes,
                                    tick_formatter)
from peft_utils.stats import numeric_column, run_series
from peft_utils.store import Results

LOG_SPAN = 10.0  # a cost axis whose values span more than this factor is drawn on a log scale
_FRONTIER_STYLE = {"color": "#333333", "linestyle": "--", "linewidth": 1.3}


@dataclass(frozen=True)
class Cost:
    """One cost axis: its column in :func:`~peft_utils.stats.per_method_summary` and in the run table, its name, how
    a value is written, and how the summary pools a method's seeds."""

    column: str
    run_column: str
    name: str
    format_value: Callable[[float], str]
    over_seeds: str


COSTS = (
    Cost("train_time_s", "train_time_s", "training time", format_seconds, "training time: the mean"),
    Cost("peak_memory_bytes", "peak_memory_bytes", "peak memory", lambda v: format_bytes(v, decimals=2),
         "peak memory: the largest (the budget to provision)"),
    Cost("disk_bytes", "size.disk_bytes", "shipped size", format_bytes, "shipped size: the same for every seed"),
)


def pareto_front(costs: Sequence[float], accuracies: Sequence[float]) -> np.ndarray:
    """Which points no other point dominates: a boolean mask, lower cost and higher accuracy better.

    A point is dominated when another costs no more and is no less accurate, and is strictly better in one of the
    two: of two equally costly methods the less accurate is off the front, and two identical points both stay on
    it. A point with a missing (NaN) cost or accuracy is neither on the front nor dominates anything.
    """
    cost, accuracy = np.asarray(costs, dtype=float), np.asarray(accuracies, dtype=float)
    no_worse = (cost[:, None] <= cost[None, :]) & (accuracy[:, None] >= accuracy[None, :])  # [j, i]: j vs i
    better = (cost[:, None] < cost[None, :]) | (accuracy[:, None] > accuracy[None, :])
    return np.isfinite(cost) & np.isfinite(accuracy) & ~(no_worse & better).any(axis=0)  # NaN compares false


def plot_pareto(results: Results, out_dir: str | Path) -> Path | None:
    """``pareto.png``: accuracy against training time, peak memory and shipped size, a panel each sharing the
    accuracy axis; seeds as dots, each method's mean with its 95% interval, the frontier as a staircase, its
    methods and their costs in the panel's title.

    A panel for each cost some method recorded; None when no method has an accuracy or any cost.
    """
    runs = comparison_runs(results.runs)
    table = method_summary(runs, "accuracy")
    if table.empty:
        return None
    costs, notes = _drawable_costs(table)
    if not costs:
        return None
    fig = new_figure(4.7 * len(costs) + 0.6, 5.6)
    axes = np.atleast_1d(fig.subplots(1, len(costs), sharey=True))
    titles = [_draw_panel(ax, runs, table[table[cost.column] > 0], cost) for ax, cost in zip(axes, costs)]
    for ax, lines in zip(axes, titles):  # padded to one height, so the titles' first lines align
        ax.set_title("\n".join(lines + [""] * (max(map(len, titles)) - len(lines))), fontsize=10, loc="left")
    _set_accuracy_axis(axes[0], runs, table)
    fig.legend(handles=_legend_handles(table), loc="outside right upper", fontsize=8.5, frameon=False)
    fig.suptitle(f"{dataset_name(runs)} dev accuracy against each cost: the Pareto frontier (up and left is better)",
                 fontsize=13, x=0.01, ha="left")
    notes = ["Dashed staircase: the Pareto frontier through the methods' means, the methods (named above each panel) "
             "no other method beats on both accuracy and that cost; it ignores the intervals, so where they overlap "
             "the order is not established (accuracy.png's paired tests say which differences are).", *notes]
    if (table["n_runs"] > 1).any():
        notes.append("Over a method's seeds, " + "; ".join(cost.over_seeds for cost in costs) + ".")
    if "Wilson" in set(table["interval"]):
        notes.append("Wilson interval: dev-set sampling noise of a single run only (run-to-run variation unseen).")
    return save_with_footnote(fig, png_path(out_dir, "pareto.png"), runs, notes)


def _drawable_costs(table: pd.DataFrame) -> tuple[list[Cost], list[str]]:
    """The costs some method recorded, and a note for each left out: memory, when its kinds differ (a GPU's
    allocations and a process's RSS make no frontier together)."""
    costs, notes = [], []
    for cost in COSTS:
        if not (table[cost.column] > 0).any():
            continue
        if cost.column == "peak_memory_bytes":  # a method whose seeds differ has "cuda+rss"
            kinds = {kind for kinds in table.loc[table[cost.column] > 0, "memory_kind"] for kind in kinds.split("+")}
            if len(kinds) > 1:
                notes.append(f"Peak memory not drawn: its kinds differ across runs ({', '.join(sorted(kinds))}).")
                continue
        costs.append(cost)
    return costs, notes


def _draw_panel(ax, runs: pd.DataFrame, known: pd.DataFrame, cost: Cost) -> list[str]:
    """Seed dots, each method's mean with its interval, the frontier's staircase and the cost axis, for the methods
    ``known`` that recorded this cost; returns the lines of the panel's title, which name the frontier's methods."""
    drawn = [known[cost.column].to_numpy(dtype=float)]
    for series, row in known.iterrows():
        accuracy, spent = numeric_column(runs, "final_accuracy") * 100, numeric_column(runs, cost.run_column)
        mine = (run_series(runs) == series) & accuracy.notna() & (spent > 0)
        drawn.append(spent[mine].to_numpy())
        ax.scatter(spent[mine], accuracy[mine], s=22, color=method_color(series), alpha=0.55, edgecolor="none",
                   zorder=3)
        mean = row["accuracy"] * 100
        if np.isfinite(row["acc_low"]):
            ax.errorbar(row[cost.column], mean, yerr=[[mean - row["acc_low"] * 100], [row["acc_high"] * 100 - mean]],
                        color=method_color(series), elinewidth=1.2, capsize=4, alpha=0.8, zorder=3)
        ax.scatter(row[cost.column], mean, s=110, marker=method_marker(series), color=method_color(series),
                   edgecolor="white", linewidth=1.2, zorder=4)
    _set_cost_axis(ax, cost, np.concatenate(drawn), known["memory_kind"].iloc[0])
    front = known[pareto_front(known[cost.column], known["accuracy"])].sort_values(cost.column)
    xs, ys = front[cost.column].to_numpy(dtype=float), front["accuracy"].to_numpy(dtype=float) * 100
    ax.step(np.append(xs, ax.get_xlim()[1]), np.append(ys, ys[-1]), where="post", zorder=2, **_FRONTIER_STYLE)
    style_axes(ax, "both")
    # No-break spaces inside each method's entry: the lines break between entries only.
    members = ", ".join(f"{method_label(s)}: {cost.format_value(v)}".replace(" ", "\N{NO-BREAK SPACE}")
                        for s, v in front[cost.column].items())
    return [f"vs {cost.name}", *textwrap.wrap(f"frontier: {members}", 52, break_on_hyphens=False)]


def _set_cost_axis(ax, cost: Cost, values: np.ndarray, memory_kind: str) -> None:
    """Limits, scale and ticks of a cost axis: log past :data:`LOG_SPAN`, clock durations for time, bytes in units."""
    low, high = float(values.min()), float(values.max())
    log = high / low > LOG_SPAN
    pad = (high - low) or 0.2 * high
    low, high = (low / 3, high * 3) if log else (max(0.0, low - 0.3 * pad), high + 0.3 * pad)
    kind = MEMORY_KIND_TEXT.get(memory_kind) if cost.column == "peak_memory_bytes" else None
    ax.set_xlabel((kind or cost.name) + (" (log scale)" if log else ""))
    if cost.column == "train_time_s":
        set_time_axis(ax, low, high, log)
        return
    ax.set_xscale("log" if log else "linear")
    ax.set_xlim(low, high)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(tick_formatter(format_bytes))
    if not log:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))


def _set_accuracy_axis(ax, runs: pd.DataFrame, table: pd.DataFrame) -> None:
    """The shared accuracy axis, zoomed on every seed and interval drawn."""
    seeds = numeric_column(runs[run_series(runs).isin(table.index)], "final_accuracy").dropna().to_numpy()
    values = np.concatenate([seeds, table["accuracy"], table["acc_low"].dropna(), table["acc_high"].dropna()]) * 100
    pad = max(0.6, 0.12 * (values.max() - values.min()))
    ax.set_ylim(values.min() - pad, min(100.0, values.max() + pad))
    ax.yaxis.set_major_formatter(PercentFormatter(decimals=1))
    ax.set_ylabel("dev accuracy (zoomed axis)")


def _legend_handles(table: pd.DataFrame) -> list[Line2D]:
    """One entry per series (its colour and marker), then what the seed dots, the bars and the staircase are."""
    handles = [Line2D([], [], linestyle="none", marker=method_marker(m), color=method_color(m),
                      markeredgecolor="white", markersize=9, label=method_label(m)) for m in table.index]
    if (table["n_runs"] > 1).any():  # with one run per method its dot hides under the mean
        handles.append(Line2D([], [], linestyle="none", marker="o", color="#888888", alpha=0.55, markersize=5,
                              label="one seed"))
    interval = textwrap.fill("mean and its " + interval_legend(set(table["interval"])), 26)
    return handles + [Line2D([], [], color="#888888", marker="|", markersize=8, label=interval),
                      Line2D([], [], label="Pareto frontier", **_FRONTIER_STYLE)]
