"""The Pareto view: dev accuracy against each cost on its own axis, with the methods no other method beats.

Why beside :mod:`.summary`, which already puts accuracy against time (marker area = size): a marker's area cannot be
read as a number, peak memory is not drawn there at all, and the question "is this method worth considering at all"
has a definite answer that figure leaves to the eye. Here each cost (training time, peak memory, shipped size) gets
a panel with its own scale, every seed is shown, and the Pareto frontier (the methods for which no other method is
at least as accurate and at least as cheap, and better in one of the two) is drawn as a staircase and labelled:
everything below and right of it is dominated on that cost. This is the view peft's method-comparison suite uses.
"""
from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter, PercentFormatter

from peft_utils.formatting import format_bytes, format_seconds
from peft_utils.plots.footnote import dataset_name, save_with_footnote
from peft_utils.plots.selection import comparison_runs, methods_with
from peft_utils.plots.style import (
    MEMORY_KIND_TEXT,
    interval_legend,
    method_color,
    method_label,
    method_marker,
    new_figure,
    place_labels,
    png_path,
    set_duration_axis,
    style_axes,
    tick_formatter,
)
from peft_utils.stats import numeric_column, run_series
from peft_utils.store import Results

LOG_SPAN = 10.0  # a cost axis whose values span more than this factor is drawn on a log scale
_MEAN_AREA = 110.0  # pt², a method's mean marker
_SEED_AREA = 22.0  # pt², one run's dot
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
    """Which points no other point dominates: a boolean mask over the points, lower cost and higher accuracy better.

    A point is dominated when another costs no more and is no less accurate, and is strictly better in one of the
    two. So of two methods with equal cost the less accurate is off the front, of two equally accurate the costlier
    is, and two identical points both stay on it (neither beats the other). A point with a missing (NaN) cost or
    accuracy is neither on the front nor dominates anything.
    """
    cost, accuracy = np.asarray(costs, dtype=float), np.asarray(accuracies, dtype=float)
    known = np.isfinite(cost) & np.isfinite(accuracy)
    no_worse = (cost[:, None] <= cost[None, :]) & (accuracy[:, None] >= accuracy[None, :])  # [j, i]: j vs i
    better = (cost[:, None] < cost[None, :]) | (accuracy[:, None] > accuracy[None, :])
    dominated = (no_worse & better).any(axis=0)  # a NaN compares false: it beats nothing
    return known & ~dominated


def plot_pareto(results: Results, out_dir: str | Path) -> Path | None:
    """``pareto.png``: accuracy against training time, peak memory and shipped size, one panel each, sharing the
    accuracy axis; seeds as dots, each method's mean with its 95% interval, the Pareto frontier as a staircase.

    A panel is drawn for each cost recorded for some method (a method without it is left out of that panel); None
    when no method has an accuracy or none has any cost, so the figure is skipped rather than drawn empty.
    """
    runs = comparison_runs(results.runs)
    table = methods_with(runs, "accuracy")
    if table.empty:
        return None
    costs, notes = _drawable_costs(table)
    if not costs:
        return None
    fig = new_figure(4.7 * len(costs) + 0.6, 5.2)
    axes = np.atleast_1d(fig.subplots(1, len(costs), sharey=True))
    drawn = [_draw_panel(ax, runs, table, cost) for ax, cost in zip(axes, costs)]
    _set_accuracy_axis(axes[0], runs, table)
    # The legend and title first: the layout they take moves the axes, and the labels are placed in pixels.
    fig.legend(handles=_legend_handles(table), loc="outside right upper", fontsize=8.5, frameon=False)
    fig.suptitle(f"{dataset_name(runs)} dev accuracy against each cost: the Pareto frontier (up and left is better)",
                 fontsize=13, x=0.01, ha="left")
    for ax, cost, known in zip(axes, costs, drawn):
        _draw_frontier(fig, ax, runs, cost, known)
    notes = ["Dashed staircase: the Pareto frontier through the methods' means, the methods (labelled) no other "
             "method beats on both accuracy and that cost; it ignores the intervals, so where they overlap the "
             "order is not established (accuracy.png's paired tests say which differences are).", *notes]
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


def _draw_panel(ax, runs: pd.DataFrame, table: pd.DataFrame, cost: Cost) -> pd.DataFrame:
    """Seed dots, each method's mean with its interval, and the cost axis; returns the methods drawn (the rows of
    ``table`` that have this cost)."""
    known = table[table[cost.column] > 0]
    drawn = [known[cost.column].to_numpy(dtype=float)]
    for method, row in known.iterrows():
        color = method_color(method)
        seeds = _seed_points(runs, method, cost)
        drawn.append(seeds[:, 0])
        ax.scatter(*seeds.T, s=_SEED_AREA, color=color, alpha=0.55, edgecolor="none", zorder=3)
        mean = row["accuracy"] * 100
        if np.isfinite(row["acc_low"]):
            ax.errorbar(row[cost.column], mean, yerr=[[mean - row["acc_low"] * 100], [row["acc_high"] * 100 - mean]],
                        color=color, elinewidth=1.2, capsize=4, alpha=0.8, zorder=3)
        ax.scatter(row[cost.column], mean, s=_MEAN_AREA, marker=method_marker(method), color=color,
                   edgecolor="white", linewidth=1.2, zorder=4)
    _set_cost_axis(ax, cost, np.concatenate(drawn),
                   known["memory_kind"].iloc[0] if cost.column == "peak_memory_bytes" else "")
    ax.set_title(f"vs {cost.name}", fontsize=11, loc="left")
    style_axes(ax, "both")
    return known


def _set_cost_axis(ax, cost: Cost, values: np.ndarray, memory_kind: str) -> None:
    """Limits, scale and ticks of a cost axis: log past :data:`LOG_SPAN`, clock durations for time, bytes in units."""
    low, high = float(values.min()), float(values.max())
    log = high / low > LOG_SPAN
    label = MEMORY_KIND_TEXT.get(memory_kind, cost.name) if memory_kind else cost.name
    ax.set_xlabel(label + (" (log scale)" if log else ""))
    if log and cost.column == "train_time_s":
        set_duration_axis(ax, low / 16, high * 4)
        return
    if log:
        ax.set_xscale("log")
        ax.set_xlim(low / 16, high * 4)  # room beside the end points for their labels
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        pad = (high - low) or 0.2 * high
        ax.set_xlim(max(0.0, low - 0.8 * pad), high + 0.8 * pad)  # room beside the end points for their labels
    if cost.column != "train_time_s":
        ax.xaxis.set_major_formatter(tick_formatter(format_bytes))
        if not log:
            ax.xaxis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))
        return
    # Round numbers of the unit the durations are read in: "12 min" ticks, not "11.7 min" ones.
    unit, name = (3600, "h") if high >= 7200 else (60, "min") if high >= 120 else (1, "s")
    left, right = ax.get_xlim()
    ticks = MaxNLocator(nbins=5, steps=[1, 2, 5, 10]).tick_values(left / unit, right / unit) * unit
    ax.set_xticks([t for t in ticks if left <= t <= right])
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / unit:g} {name}"))


def _set_accuracy_axis(ax, runs: pd.DataFrame, table: pd.DataFrame) -> None:
    """The shared accuracy axis, zoomed on every seed and interval drawn."""
    seeds = numeric_column(runs[run_series(runs).isin(table.index)], "final_accuracy").dropna().to_numpy()
    values = np.concatenate([seeds, table["accuracy"], table["acc_low"].dropna(), table["acc_high"].dropna()]) * 100
    low, high = float(values.min()), float(values.max())
    pad = max(0.6, 0.12 * (high - low))
    ax.set_ylim(low - pad, min(100.0, high + pad))
    ax.yaxis.set_major_formatter(PercentFormatter(decimals=1))
    ax.set_ylabel("dev accuracy (zoomed axis)")


def _seed_points(runs: pd.DataFrame, series: str, cost: Cost) -> np.ndarray:
    """(cost, accuracy in %) of each of ``series``' runs that recorded both."""
    accuracy, spent = numeric_column(runs, "final_accuracy") * 100, numeric_column(runs, cost.run_column)
    mine = (run_series(runs) == series) & accuracy.notna() & (spent > 0)
    return np.column_stack([spent[mine], accuracy[mine]])


def _draw_frontier(fig: Figure, ax, runs: pd.DataFrame, cost: Cost, known: pd.DataFrame) -> None:
    """The frontier of the methods ``known`` on this cost as a staircase (the best accuracy a budget of that cost
    buys) to the panel's right edge, its methods labelled with their cost. Drawn once the axes' limits are final:
    the labels are placed in pixels."""
    front = known[pareto_front(known[cost.column], known["accuracy"])].sort_values(cost.column)
    xs, ys = front[cost.column].to_numpy(dtype=float), front["accuracy"].to_numpy(dtype=float) * 100
    corners_x, corners_y = np.append(xs, ax.get_xlim()[1]), np.append(ys, ys[-1])
    ax.step(corners_x, corners_y, where="post", zorder=2, **_FRONTIER_STYLE)
    # Every mean, bar and seed dot is given to the label placer so that no label covers one; only the frontier's
    # means get a text, the others an empty one: an obstacle only.
    points, texts = [], []
    for method, row in known.iterrows():
        on_front = method in front.index
        texts.append(f"{method_label(method)}\n{cost.format_value(row[cost.column])}" if on_front else "")
        points.append((row[cost.column], row["accuracy"] * 100, np.sqrt(_MEAN_AREA) / 2, row["acc_low"] * 100,
                       row["acc_high"] * 100))
        seeds = _seed_points(runs, method, cost)
        points += [(x, y, np.sqrt(_SEED_AREA) / 2, np.nan, np.nan) for x, y in seeds]
        texts += [""] * len(seeds)
    xs, ys, radii, lows, highs = (np.array(column, dtype=float) for column in zip(*points))
    place_labels(fig, ax, xs, ys, radii, texts, lows, highs, staircase_segments(corners_x, corners_y))


def staircase_segments(xs: np.ndarray, ys: np.ndarray) -> list[tuple[float, float, float, float]]:
    """The lines ``step(xs, ys, where="post")`` draws, as (x0, y0, x1, y1): from each corner right to the next
    corner's x, then up or down to its y."""
    lines = []
    for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:]):
        lines += [(x0, y0, x1, y0), (x1, y0, x1, y1)]
    return lines


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
